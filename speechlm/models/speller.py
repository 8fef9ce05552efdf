"""The speller: a token's spelling (a short sequence of character distributions) -> an LLM input embedding.

The spelling path of the token read-out (docs/METHOD.md, "The spelling path"): the SSR connector can only
produce vectors for tokens it heard in training; the speller reads the characters the charCTC aligner hears
inside a token's span instead, so any token that can be spelled gets a vector. It is trained from text alone
(``speechlm.training.speller``): each LLM vocabulary token's normalised spelling -> its input-embedding row.

Input: ``(B, C, V)`` distributions over the aligner's label set (label 0 = the CTC blank, never used; labels
1..V-1 = :attr:`SpellerConfig.alphabet`) and a ``(B, C)`` mask. One-hot rows are text; soft rows are what a
span of speech sounded like. A linear projection (one-hot = an embedding lookup), learned positions, a small
pre-norm Transformer encoder, masked mean pooling, a linear map to the LLM's hidden size (starting at the embedding
table's mean row, which it keeps as ``offset``).

A trained speller is a folder: ``config.json`` (:class:`SpellerConfig`) + ``model.safetensors`` (+ the
trainer's ``training.json``), written atomically; loading never executes code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from speechlm.atomic import atomic_path
from speechlm.config import from_dict
from speechlm.errors import ConfigError, ModelError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: What the trainer writes beside the model (its settings and accuracies); not needed to load.
TRAINING_FILE = "training.json"


@dataclass
class SpellerConfig:
    """The speller's shape and what it is tied to (the aligner's alphabet, the LLM's embedding table)."""

    alphabet: list[str] = field(default_factory=list)  # the aligner's labels 1..V-1 (label 0 = blank)
    d_llm: int = 576            # the LLM's hidden size (output)
    llm_name: str = ""          # the LLM whose input-embedding rows it was trained on
    llm_vocab_size: int = 0
    d_model: int = 256
    layers: int = 2
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1
    max_chars: int = 64         # longer spellings are cut (:func:`pad_spellings`)

    def __post_init__(self) -> None:
        if not self.alphabet or any(not isinstance(c, str) or len(c) != 1 for c in self.alphabet):
            raise ConfigError(f"speller alphabet must be single characters, got {self.alphabet!r}")
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ConfigError(f"speller alphabet has repeated characters: {self.alphabet!r}")
        for name in ("d_llm", "d_model", "layers", "heads", "ff_mult", "max_chars"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"speller {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ConfigError(f"speller d_model {self.d_model} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"speller dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_labels(self) -> int:
        """Input width: the blank plus the alphabet."""
        return len(self.alphabet) + 1

    @property
    def has_space(self) -> bool:
        """Whether the alphabet has the word separator (word-initial spellings then start with ' ')."""
        return " " in self.alphabet


class Speller(nn.Module):
    """``(B, C, V)`` character distributions + ``(B, C)`` mask -> ``(B, d_llm)`` vectors (see the module docstring).

    A row whose mask is all False has nothing to read: its output means nothing, and callers must not use it
    (they fall back; ``speechlm.eval.spelling`` marks those tokens)."""

    def __init__(self, config: SpellerConfig):
        super().__init__()
        self.config = c = config
        self.char_proj = nn.Linear(c.num_labels, c.d_model, bias=False)
        self.positions = nn.Parameter(torch.randn(c.max_chars, c.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(c.d_model, c.heads, c.ff_mult * c.d_model, c.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(c.d_model)
        self.out = nn.Linear(c.d_model, c.d_llm)
        # The target table's mean row (set by :meth:`init_output`): the rows share a large common part, and the
        # trainer's softmax compares directions about it (``speechlm.training.speller``).
        self.register_buffer("offset", torch.zeros(c.d_llm))

    def forward(self, chars: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.config
        if chars.dim() != 3 or chars.shape[-1] != c.num_labels:
            raise ModelError(f"speller expects (B, C, {c.num_labels}) character distributions, got "
                             f"{tuple(chars.shape)}")
        if chars.shape[1] > c.max_chars:
            raise ModelError(f"speller reads at most {c.max_chars} characters, got {chars.shape[1]} "
                             "(pad_spellings cuts them)")
        mask = mask.to(chars.device, torch.bool)
        x = self.char_proj(chars.float()) + self.positions[: chars.shape[1]]
        # An all-padding row would make attention NaN: let it attend to its (ignored) first slot.
        pad = ~mask
        pad[:, 0] &= mask.any(1)
        x = self.out_norm(self.encoder(x, src_key_padding_mask=pad))
        w = mask.float().unsqueeze(-1)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.out(pooled)

    @torch.no_grad()
    def init_output(self, table: torch.Tensor, weight_scale: float = 0.1) -> None:
        """Start at the target embedding table's ``(V, d_llm)`` mean row (kept as ``offset``), with a small output
        weight."""
        mean = table.float().mean(0)
        self.offset.copy_(mean)
        self.out.bias.copy_(mean)
        self.out.weight.mul_(weight_scale)

    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> None:
        """Write ``folder`` atomically: config.json, model.safetensors (+ training.json with ``extra``)."""
        with atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
            if extra is not None:
                (tmp / TRAINING_FILE).write_text(json.dumps(extra, indent=2) + "\n")


def load_speller(folder: str | Path, alphabet: Sequence[str] | None = None, d_llm: int | None = None,
                 map_location: str = "cpu") -> Speller:
    """The speller saved in ``folder`` (eval mode). ``alphabet`` (the aligner's labels 1..V-1) and ``d_llm`` (the
    LLM's hidden size), when given, must be what it was trained for. Raises ModelError naming the folder or file."""
    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise ModelError(f"{folder}: not a speller folder ({CONFIG_FILE} and {WEIGHTS_FILE} needed)")
    try:
        raw = json.loads(cfg_path.read_text())
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping, got {type(raw).__name__}")
        config = from_dict(SpellerConfig, raw)
    except (json.JSONDecodeError, ConfigError) as e:
        raise ModelError(f"{cfg_path}: invalid speller config ({e})") from None
    if alphabet is not None and list(alphabet) != list(config.alphabet):
        raise ModelError(f"{folder}: speller was trained on the alphabet {''.join(config.alphabet)!r}, the aligner "
                         f"has {''.join(alphabet)!r}")
    if d_llm is not None and int(d_llm) != config.d_llm:
        raise ModelError(f"{folder}: speller outputs d_llm={config.d_llm}, the LLM has hidden size {d_llm}")
    model = Speller(config)
    try:
        model.load_state_dict(load_file(str(weights), device=map_location), strict=True)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{weights}: unreadable speller weights ({e})") from None
    except RuntimeError as e:
        raise ModelError(f"{weights}: weights do not match {cfg_path} ({e})") from None
    return model.eval()


# ------------------------------------------------------------------------------------- inputs
def spelling_labels(text: str, alphabet: Sequence[str]) -> list[int]:
    """A normalised spelling -> label ids (1-based, as the aligner's); characters outside ``alphabet`` dropped."""
    index = {ch: i + 1 for i, ch in enumerate(alphabet)}
    return [index[ch] for ch in text if ch in index]


def pad_spellings(seqs: Sequence[torch.Tensor], num_labels: int, max_chars: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_i, V)`` soft spellings (c_i may be 0) -> ``(B, C, V)`` zero-padded + ``(B, C)`` mask; cut to
    ``max_chars``; C is at least 1 (an all-empty batch still has a slot)."""
    width = max(1, min(max_chars, max((int(s.shape[0]) for s in seqs), default=0)))
    chars = torch.zeros(len(seqs), width, num_labels)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s.dim() != 2 or s.shape[-1] != num_labels:
            raise ModelError(f"spelling {i}: expected (C, {num_labels}), got {tuple(s.shape)}")
        n = min(int(s.shape[0]), width)
        chars[i, :n] = s[:n].float()
        mask[i, :n] = True
    return chars, mask


def one_hot_spellings(labels: Sequence[Sequence[int]], num_labels: int, max_chars: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-id spellings -> one-hot ``(B, C, V)`` + mask (see :func:`pad_spellings`)."""
    eye = torch.eye(num_labels)
    return pad_spellings([eye[list(x)] if len(x) else eye[:0] for x in labels], num_labels, max_chars)
