"""The aligner kinds (charCTC, subCTC, CIF) as classes: everything that differs between them (model, decoding,
character frames, training targets and loss, what is saved); :func:`kind_of` picks one from a config's ``kind``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from alignment.cif import CIFAligner, cif_config, cif_loss, cif_spans
from alignment.ctc_model import (
    CTCAligner,
    char_ctc_config,
    load_folder_tokenizer,
    read_folder_config,
    sub_ctc_config,
)
from alignment.decoders import LabelSpans, align_labels, beam_decode, greedy_decode
from alignment.tokens import char_spans_from_normalized, normalize_for_alignment, token_char_spans
from speechlm.errors import AlignmentError, ModelError

CharFrames = tuple[list[int | None], list[int | None], LabelSpans]


class AlignerKind:
    """One kind of aligner. Subclasses fill in the model class, the tokenizer need and the five behaviours."""

    name: ClassVar[str] = ""
    model_class: ClassVar[type[nn.Module]] = CTCAligner
    #: Whether the kind's labels are subword tokens: its folder then holds ``tokenizer/`` and the aligner needs it.
    uses_tokenizer: ClassVar[bool] = True

    # ------------------------------------------------------------------ model and folder
    def build(self, tokenizer, **common: Any) -> nn.Module:
        """A new model with this kind's head; ``common``: the frame Transformer and encoder fields."""
        raise NotImplementedError

    def load(self, folder: str | Path) -> nn.Module:
        return self.model_class.from_pretrained(folder)

    def load_tokenizer(self, folder: str | Path):
        """The tokenizer saved with the model (None for a kind without one)."""
        return load_folder_tokenizer(folder) if self.uses_tokenizer else None

    def save(self, model: nn.Module, folder: str | Path, tokenizer) -> None:
        """The model folder (config.json + model.safetensors), with ``tokenizer/`` for a subword kind."""
        model.save_pretrained(folder, tokenizer=tokenizer if self.uses_tokenizer else None)

    # ------------------------------------------------------------------ inference
    def frame_outputs(self, model: nn.Module, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Per-frame model output ``(B, T, ...)``: CTC log-posteriors (CIF overrides)."""
        return model(features, lengths)

    def decode(self, model: nn.Module, outputs: torch.Tensor, tokenizer, beam_size: int) -> str:
        """Free mode: the model's own transcript of one utterance's frame outputs ``(T, ...)``."""
        raise NotImplementedError

    def char_frames(self, model: nn.Module, outputs: torch.Tensor, text: str, tokenizer, decoder: str,
                    utt_id: str) -> CharFrames:
        """Start/end aligner frame of every character of ``text`` (None: not spoken), uncalibrated, and the
        model's own label spans."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def targets(self, model: nn.Module, text: str, tokenizer) -> list[int]:
        """The training labels of one transcript."""
        raise NotImplementedError

    def loss(self, model: nn.Module, features: torch.Tensor, lengths: torch.Tensor, labels: list[list[int]],
             quantity_weight: float) -> torch.Tensor:
        """The training loss of a batch; CTC kinds: mean CTC loss (blank 0, infinite losses zeroed)."""
        lp = model(features, lengths)                                     # (B, T, V)
        targets = torch.tensor([x for lab in labels for x in lab], dtype=torch.long, device=features.device)
        target_lengths = torch.tensor([len(lab) for lab in labels], device=features.device)
        ctc = nn.CTCLoss(blank=0, zero_infinity=True)
        return ctc(lp.transpose(0, 1), targets, lengths, target_lengths)


class CharCTC(AlignerKind):
    """CTC over characters (``CHAR_ALPHABET``): needs no tokenizer."""

    name = "charCTC"
    uses_tokenizer = False

    def build(self, tokenizer, **common: Any) -> nn.Module:
        return CTCAligner(char_ctc_config(**common))

    def decode(self, model, outputs, tokenizer, beam_size):
        labels = _ctc_labels(outputs, beam_size)
        return " ".join(model.labels_to_text(labels).split())

    def char_frames(self, model, outputs, text, tokenizer, decoder, utt_id):
        norm = normalize_for_alignment(text)
        labels = model.text_to_labels(norm.text)
        spans = align_labels(outputs, labels, model.frame_rate_hz, decoder, utt_id)
        starts, ends = char_spans_from_normalized(norm, len(text), spans.start_frames, spans.end_frames)
        return starts, ends, spans

    def targets(self, model, text, tokenizer):
        return model.text_to_labels(normalize_for_alignment(text).text)


class SubCTC(AlignerKind):
    """CTC over the subword tokens of a tokenizer (label = token id + 1; 0 is the blank)."""

    name = "subCTC"

    def build(self, tokenizer, **common: Any) -> nn.Module:
        return CTCAligner(sub_ctc_config(tokenizer, **common))

    def decode(self, model, outputs, tokenizer, beam_size):
        labels = _ctc_labels(outputs, beam_size)
        return tokenizer.decode([x - 1 for x in labels], skip_special_tokens=True).strip()

    def char_frames(self, model, outputs, text, tokenizer, decoder, utt_id):
        sub_ids, sub_spans = token_char_spans(tokenizer, text)
        spans = align_labels(outputs, [x + 1 for x in sub_ids], model.frame_rate_hz, decoder, utt_id)
        starts, ends = subword_char_frames(text, sub_spans, spans)
        return starts, ends, spans

    def targets(self, model, text, tokenizer):
        return [i + 1 for i in _token_ids(tokenizer, text)]


class CIF(AlignerKind):
    """Continuous integrate-and-fire over subword tokens: segments by its own firing (no CTC decoder)."""

    name = "CIF"
    model_class = CIFAligner

    def build(self, tokenizer, **common: Any) -> nn.Module:
        return CIFAligner(cif_config(tokenizer, **common))

    def frame_outputs(self, model, features, lengths):
        return model.frame_outputs(features, lengths)

    def decode(self, model, outputs, tokenizer, beam_size):
        try:
            _, vectors = cif_spans(outputs, None, model.config)
        except AlignmentError:
            return ""
        with torch.no_grad():
            ids = model.token_head(vectors).argmax(-1).tolist()
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    def char_frames(self, model, outputs, text, tokenizer, decoder, utt_id):
        sub_ids, sub_spans = token_char_spans(tokenizer, text)
        spans, _ = cif_spans(outputs, len(sub_ids), model.config, utt_id)
        spans.labels = list(sub_ids)
        starts, ends = subword_char_frames(text, sub_spans, spans)
        return starts, ends, spans

    def targets(self, model, text, tokenizer):
        return _token_ids(tokenizer, text)

    def loss(self, model, features, lengths, labels, quantity_weight):
        loss, _ = cif_loss(model, features, lengths, labels, quantity_weight)
        return loss


#: Every kind by its config name (the ``kind`` of an aligner's config.json and of ``model.kind``).
KINDS: dict[str, AlignerKind] = {k.name: k for k in (CharCTC(), SubCTC(), CIF())}


def kind_of(name: str) -> AlignerKind:
    """The kind called ``name``; ModelError for an unknown one."""
    try:
        return KINDS[name]
    except KeyError:
        raise ModelError(f"aligner kind {name!r} is not one of {tuple(KINDS)}") from None


def model_kind(model: nn.Module) -> AlignerKind:
    """The kind of an aligner model (by its config)."""
    return kind_of(model.config.kind)


def folder_kind(folder: str | Path) -> AlignerKind:
    """The kind of the aligner saved in ``folder``: its config.json's ``kind`` (charCTC when absent, as the
    first aligner folders were written)."""
    return kind_of(read_folder_config(folder).get("kind") or "charCTC")


def _ctc_labels(log_probs: torch.Tensor, beam_size: int) -> list[int]:
    return beam_decode(log_probs, beam_size) if beam_size > 1 else greedy_decode(log_probs)


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def subword_char_frames(text: str, sub_spans, spans: LabelSpans) -> tuple[list[int | None], list[int | None]]:
    """Subword label spans -> frames of each spoken character (a subword's frames go to all its characters)."""
    spoken = {s for s in normalize_for_alignment(text).source if s >= 0}
    starts: list[int | None] = [None] * len(text)
    ends: list[int | None] = [None] * len(text)
    for k, (a, b) in enumerate(sub_spans):
        for c in range(a, b):
            if c in spoken:
                starts[c], ends[c] = int(spans.start_frames[k]), int(spans.end_frames[k])
    return starts, ends
