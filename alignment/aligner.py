"""The alignment API: encoder frames (+ transcript) -> one boundary per LLM token, forced or free.

* **forced**: the transcript is known (training data); its labels are aligned to the CTC posteriors.
* **free**: no transcript (test time); the aligner decodes its own output (greedy or beam CTC), then
  aligns what it decoded exactly like a forced transcript. Results say which mode made them.

    aligner = Aligner.from_pretrained(folder, llm_tokenizer)
    results = aligner.align(features, lengths, texts=[text_or_None, ...], utt_ids=[...])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alignment.cif import CIFAligner
from alignment.ctc_model import CTCAligner
from alignment.decoders import DECODERS, LabelSpans
from alignment.kinds import AlignerKind, folder_kind, model_kind
from alignment.tokens import (
    normalize_for_alignment,
    token_boundaries,
    token_char_spans,
    words_from_char_spans,
)
from speechlm.data.boundaries import convert_boundaries
from speechlm.errors import AlignmentError, ModelError

MODES = ("forced", "free")


@dataclass
class WordAlignment:
    word: str
    start_s: float
    end_s: float


@dataclass
class AlignmentResult:
    utt_id: str
    text: str                      # the transcript aligned (forced: given; free: decoded)
    mode: str                      # "forced" | "free"
    words: list[WordAlignment]     # whitespace words of ``text`` that carry audio, in order
    token_ids: list[int]           # LLM tokens of ``text`` (no special tokens)
    token_boundaries: list[int]    # (N_tokens,) inclusive end frame per LLM token at ``frame_rate_hz``
    frame_rate_hz: float           # rate of ``token_boundaries`` (the connector encoder's)
    num_frames: int                # frames of the utterance at ``frame_rate_hz``
    score: float                   # mean log-probability of the alignment path (confidence)
    label_spans: LabelSpans        # the aligner's own label spans (aligner frame rate), for plots

    @property
    def token_end_s(self) -> list[float]:
        return [(b + 1) / self.frame_rate_hz for b in self.token_boundaries]


class Aligner:
    """An aligner model (charCTC, subCTC or CIF) + the LLM tokenizer whose tokens get boundaries
    (``llm_tokenizer=None``: word timings only).

    ``decoder`` and ``beam_size`` apply to the CTC models; CIF segments by its own firing.
    ``encoder_adapt``: the encoder adaptation the model was trained with (``recipes/train_aligner.py``
    ``encoder_adapt.*`` exports it as ``<folder>/encoder_adapt``); its frames then come from
    :meth:`load_encoder` (the adapted encoder), never from a cache of the frozen encoder's frames.
    """

    def __init__(self, model: CTCAligner | CIFAligner, llm_tokenizer, decoder: str = "ctc_segmentation",
                 sub_tokenizer=None, beam_size: int = 0, device: str | torch.device = "cpu",
                 encoder_adapt: str | Path | None = None):
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
        self.kind: AlignerKind = model_kind(model)
        if self.kind.uses_tokenizer and sub_tokenizer is None:
            raise ModelError(f"a {self.kind.name} aligner needs the tokenizer it was trained with (sub_tokenizer)")
        self.model = model.to(device).eval()
        self.llm_tokenizer = llm_tokenizer
        self.sub_tokenizer = sub_tokenizer
        self.decoder = decoder
        self.beam_size = beam_size
        self.device = torch.device(device)
        self.encoder_adapt = Path(encoder_adapt) if encoder_adapt else None

    @classmethod
    def from_pretrained(cls, folder: str | Path, llm_tokenizer, **kw) -> Aligner:
        """The aligner saved in ``folder`` (with the encoder adaptation saved beside it, if any)."""
        kind = folder_kind(folder)
        model = kind.load(folder)
        sub = kind.load_tokenizer(folder)
        adapt = Path(folder) / ENCODER_ADAPT_DIR
        kw.setdefault("encoder_adapt", adapt if adapt.is_dir() else None)
        return cls(model, llm_tokenizer, sub_tokenizer=sub, **kw)

    def load_encoder(self, encoder_path: str | Path = ""):
        """The speech encoder whose frames this aligner reads: ``encoder_path`` (default: the one the model
        names) with the layers it was trained on and, frozen, the adaptation it was trained with."""
        from speechlm.models.encoder import SpeechEncoder

        c = self.model.config
        encoder = SpeechEncoder(str(encoder_path or c.encoder_name), layers=c.encoder_layers)
        check_encoder(self.model, encoder)
        if self.encoder_adapt is not None:
            encoder.adapt({"train": False}, folder=self.encoder_adapt)
        return encoder

    @property
    def frame_rate_hz(self) -> float:
        return self.model.frame_rate_hz

    @torch.no_grad()
    def frame_outputs(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, L, T, D)`` frames -> per-frame model output (CPU): CTC ``(B, T, V)`` log-posteriors,
        CIF ``(B, T, 1 + d)`` firing weight and hidden state."""
        features, lengths = features.to(self.device), lengths.to(self.device)
        return self.kind.frame_outputs(self.model, features, lengths).float().cpu()

    def align(self, features: torch.Tensor, lengths: torch.Tensor, texts: Sequence[str | None],
              utt_ids: Sequence[str] | None = None, target_frame_rate_hz: float | None = None,
              target_num_frames: Sequence[int] | None = None) -> list[AlignmentResult]:
        """Align a batch. ``texts[i] = None`` means free mode for utterance i.

        ``target_frame_rate_hz`` / ``target_num_frames``: the connector encoder's frame rate and each
        utterance's frame count there (default: the aligner's own frames).
        """
        lp = self.frame_outputs(features, lengths)
        ids = list(utt_ids) if utt_ids is not None else [str(i) for i in range(len(texts))]
        out = []
        for i, text in enumerate(texts):
            t = int(lengths[i])
            n_target = None if target_num_frames is None else int(target_num_frames[i])
            out.append(self.align_posteriors(lp[i, :t], text, ids[i], target_frame_rate_hz, n_target))
        return out

    def align_posteriors(self, log_probs: torch.Tensor, text: str | None, utt_id: str = "?",
                         target_frame_rate_hz: float | None = None, target_num_frames: int | None = None
                         ) -> AlignmentResult:
        """One utterance's frame outputs (:meth:`frame_outputs`, ``(T, ...)``) + transcript, or None
        for free mode -> result."""
        mode = "forced" if text is not None else "free"
        if text is None:
            text = self.decode(log_probs)
            if not normalize_for_alignment(text).text:
                raise AlignmentError(f"utterance {utt_id!r}: free mode decoded no speech")
        char_start, char_end, spans = self._char_frames(log_probs, text, utt_id)
        return build_result(utt_id, text, mode, char_start, char_end, spans, self.llm_tokenizer,
                            target_frame_rate_hz, target_num_frames)

    def decode(self, log_probs: torch.Tensor) -> str:
        """Free mode: the aligner's own transcript of one utterance's frame outputs."""
        return self.kind.decode(self.model, log_probs, self.sub_tokenizer, self.beam_size)

    def _char_frames(self, log_probs: torch.Tensor, text: str, utt_id: str
                     ) -> tuple[list[int | None], list[int | None], LabelSpans]:
        """Start/end aligner frame of every character of ``text`` (None: not spoken), calibrated."""
        starts, ends, spans = self._raw_char_frames(log_probs, text, utt_id)
        c = self.model.config
        if c.start_offset_frames or c.end_offset_frames:
            last = spans.num_frames - 1
            for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
                if a is not None and b is not None:
                    starts[i] = min(max(a + c.start_offset_frames, 0), last)
                    ends[i] = min(max(b + c.end_offset_frames, starts[i]), last)
        return starts, ends, spans

    def _raw_char_frames(self, log_probs: torch.Tensor, text: str, utt_id: str
                         ) -> tuple[list[int | None], list[int | None], LabelSpans]:
        if not normalize_for_alignment(text).text:
            raise AlignmentError(f"utterance {utt_id!r}: transcript {text!r} has nothing to speak")
        return self.kind.char_frames(self.model, log_probs, text, self.sub_tokenizer, self.decoder, utt_id)

    def align_waves(self, encoder, waves: Sequence[torch.Tensor], texts: Sequence[str | None],
                    utt_ids: Sequence[str] | None = None, **kw) -> list[AlignmentResult]:
        """Run the (matching) encoder on 1-D waveforms, then :meth:`align` (:meth:`load_encoder` gives it)."""
        check_encoder(self.model, encoder)
        if self.encoder_adapt is not None and not encoder.adapted:
            raise ModelError(f"this aligner was trained with an adapted encoder ({self.encoder_adapt}); "
                             "encoder has no adaptation: use Aligner.load_encoder()")
        with torch.no_grad():
            enc = encoder(list(waves))
        return self.align(enc.features, enc.lengths, texts, utt_ids, **kw)


#: Where recipes/train_aligner.py saves an encoder adaptation trained with the aligner, inside its folder.
ENCODER_ADAPT_DIR = "encoder_adapt"


def load_aligner_model(folder: str | Path) -> CTCAligner | CIFAligner:
    """The aligner model in ``folder`` (charCTC, subCTC or CIF, by its config's ``kind``)."""
    return folder_kind(folder).load(folder)


def check_encoder(model: CTCAligner | CIFAligner, encoder) -> None:
    """Raise :class:`ModelError` unless ``encoder`` yields the frames ``model`` was trained on."""
    c = model.config
    if abs(float(encoder.frame_rate_hz) - c.frame_rate_hz) > 1e-6 or int(encoder.hidden_size) != c.input_dim \
            or len(encoder.layers) != c.num_input_layers:
        raise ModelError(
            f"aligner trained on {c.encoder_name!r} ({c.input_dim}-dim, {c.num_input_layers} layer(s), "
            f"{c.frame_rate_hz} Hz) cannot use encoder {encoder.name!r} ({encoder.hidden_size}-dim, "
            f"{len(encoder.layers)} layer(s), {encoder.frame_rate_hz} Hz)")


def build_result(utt_id: str, text: str, mode: str, char_start: Sequence[int | None],
                 char_end: Sequence[int | None], spans: LabelSpans, llm_tokenizer,
                 target_frame_rate_hz: float | None = None, target_num_frames: int | None = None
                 ) -> AlignmentResult:
    """Character frames (aligner rate) -> :class:`AlignmentResult` with LLM-token boundaries at the target rate."""
    num_frames, rate = spans.num_frames, spans.frame_rate_hz
    to_hz = target_frame_rate_hz or rate
    n_target = target_num_frames or max(1, int(np.ceil(num_frames * to_hz / rate - 1e-6)))
    llm_ids, bounds = [], []
    if llm_tokenizer is not None:  # None: word timings only
        llm_ids, llm_spans = token_char_spans(llm_tokenizer, text)
        bounds = token_boundaries(llm_spans, char_start, char_end, num_frames)
        bounds = convert_boundaries(bounds, rate, to_hz, n_target)
    words = [WordAlignment(*w) for w in words_from_char_spans(text, char_start, char_end, rate) if w is not None]
    return AlignmentResult(utt_id, text, mode, words, llm_ids, bounds, to_hz, n_target, spans.score, spans)
