"""Alignment accuracy against reference word timings: boundary error (ms), share within 20/50 ms, CER, RTF."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from alignment.tokens import normalize_for_alignment


@dataclass
class BoundaryErrors:
    """Signed errors (predicted - reference, seconds) of matched words' start and end times."""

    start: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    words_ref: int = 0
    words_matched: int = 0

    def extend(self, other: BoundaryErrors) -> None:
        self.start += other.start
        self.end += other.end
        self.words_ref += other.words_ref
        self.words_matched += other.words_matched

    def summary(self) -> dict:
        """MAE in ms (start, end, both), share of boundaries within 20 and 50 ms, match rate."""
        both = np.abs(np.asarray(self.start + self.end))
        if both.size == 0:
            return {"boundaries": 0, "mae_ms": None, "within_20ms": None, "within_50ms": None,
                    "words_ref": self.words_ref, "words_matched": 0}
        return {
            "boundaries": int(both.size),
            "mae_ms": float(both.mean() * 1000),
            "start_mae_ms": float(np.mean(np.abs(self.start)) * 1000),
            "end_mae_ms": float(np.mean(np.abs(self.end)) * 1000),
            "start_bias_ms": float(np.mean(self.start) * 1000),
            "end_bias_ms": float(np.mean(self.end) * 1000),
            "median_ms": float(np.median(both) * 1000),
            "within_20ms": float((both <= 0.020 + 1e-9).mean()),
            "within_50ms": float((both <= 0.050 + 1e-9).mean()),
            "words_ref": self.words_ref,
            "words_matched": self.words_matched,
        }


def _key(word: str) -> str:
    # one token per whitespace word, also when normalisation splits it ("eighty-three")
    return normalize_for_alignment(word).text.replace(" ", "_")


def matched_pairs(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[int, int]]:
    """Index pairs of equal words in a minimum-edit-distance alignment of two word lists.

    Among alignments with the fewest edits (substitution, insertion, deletion: 1 each) the one with
    the most matches wins. Unlike a longest common subsequence, a match never costs a long run of
    insertions and deletions, so a frequent word ("the") is not paired with a copy seconds away.
    """
    n, m = len(ref), len(hyp)
    # cost[i][j] = (edits, -matches) of aligning ref[i:] with hyp[j:]
    cost = [[(0, 0)] * (m + 1) for _ in range(n + 1)]
    for i in range(n, -1, -1):
        for j in range(m, -1, -1):
            if i == n or j == m:
                cost[i][j] = ((n - i) + (m - j), 0)
                continue
            e, k = cost[i + 1][j + 1]
            diag = (e, k - 1) if ref[i] == hyp[j] else (e + 1, k)
            down, right = cost[i + 1][j], cost[i][j + 1]
            cost[i][j] = min(diag, (down[0] + 1, down[1]), (right[0] + 1, right[1]))
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        e, k = cost[i + 1][j + 1]
        diag = (e, k - 1) if ref[i] == hyp[j] else (e + 1, k)
        if cost[i][j] == diag:
            if ref[i] == hyp[j]:
                pairs.append((i, j))
            i, j = i + 1, j + 1
        elif cost[i][j] == (cost[i + 1][j][0] + 1, cost[i + 1][j][1]):
            i += 1
        else:
            j += 1
    return pairs


def word_boundary_errors(reference: Sequence[tuple[str, float, float]],
                         predicted: Sequence[tuple[str, float, float]]) -> BoundaryErrors:
    """Match predicted words to reference words by their normalised spelling, then compare times.

    In forced mode the word sequences are the same; in free mode only words paired as equal by
    :func:`matched_pairs` are scored; ``words_matched`` says how many.
    """
    ref = [(w, s, e) for w, s, e in reference if _key(w)]
    hyp = [(w, s, e) for w, s, e in predicted if _key(w)]
    out = BoundaryErrors(words_ref=len(ref))
    for i, j in matched_pairs([_key(w) for w, _, _ in ref], [_key(w) for w, _, _ in hyp]):
        out.start.append(hyp[j][1] - ref[i][1])
        out.end.append(hyp[j][2] - ref[i][2])
        out.words_matched += 1
    return out


def median_offsets_frames(errors: BoundaryErrors, frame_rate_hz: float) -> tuple[int, int]:
    """Whole-frame shifts that best undo a constant bias: ``-median(error)`` for starts and for ends."""
    if not errors.start:
        return 0, 0
    return (round(-float(np.median(errors.start)) * frame_rate_hz),
            round(-float(np.median(errors.end)) * frame_rate_hz))


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """CER (jiwer) of normalised texts, the aligner's own alphabet: lower-case letters, apostrophe, space."""
    import jiwer

    refs = [normalize_for_alignment(r).text for r in references]
    hyps = [normalize_for_alignment(h).text for h in hypotheses]
    keep = [(r, h) for r, h in zip(refs, hyps) if r]
    if not keep:
        return float("nan")
    return float(jiwer.cer([r for r, _ in keep], [h for _, h in keep]))


@dataclass
class SpeedMeter:
    """Real-time factor: processing seconds per second of audio (lower is faster)."""

    audio_s: float = 0.0
    compute_s: float = 0.0

    def add(self, audio_s: float, compute_s: float) -> None:
        self.audio_s += audio_s
        self.compute_s += compute_s

    @property
    def rtf(self) -> float:
        return self.compute_s / self.audio_s if self.audio_s else float("nan")

    def summary(self) -> dict:
        return {**asdict(self), "rtf": self.rtf}
