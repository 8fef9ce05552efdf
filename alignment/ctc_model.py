"""CTC aligner models on frozen speech-encoder frames: ``charCTC`` (characters) and ``subCTC`` (LLM subwords).

Each is a small Transformer over the encoder frames plus a linear CTC layer (blank = label 0). A
trained aligner is a folder: ``config.json`` (encoder name/layers/frame rate, vocabulary) +
``model.safetensors`` (+ ``tokenizer/`` for subCTC); loading never executes code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignment.tokens import CHAR_ALPHABET
from speechlm.atomic import atomic_path
from speechlm.errors import ModelError

KINDS = ("charCTC", "subCTC")
BLANK_TOKEN = "<blank>"


@dataclass
class FrameAlignerConfig:
    """What every aligner model's config.json holds: the frame Transformer's shape, the classifier's size, what
    produced the frames and the calibration (:class:`CTCAlignerConfig` and ``alignment.cif.CIFAlignerConfig``)."""

    kind: str = ""                     # charCTC | subCTC | CIF
    input_dim: int = 512               # encoder hidden size D
    num_input_layers: int = 1          # L encoder layers fed in (mixed by learned softmax weights)
    d_model: int = 256
    layers: int = 2
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1
    vocab_size: int = 0                # CTC: V including the blank; CIF: the tokenizer's size (no blank)
    encoder_name: str = ""             # what produced the frames (SpeechEncoder name_or_path)
    encoder_layers: list[int] = field(default_factory=lambda: [-1])
    frame_rate_hz: float = 50.0        # encoder frame rate = the aligner's frame rate
    tokenizer: str = ""                # subCTC, CIF: the tokenizer the subword labels come from
    #: Calibration: whole frames added to every character's start / end (estimated on held-out data
    #: with reference timings by recipes/train_aligner.py, to undo the model's constant timing bias).
    start_offset_frames: int = 0
    end_offset_frames: int = 0


@dataclass
class CTCAlignerConfig(FrameAlignerConfig):
    kind: str = "charCTC"              # "charCTC" | "subCTC"
    #: charCTC: the labels 1..V-1 as strings (label 0 is the blank). subCTC: empty (tokenizer ids + 1).
    vocab: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(f"aligner kind {self.kind!r} is not one of {KINDS}")


def char_ctc_config(**kw) -> CTCAlignerConfig:
    """Config of a charCTC aligner: blank, word separator ' ', apostrophe, a-z."""
    vocab = list(CHAR_ALPHABET)
    return CTCAlignerConfig(kind="charCTC", vocab=vocab, vocab_size=len(vocab) + 1, **kw)


def sub_ctc_config(tokenizer, **kw) -> CTCAlignerConfig:
    """Config of a subCTC aligner over ``tokenizer``'s vocabulary (label = token id + 1)."""
    return CTCAlignerConfig(kind="subCTC", vocab=[], vocab_size=len(tokenizer) + 1,
                            tokenizer=str(getattr(tokenizer, "name_or_path", "")), **kw)


class FrameTransformer(nn.Module):
    """Frozen-encoder frames ``(B, L, T, D)`` or ``(B, T, D)`` -> ``(B, T, d_model)``: learned softmax mix of
    the L layers, LayerNorm, linear adapter, pre-norm Transformer. Shared by the CTC and CIF aligners."""

    def __init__(self, input_dim: int, num_input_layers: int, d_model: int, layers: int, heads: int,
                 ff_mult: int, dropout: float):
        super().__init__()
        self.input_dim, self.num_input_layers = input_dim, num_input_layers
        self.layer_weights = nn.Parameter(torch.zeros(num_input_layers))
        self.in_norm = nn.LayerNorm(input_dim)
        self.in_proj = nn.Linear(input_dim, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff_mult * d_model, dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d_model)

    def mix_layers(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, L, T, D)`` -> ``(B, T, D)`` by the learned softmax layer weights; ``(B, T, D)`` passes."""
        if features.dim() == 3:
            features = features.unsqueeze(1)
        if features.shape[1] != self.num_input_layers:
            raise ModelError(f"aligner expects {self.num_input_layers} encoder layer(s), got {features.shape[1]}")
        if features.shape[-1] != self.input_dim:
            raise ModelError(f"aligner expects {self.input_dim}-dim frames, got {features.shape[-1]}")
        return torch.einsum("l,bltd->btd", self.layer_weights.softmax(0), features.float())

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.in_proj(self.in_norm(self.mix_layers(features)))       # (B, T, d_model)
        pad = None
        if lengths is not None:
            t = torch.arange(x.shape[1], device=x.device)
            pad = t[None, :] >= lengths.to(x.device)[:, None]            # (B, T) True = padding
        return self.out_norm(self.transformer(x, src_key_padding_mask=pad))


class FrameAligner(nn.Module):
    """An aligner model: its config and the :class:`FrameTransformer` ``body`` over the frames (the CTC and CIF
    aligners add their heads), saved as a folder by :func:`save_model_folder`."""

    def __init__(self, config: FrameAlignerConfig):
        super().__init__()
        self.config = config
        c = config
        self.body = FrameTransformer(c.input_dim, c.num_input_layers, c.d_model, c.layers, c.heads, c.ff_mult,
                                     c.dropout)

    @property
    def frame_rate_hz(self) -> float:
        return self.config.frame_rate_hz

    def save_pretrained(self, folder: str | Path, tokenizer=None) -> None:
        """Write ``folder`` atomically: config.json, model.safetensors (+ tokenizer/ for the subword kinds)."""
        save_model_folder(self, folder, tokenizer)


class CTCAligner(FrameAligner):
    """Encoder frames ``(B, L, T, D)`` or ``(B, T, D)`` -> CTC log-posteriors ``(B, T, V)``."""

    def __init__(self, config: CTCAlignerConfig):
        super().__init__(config)
        self.ctc_head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.ctc_head(self.body(features, lengths)).log_softmax(-1)     # (B, T, V)

    # ------------------------------------------------------------------ labels
    def text_to_labels(self, text: str) -> list[int]:
        """charCTC: normalised text (``CHAR_ALPHABET`` only) -> label ids (1-based)."""
        if self.config.kind != "charCTC":
            raise ModelError("text_to_labels is for charCTC; subCTC labels are token ids + 1")
        index = {ch: i + 1 for i, ch in enumerate(self.config.vocab)}
        return [index[ch] for ch in text if ch in index]

    def labels_to_text(self, labels: list[int]) -> str:
        """charCTC: label ids -> text."""
        return "".join(self.config.vocab[i - 1] for i in labels if 0 < i <= len(self.config.vocab))

    # ------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str = "cpu") -> CTCAligner:
        return load_model_folder(cls, CTCAlignerConfig, folder, map_location)

    @staticmethod
    def load_tokenizer(folder: str | Path):
        return load_folder_tokenizer(folder)


def read_folder_config(folder: str | Path) -> dict:
    """The ``config.json`` of an aligner folder (checked to hold weights too)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file() or not (folder / "model.safetensors").is_file():
        raise ModelError(f"{folder}: not an aligner folder (config.json and model.safetensors needed)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path}: invalid aligner config ({e})") from None


def save_model_folder(model: nn.Module, folder: str | Path, tokenizer=None) -> None:
    """``model.config`` (a dataclass) as config.json + weights as model.safetensors (+ tokenizer/), atomically."""
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(asdict(model.config), indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))


def load_model_folder(cls, config_cls, folder: str | Path, map_location: str = "cpu"):
    """Rebuild ``cls(config_cls(**config.json))`` and load model.safetensors (no code is executed)."""
    raw = read_folder_config(folder)
    try:
        config = config_cls(**raw)
    except TypeError as e:
        raise ModelError(f"{folder}/config.json: invalid aligner config ({e})") from None
    model = cls(config)
    weights = Path(folder) / "model.safetensors"
    try:
        model.load_state_dict(load_file(str(weights), device=map_location))
    except RuntimeError as e:
        raise ModelError(f"{weights}: weights do not match the config ({e})") from None
    return model.eval()


def load_folder_tokenizer(folder: str | Path):
    """The tokenizer saved inside an aligner folder (``folder/tokenizer``; subCTC and CIF)."""
    from transformers import AutoTokenizer

    path = Path(folder) / "tokenizer"
    if not path.is_dir():
        raise ModelError(f"{folder}: aligner folder has no tokenizer/")
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
