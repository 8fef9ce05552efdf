"""Label boundaries from CTC log-posteriors: CTC segmentation (default) or Viterbi forced alignment.

Both decoders take one utterance's log-posteriors ``(T, V)`` (log-softmax, blank = 0) and a label
sequence, and return :class:`LabelSpans`: for label i, the first frame it is emitted
(``start_frames``) and its last frame (``end_frames``, inclusive). A label owns the frames from its
first emission up to the frame before the next label starts (the blanks after a CTC spike belong to
the label that spiked); the last label ends at its last emitted frame.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from speechlm.errors import AlignmentError

BLANK = 0
DECODERS = ("ctc_segmentation", "forced_align")


@dataclass
class LabelSpans:
    labels: list[int]             # (N,) label ids (blank excluded)
    start_frames: np.ndarray      # (N,) int, first frame of label i
    end_frames: np.ndarray        # (N,) int, last frame of label i (inclusive)
    frame_rate_hz: float
    num_frames: int               # T of the posteriors
    score: float                  # mean log-probability per frame of the path (higher is better)

    def seconds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(start_s, end_s)`` of each label; the end is the end instant of its last frame."""
        return self.start_frames / self.frame_rate_hz, (self.end_frames + 1) / self.frame_rate_hz


def min_frames_needed(labels: Sequence[int], decoder: str) -> int:
    """Frames CTC needs for ``labels``: one per label plus one blank between equal neighbours."""
    repeats = sum(1 for a, b in itertools.pairwise(labels) if a == b)
    return len(labels) + repeats


def _check_lengths(log_probs: np.ndarray | torch.Tensor, labels: Sequence[int], decoder: str, utt_id: str
                   ) -> None:
    if len(labels) == 0:
        raise AlignmentError(f"utterance {utt_id!r}: empty label sequence, nothing to align")
    if any(int(x) == BLANK for x in labels):
        raise AlignmentError(f"utterance {utt_id!r}: label sequence contains the blank label {BLANK}")
    need = min_frames_needed(labels, decoder)
    if log_probs.shape[0] < need:
        raise AlignmentError(
            f"utterance {utt_id!r}: audio is shorter than its text ({log_probs.shape[0]} frames for "
            f"{len(labels)} labels; {decoder} needs at least {need})")


def _spans_from_starts(labels: list[int], starts: np.ndarray, last_end: int, frame_rate_hz: float,
                       num_frames: int, score: float) -> LabelSpans:
    starts = starts.astype(np.int64)
    ends = np.empty_like(starts)
    ends[:-1] = np.maximum(starts[1:] - 1, starts[:-1])
    ends[-1] = max(last_end, int(starts[-1]))
    return LabelSpans(labels, starts, ends, frame_rate_hz, num_frames, score)


def align_ctc_segmentation(log_probs: np.ndarray | torch.Tensor, labels: Sequence[int], frame_rate_hz: float,
                           utt_id: str = "?") -> LabelSpans:
    """CTC segmentation (Kürzinger et al. 2020) of ``labels`` in ``log_probs (T, V)``; CPU, unbatched.

    Three departures from the package's ``prepare_token_list`` recipe, each checked against a
    synthetic posterior with a known path: (1) the label matrix is ``[start, labels..., blank]``
    with a blank only between equal neighbours (the package lets "ll" share one spike otherwise);
    (2) one pure-blank frame is added before and after the posteriors, because the package's start
    state always holds frame 0 and the closing blank needs a frame of its own, and removed again
    from the timings; (3) the preamble (leading silence) is scored as blank, not free, so a label
    starts at its first spike frame instead of its last.
    """
    import ctc_segmentation as cs

    lpz = log_probs.detach().float().cpu().numpy() if isinstance(log_probs, torch.Tensor) \
        else np.asarray(log_probs, dtype=np.float32)
    labels = [int(x) for x in labels]
    _check_lengths(lpz, labels, "ctc_segmentation", utt_id)
    num_frames, vocab = lpz.shape
    pad = np.full((1, vocab), -1e10, dtype=np.float32)
    pad[0, BLANK] = 0.0
    lpz_padded = np.concatenate([pad, lpz, pad]).astype(np.float32)
    # index_duration = 1 makes the package's "seconds" frame indices; we convert ourselves.
    config = cs.CtcSegmentationParameters(index_duration=1.0, blank=BLANK,
                                          char_list=[str(i) for i in range(vocab)],
                                          preamble_transition_cost_zero=False)
    rows = [-1]
    label_rows = []
    for k, x in enumerate(labels):
        if k > 0 and x == labels[k - 1]:
            rows.append(BLANK)
        label_rows.append(len(rows))
        rows.append(x)
    rows.append(BLANK)
    ground_truth = np.asarray(rows, dtype=np.int64).reshape(-1, 1)
    try:
        timings, char_probs, _ = cs.ctc_segmentation(config, lpz_padded, ground_truth)
    except (AssertionError, IndexError) as e:
        raise AlignmentError(f"utterance {utt_id!r}: ctc-segmentation failed ({e})") from None
    timings = np.rint(np.asarray(timings)).astype(np.int64) - 1       # undo the leading pad frame
    starts = np.clip(timings[label_rows], 0, num_frames - 1)
    # The closing blank starts right after the last label's frames.
    last_end = int(np.clip(timings[-1] - 1, 0, num_frames - 1))
    score = float(np.mean(char_probs[1:-1]))
    return _spans_from_starts(labels, starts, last_end, frame_rate_hz, num_frames, score)


def align_forced(log_probs: np.ndarray | torch.Tensor, labels: Sequence[int], frame_rate_hz: float,
                 utt_id: str = "?") -> LabelSpans:
    """Viterbi forced alignment with ``torchaudio.functional.forced_align`` (+ ``merge_tokens``)."""
    import torchaudio.functional as AF

    lp = torch.as_tensor(log_probs).detach().float().cpu()
    labels = [int(x) for x in labels]
    _check_lengths(lp, labels, "forced_align", utt_id)
    targets = torch.tensor([labels], dtype=torch.int32)
    try:
        path, scores = AF.forced_align(lp.unsqueeze(0), targets, blank=BLANK)
    except RuntimeError as e:
        raise AlignmentError(f"utterance {utt_id!r}: forced alignment failed ({e})") from None
    spans = AF.merge_tokens(path[0], scores[0].exp(), blank=BLANK)
    if len(spans) != len(labels):
        raise AlignmentError(f"utterance {utt_id!r}: forced alignment returned {len(spans)} spans for "
                             f"{len(labels)} labels")
    starts = np.array([s.start for s in spans], dtype=np.int64)
    score = float(scores[0].mean())
    return _spans_from_starts(labels, starts, spans[-1].end - 1, frame_rate_hz, lp.shape[0], score)


def align_labels(log_probs: np.ndarray | torch.Tensor, labels: Sequence[int], frame_rate_hz: float,
                 decoder: str = "ctc_segmentation", utt_id: str = "?") -> LabelSpans:
    """Dispatch to one of :data:`DECODERS`."""
    if decoder == "ctc_segmentation":
        return align_ctc_segmentation(log_probs, labels, frame_rate_hz, utt_id)
    if decoder == "forced_align":
        return align_forced(log_probs, labels, frame_rate_hz, utt_id)
    raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")


def greedy_decode(log_probs: np.ndarray | torch.Tensor) -> list[int]:
    """Best path ``(T, V)`` -> labels: argmax per frame, repeats collapsed, blanks removed."""
    best = torch.as_tensor(log_probs).argmax(-1).tolist()
    out: list[int] = []
    prev = BLANK
    for x in best:
        if x != prev and x != BLANK:
            out.append(int(x))
        prev = x
    return out


def beam_decode(log_probs: np.ndarray | torch.Tensor, beam_size: int = 8) -> list[int]:
    """CTC prefix beam search without a language model (``beam_size`` prefixes kept per frame)."""
    lp = torch.as_tensor(log_probs).detach().float().cpu()
    top_k = min(lp.shape[1], beam_size + 1)
    # prefix -> (log P ending in blank, log P ending in non-blank)
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -np.inf)}
    for t in range(lp.shape[0]):
        row = lp[t]
        cand = set(row.topk(top_k).indices.tolist()) | {BLANK}
        nxt: dict[tuple[int, ...], list[float]] = {}

        def add(prefix: tuple[int, ...], pb: float, pnb: float, nxt: dict = nxt) -> None:
            cur = nxt.setdefault(prefix, [-np.inf, -np.inf])
            cur[0] = np.logaddexp(cur[0], pb)
            cur[1] = np.logaddexp(cur[1], pnb)

        for prefix, (pb, pnb) in beams.items():
            total = np.logaddexp(pb, pnb)
            for c in cand:
                p = float(row[c])
                if c == BLANK:
                    add(prefix, total + p, -np.inf)
                elif prefix and prefix[-1] == c:
                    add(prefix, -np.inf, pnb + p)           # repeat without blank: same prefix
                    add(prefix + (c,), -np.inf, pb + p)     # blank in between: a new label
                else:
                    add(prefix + (c,), -np.inf, total + p)
        beams = dict(sorted(((k, (v[0], v[1])) for k, v in nxt.items()),
                            key=lambda kv: -np.logaddexp(*kv[1]))[:beam_size])
    best = max(beams.items(), key=lambda kv: np.logaddexp(*kv[1]))[0]
    return list(best)
