"""Training the speller (``speechlm.models.speller``) from text alone: the command line is tools/train_speller.py.

Every LLM vocabulary token with a spelling is one example: its decoded string, normalised as the charCTC
aligner's transcripts are (``alignment.tokens.normalize_for_alignment``), is the input, its row of the LLM's
input-embedding table the target. What the aligner emits between words is the word separator ' ': it is
the first label of a word's span of frames (a label owns the frames from its first emission up to the next
label; a token's boundary is the end of its last spoken character), so a word-initial token's span holds
the separator before its letters and the row's first token has none. The text side matches that: a token
whose decoded string starts with whitespace is spelled with a leading ' ' (when the alphabet has one).
Several tokens share one spelling ("The", "the" -> "the"; " the", " The" -> " the"), so accuracy is reported
as the exact id and as "the nearest row has the same spelling".

Loss: cross-entropy of a full softmax over the whole embedding table, logits = cosine / ``temperature``, plus
``cosine_weight * (1 - cosine)`` with the target row. The softmax compares directions about the table's mean row
(the raw rows share a large common part, mean pairwise cosine 0.44 for SmolLM2-135M, and a softmax over raw
cosines learnt several times slower in trials); the cosine term is on the raw rows, so the vector itself is
learnt too. The reported accuracies are by raw cosine, as the token analysis scores every read-out. Noise so that it transfers to heard speech: random
character substitutions, deletions and insertions (``noise`` per character, the three equally likely), the
leading separator added or dropped (``space_flip``), and soft inputs (``soft_prob`` of the spellings: each
character's one-hot gives up to ``soft_mass`` to a random peaky distribution over the alphabet). A seeded
``holdout`` share of the spellable tokens is never trained on; its accuracy (clean one-hot inputs) is the
measure of spelling unheard tokens (also on the common ones alone: the first :data:`COMMON_TOKENS` by id). Tokens
are drawn with a frequency prior (``frequency_prior``): a BPE vocabulary's ids follow its merge order, roughly
word frequency, and running speech is mostly common words.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alignment.tokens import CHAR_ALPHABET, normalize_for_alignment
from speechlm.errors import ConfigError
from speechlm.models.speller import Speller, SpellerConfig, one_hot_spellings, spelling_labels
from speechlm.schedule import lr_factor

log = logging.getLogger(__name__)
#: The first this many spellable tokens (by id) are "common": held-out accuracy is also reported on them alone.
COMMON_TOKENS = 10_000


@dataclass
class SpellerTrainConfig:
    """Model shape (the :class:`SpellerConfig` fields that are free) and the training settings."""

    d_model: int = 256
    layers: int = 2
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1
    max_chars: int = 64
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    temperature: float = 0.05
    cosine_weight: float = 1.0
    noise: float = 0.1
    space_flip: float = 0.05
    soft_prob: float = 0.5
    soft_mass: float = 0.4
    holdout: float = 0.05
    #: Sampling weight of the k-th spellable token (in id order: a BPE vocabulary's ids follow its merges, so
    #: roughly word frequency) is (k + 1) ** -frequency_prior: 0 = uniform; 0.5 gives the 10,000 first tokens
    #: about half of the draws, as running speech does, while every token still comes up.
    frequency_prior: float = 0.5
    eval_every: int = 500          # steps between accuracy checks (0 = only at the end)
    eval_tokens: int = 2000        # training tokens scored for the training accuracy (0 = all)
    seed: int = 0
    time_limit_s: float = 0.0      # stop after this many seconds of training (0 = no limit); the lr
    #                                decays by whichever of steps and time runs out first
    alphabet: list[str] = field(default_factory=lambda: list(CHAR_ALPHABET))

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"speller training: {name} must be positive, got {getattr(self, name)}")
        for name in ("noise", "space_flip", "soft_prob", "soft_mass", "holdout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"speller training: {name} must be in [0, 1), got {getattr(self, name)}")
        if self.frequency_prior < 0:
            raise ConfigError(f"speller training: frequency_prior must be >= 0, got {self.frequency_prior}")
        if self.temperature <= 0:
            raise ConfigError(f"speller training: temperature must be positive, got {self.temperature}")

    def model_config(self, d_llm: int, llm_name: str = "", llm_vocab_size: int = 0) -> SpellerConfig:
        return SpellerConfig(alphabet=list(self.alphabet), d_llm=d_llm, llm_name=llm_name,
                             llm_vocab_size=llm_vocab_size, d_model=self.d_model, layers=self.layers,
                             heads=self.heads, ff_mult=self.ff_mult, dropout=self.dropout, max_chars=self.max_chars)


# ------------------------------------------------------------------------------------- spellings
def piece_spelling(piece: str, alphabet: Sequence[str]) -> str:
    """A token's decoded string (with its leading space) -> its spelling in the aligner's alphabet ('' = none).

    Normalised between two letters, as inside running text (an apostrophe is kept only between letters, as
    in "it's"; a digit run is spelled out as its own words); trailing separators dropped, a leading one kept
    when the piece starts with whitespace (or a spelled-out number); characters outside ``alphabet`` dropped.
    """
    core = normalize_for_alignment("a" + piece + "a").text[1:-1]
    keep = set(alphabet)
    core = "".join(ch for ch in core.rstrip(" ") if ch in keep)
    return core if core.strip(" ") else ""


def token_spellings(tokenizer: Any, alphabet: Sequence[str], vocab_size: int | None = None) -> dict[int, str]:
    """``{token id: spelling}`` of every vocabulary token (ids below ``vocab_size``) with a non-empty spelling;
    special and added tokens are left out. Each token is decoded after the letter "a" so that a tokenizer that
    drops a lone token's leading space (SentencePiece) keeps it."""
    n = min(len(tokenizer), vocab_size) if vocab_size else len(tokenizer)
    skip = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    prefix_ids = list(tokenizer("a", add_special_tokens=False)["input_ids"])

    def dec(ids: list[list[int]]) -> list[str]:
        return tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    prefix = dec([prefix_ids])[0]
    ids = [i for i in range(n) if i not in skip]
    out: dict[int, str] = {}
    for s in range(0, len(ids), 4096):
        chunk = ids[s: s + 4096]
        for i, with_prefix, alone in zip(chunk, dec([prefix_ids + [i] for i in chunk]), dec([[i] for i in chunk]),
                                         strict=True):
            piece = with_prefix[len(prefix):] if with_prefix.startswith(prefix) else alone
            spelled = piece_spelling(piece, alphabet)
            if spelled:
                out[i] = spelled
    return out


def split_holdout(ids: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train ids, held-out ids): a seeded ``fraction`` of ``ids`` held out."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    k = round(len(order) * fraction)
    return sorted(order[k:]), sorted(order[:k])


def draw_epoch(ids: Sequence[int], prior: float, rng: random.Random) -> list[int]:
    """``len(ids)`` draws of ``ids`` (sorted): each once, shuffled, when ``prior`` is 0; else with replacement,
    the k-th id weighted ``(k + 1) ** -prior``."""
    order = sorted(ids)
    if prior <= 0:
        rng.shuffle(order)
        return order
    return rng.choices(order, weights=[(k + 1) ** -prior for k in range(len(order))], k=len(order))


def length_batches(ids: Sequence[int], lengths: dict[int, int], batch_size: int, rng: random.Random,
                   window: int = 32) -> list[list[int]]:
    """``ids`` (one epoch's draws, in order) in batches of similar spelling length (less padding): sorted by
    length within windows of ``window`` batches, cut, and the batches shuffled."""
    order = list(ids)
    batches: list[list[int]] = []
    for s in range(0, len(order), window * batch_size):
        chunk = sorted(order[s: s + window * batch_size], key=lambda i: lengths[i])
        batches += [chunk[k: k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------------- noise
def corrupt(labels: Sequence[int], num_labels: int, rng: random.Random, noise: float, space_flip: float,
            space: int | None) -> list[int]:
    """Random edits of a label spelling: each character substituted, deleted or followed by an inserted one with
    probability ``noise / 3`` each; the leading separator label ``space`` added or dropped with ``space_flip``.
    Never returns an empty spelling."""
    out: list[int] = []
    for x in labels:
        r = rng.random()
        if r < noise / 3:
            out.append(rng.randrange(1, num_labels))           # substitution
        elif r < 2 * noise / 3:
            pass                                                # deletion
        elif r < noise:
            out += [x, rng.randrange(1, num_labels)]           # insertion after it
        else:
            out.append(x)
    if space is not None and out and rng.random() < space_flip:
        out = out[1:] if out[0] == space else [space, *out]
    return out or list(labels)


def soften(chars: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, max_mass: float,
           generator: torch.Generator) -> torch.Tensor:
    """``chars`` (B, C, V) with the spellings of ``rows`` (B,) bool made soft: each character's one-hot gives a
    uniform random share (up to ``max_mass``) to a random peaky distribution over the non-blank labels."""
    b, c, v = chars.shape
    noise = torch.zeros(b, c, v)
    noise[..., 1:] = (3.0 * torch.randn(b, c, v - 1, generator=generator)).softmax(-1)
    mass = torch.rand(b, c, 1, generator=generator) * max_mass * rows.view(b, 1, 1) * mask.unsqueeze(-1)
    return chars * (1 - mass) + noise * mass


# ------------------------------------------------------------------------------------- loss and scores
def spelling_loss(pred: torch.Tensor, table_unit: torch.Tensor, targets: torch.Tensor, temperature: float,
                  cosine_weight: float, centre: torch.Tensor | None = None, centred_unit: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Full-softmax cross-entropy over the unit rows ``table_unit`` (V, d) with cosine / ``temperature`` logits,
    plus ``cosine_weight * (1 - cosine)`` with the target rows; and (ce, cosine, acc) of the batch. With ``centre``
    (the table's mean row) and ``centred_unit`` (the unit rows of table - centre) the softmax compares
    ``pred - centre`` with those; the cosine term stays on the raw rows."""
    q = F.normalize(pred.float(), dim=-1)
    qc, rows = (q, table_unit) if centre is None else (F.normalize(pred.float() - centre, dim=-1), centred_unit)
    logits = (qc @ rows.T) / temperature                      # (B, V): B x 49k floats, no chunks needed
    ce = F.cross_entropy(logits, targets)
    cos = (q * table_unit[targets]).sum(-1)
    loss = ce + cosine_weight * (1.0 - cos).mean()
    acc = float((logits.argmax(-1) == targets).float().mean())
    return loss, {"ce": ce.item(), "cosine": cos.mean().item(), "acc": acc}


@torch.no_grad()
def nearest_ids(model: Speller, labels: Sequence[Sequence[int]], table_unit: torch.Tensor, batch_size: int = 512,
                chunk: int = 8192) -> torch.Tensor:
    """Nearest table row (cosine) to the speller's vector of each clean one-hot spelling."""
    model.eval()
    out = []
    for s in range(0, len(labels), batch_size):
        chars, mask = one_hot_spellings(labels[s: s + batch_size], model.config.num_labels, model.config.max_chars)
        q = F.normalize(model(chars, mask).float(), dim=-1)
        best = torch.full((q.shape[0],), -math.inf)
        arg = torch.zeros(q.shape[0], dtype=torch.long)
        for r in range(0, table_unit.shape[0], chunk):
            val, idx = (q @ table_unit[r: r + chunk].T).max(-1)
            better = val > best
            best, arg = torch.where(better, val, best), torch.where(better, idx + r, arg)
        out.append(arg)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def spelling_accuracy(model: Speller, ids: Sequence[int], spellings: dict[int, str], table_unit: torch.Tensor
                      ) -> dict[str, float | int]:
    """Of the tokens ``ids`` spelled cleanly: ``exact`` (nearest row is the token) and ``same_spelling`` (nearest
    row is a token with the same spelling, e.g. "The" for "the")."""
    if not ids:
        return {"tokens": 0, "exact": float("nan"), "same_spelling": float("nan")}
    labels = [spelling_labels(spellings[i], model.config.alphabet) for i in ids]
    pred = nearest_ids(model, labels, table_unit).tolist()
    exact = sum(p == i for p, i in zip(pred, ids, strict=True))
    same = sum(spellings.get(p) == spellings[i] for p, i in zip(pred, ids, strict=True))
    return {"tokens": len(ids), "exact": exact / len(ids), "same_spelling": same / len(ids)}


# ------------------------------------------------------------------------------------- training
def train_speller(cfg: SpellerTrainConfig, table: torch.Tensor, tokenizer: Any, out: str | Path, llm_name: str = "",
                  tensorboard: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a speller on the vocabulary of ``tokenizer`` against ``table`` (V, d) and save it to ``out``
    (atomically, with the returned report as training.json)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    table = table.detach().float()
    table_unit = F.normalize(table, dim=-1)
    spellings = token_spellings(tokenizer, cfg.alphabet, table.shape[0])
    if not spellings:
        raise ConfigError("no vocabulary token has a spelling in the alphabet "
                          f"{''.join(cfg.alphabet)!r}: nothing to train the speller on")
    train_ids, held_ids = split_holdout(list(spellings), cfg.holdout, cfg.seed)
    labels = {i: spelling_labels(s, cfg.alphabet) for i, s in spellings.items()}
    common = set(sorted(spellings)[:COMMON_TOKENS])
    held_common = [i for i in held_ids if i in common]
    eval_train = train_ids if not cfg.eval_tokens else sorted(random.Random(cfg.seed + 1).sample(
        train_ids, min(cfg.eval_tokens, len(train_ids))))
    model = Speller(cfg.model_config(int(table.shape[1]), llm_name, int(table.shape[0])))
    model.init_output(table)
    centred_unit = F.normalize(table - table.mean(0), dim=-1)
    n_labels = model.config.num_labels
    space = cfg.alphabet.index(" ") + 1 if " " in cfg.alphabet else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard))
    history: list[dict[str, Any]] = []
    lengths = {i: len(x) for i, x in labels.items()}
    batches: list[list[int]] = []
    step = 0

    def score(at: int) -> dict[str, Any]:
        row = {"step": at, "train": spelling_accuracy(model, eval_train, spellings, table_unit),
               "held_out": spelling_accuracy(model, held_ids, spellings, table_unit),
               "held_out_common": spelling_accuracy(model, held_common, spellings, table_unit)}
        history.append(row)
        if writer is not None:
            for split in ("train", "held_out", "held_out_common"):
                for k in ("exact", "same_spelling"):
                    writer.add_scalar(f"{split}/{k}", row[split][k], at)
        model.train()
        return row

    def schedule_step(at: int, elapsed: float) -> int:
        """The step the learning-rate schedule is at: with a time limit, the elapsed share of it when further."""
        if not cfg.time_limit_s or at < cfg.warmup_steps:
            return at
        return max(at, int(cfg.steps * elapsed / cfg.time_limit_s))

    model.train()
    t_train = time.perf_counter()
    with tqdm(total=cfg.steps, desc="speller", unit="step", disable=not progress) as bar:
        for step in range(cfg.steps):
            if cfg.time_limit_s and time.perf_counter() - t_train > cfg.time_limit_s:
                log.warning("speller: time limit %.0f s reached after %d steps", cfg.time_limit_s, step)
                break
            if not batches:
                batches = length_batches(draw_epoch(train_ids, cfg.frequency_prior, rng), lengths, cfg.batch_size,
                                         rng)
            ids = batches.pop()
            seqs = [corrupt(labels[i], n_labels, rng, cfg.noise, cfg.space_flip, space) for i in ids]
            chars, mask = one_hot_spellings(seqs, n_labels, cfg.max_chars)
            soft_rows = torch.rand(len(ids), generator=gen) < cfg.soft_prob
            chars = soften(chars, mask, soft_rows, cfg.soft_mass, gen)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(schedule_step(step, time.perf_counter() - t_train), cfg.warmup_steps,
                                             cfg.steps, floor=0.05)
            loss, parts = spelling_loss(model(chars, mask), table_unit, torch.tensor(ids), cfg.temperature,
                                        cfg.cosine_weight, model.offset, centred_unit)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = loss.item()
            if writer is not None:
                writer.add_scalar("train/loss", value, step)
                for k, v in parts.items():
                    writer.add_scalar(f"train/batch_{k}", v, step)
            bar.set_postfix(loss=f"{value:.3f}", acc=f"{parts['acc']:.3f}")
            bar.update(1)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                score(step + 1)
        else:
            step = cfg.steps
    final = score(step)
    if writer is not None:
        writer.close()
    model.eval()
    report = {"llm": llm_name, "steps_done": step, "time_s": round(time.perf_counter() - t0, 1),
              "spellable_tokens": len(spellings), "distinct_spellings": len(set(spellings.values())),
              "train_tokens": len(train_ids), "held_out_tokens": len(held_ids),
              "train": final["train"], "held_out": final["held_out"], "held_out_common": final["held_out_common"],
              "history": history, "config": asdict(cfg)}
    model.save_pretrained(out, extra=report)
    return report


def aligner_alphabet(folder: str | Path) -> list[str]:
    """The labels 1..V-1 of the charCTC aligner saved in ``folder`` (what the speller reads)."""
    from alignment.ctc_model import read_folder_config
    from speechlm.errors import ModelError

    raw = read_folder_config(folder)
    vocab = raw.get("vocab")
    if raw.get("kind") != "charCTC" or not isinstance(vocab, list) or not vocab:
        raise ModelError(f"{folder}: a {raw.get('kind')!r} aligner; the speller reads a charCTC aligner's characters")
    return [str(c) for c in vocab]


def train_speller_for_llm(cfg: SpellerTrainConfig, llm: str, out: str | Path, aligner: str | Path | None = None,
                          tensorboard: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """:func:`train_speller` on the input-embedding table and tokenizer of ``llm`` (a folder; '' = the default),
    with the alphabet of the charCTC ``aligner`` folder when given."""
    from dataclasses import replace

    from speechlm.models.connectors.base import llm_identity
    from speechlm.training.build import load_llm_embeddings

    if aligner:
        cfg = replace(cfg, alphabet=aligner_alphabet(aligner))
    lm, tokenizer = load_llm_embeddings(llm)
    name, _, _ = llm_identity(lm)
    table = lm.get_input_embeddings().weight.detach().float()
    return train_speller(cfg, table, tokenizer, out, name, tensorboard, progress)
