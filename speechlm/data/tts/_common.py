"""What every synthesis engine shares: the result type, the error, argument checks, the silence margins,
and the mapping of an engine's own words back to the whitespace words of the text."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from speechlm.data.audio import resample
from speechlm.data.manifest import WordTiming
from speechlm.errors import SpeechLMError


class SynthesisError(SpeechLMError):
    """Text cannot be synthesized (empty text, unknown voice or engine, engine missing or failing)."""


#: Silence kept before the first spoken word and after the last one, seconds (every engine).
LEAD_S = 0.10
TAIL_S = 0.15

RATE_RANGE = (80, 450)  # words per minute, eSpeak's range; 175 = every engine's own pace
PITCH_RANGE = (0, 100)  # 50 = the voice's own pitch
#: Pitch 0 / 100 move an engine's F0 target this many semitones down / up (engines with a control).
PITCH_SEMITONES = 6.0


@dataclass
class Synthesis:
    wave: torch.Tensor  # (T,) float32 in [-1, 1] at sample_rate
    sample_rate: int
    #: One timing per whitespace word of the text; None when the engine gives no timings.
    words: list[WordTiming] | None
    engine: str = "espeak"
    voice: str = ""  # "engine:name"


def check_args(text: str, rate_wpm: int, pitch: int) -> None:
    if not text or not text.strip():
        raise SynthesisError("cannot synthesize empty text")
    if not RATE_RANGE[0] <= rate_wpm <= RATE_RANGE[1]:
        raise SynthesisError(f"rate_wpm must be in [{RATE_RANGE[0]}, {RATE_RANGE[1]}], got {rate_wpm}")
    if not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
        raise SynthesisError(f"pitch must be in [{PITCH_RANGE[0]}, {PITCH_RANGE[1]}], got {pitch}")


def duration_factor(rate_wpm: int) -> float:
    """How much longer than the engine's own pace (175 wpm) speech at ``rate_wpm`` lasts."""
    return 175.0 / float(rate_wpm)


def pitch_factor(pitch: int) -> float:
    """F0 multiplier for ``pitch`` (50 -> 1.0; 0 / 100 -> -/+ PITCH_SEMITONES)."""
    return float(2.0 ** ((pitch - 50) / 50.0 * PITCH_SEMITONES / 12.0))


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """Whitespace words of ``text`` with their 0-based [start, end) character offsets."""
    return [(m.group(0), m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def tokens_to_words(text: str, tokens: Sequence[str]) -> list[int]:
    """Index of the whitespace word of ``text`` that each of an engine's tokens came from.

    Engines tokenize the raw text in order (Flite and Festival split off punctuation; a token may
    also be a piece of a whitespace word). Each token is looked up in the text after the previous
    one; one that cannot be found (the engine changed its spelling) goes to the word after the
    previous token's, never backwards.
    """
    spans = word_spans(text)
    starts = [s for _, s, _ in spans]
    out: list[int] = []
    pos, last = 0, 0
    for tok in tokens:
        at = text.find(tok, pos) if tok else -1
        if at >= 0:
            w = max(0, int(np.searchsorted(starts, at, side="right")) - 1)
            w = max(w, last)
            pos = at + len(tok)
        else:
            w = min(last + (1 if out else 0), len(spans) - 1)
            pos = spans[w][2]
        out.append(w)
        last = w
    return out


def word_times(text: str, tokens: list[tuple[str, list[tuple[float, float] | None]]]
               ) -> list[tuple[float, float] | None]:
    """(start_s, end_s) per whitespace word of ``text`` from an engine's tokens, each with the
    (start_s, end_s) spans of its segments (None for a silent one); None for a word the engine spoke
    nothing for. Used by the Flite and Festival engines, whose tokens come from their Token relation."""
    owners = tokens_to_words(text, [t for t, _ in tokens])
    per_word: list[list[tuple[float, float]]] = [[] for _ in word_spans(text)]
    for owner, (_, spans) in zip(owners, tokens):
        per_word[owner].extend(s for s in spans if s is not None)
    return [(min(s for s, _ in p), max(e for _, e in p)) if p else None for p in per_word]


def fill_unspoken(times: list[tuple[float, float] | None]) -> list[tuple[float, float]]:
    """Timings for words the engine spoke nothing for (a lone "-" or "--"): the pause between their
    neighbours when there is one, else the second half of the spoken word before (after, for leading
    words), shared equally among them. Spoken words keep their own times."""
    n = len(times)
    out: list[list[float] | None] = [list(t) if t is not None else None for t in times]
    i = 0
    while i < n:
        if out[i] is not None:
            i += 1
            continue
        j = i
        while j < n and out[j] is None:
            j += 1
        prev = out[i - 1] if i > 0 else None
        nxt = out[j] if j < n else None
        if prev is not None and nxt is not None and nxt[0] - prev[1] > 1e-3:
            lo, hi = prev[1], nxt[0]
        elif prev is not None:
            mid = (prev[0] + prev[1]) / 2
            lo, hi = mid, prev[1]
            prev[1] = mid
        else:
            assert nxt is not None
            mid = (nxt[0] + nxt[1]) / 2
            lo, hi = nxt[0], mid
            nxt[0] = mid
        step = (hi - lo) / (j - i)
        for k in range(i, j):
            out[k] = [lo + step * (k - i), lo + step * (k - i + 1)]
        i = j
    return [(float(a), float(b)) for a, b in out]  # type: ignore[misc]


def speech_bounds(samples: np.ndarray, hz: int, floor_db: float = -40.0) -> tuple[float, float]:
    """(start_s, end_s) of the part of ``samples`` louder than ``floor_db`` below its loudest 10 ms."""
    frame = max(1, hz // 100)
    n = len(samples) // frame
    if n == 0:
        return 0.0, len(samples) / hz
    rms = np.sqrt(np.mean(samples[: n * frame].astype(np.float64).reshape(n, frame) ** 2, axis=1))
    loud = np.nonzero(rms > max(rms.max() * 10 ** (floor_db / 20), 1e-4))[0]
    if len(loud) == 0:
        return 0.0, len(samples) / hz
    return loud[0] * frame / hz, min(len(samples), (loud[-1] + 1) * frame) / hz


def finish(samples: np.ndarray, hz: int, text: str, times: list[tuple[float, float] | None] | None,
           sample_rate: int, engine: str, voice: str) -> Synthesis:
    """Cut the engine's own leading/trailing silence, pad LEAD_S / TAIL_S of zeros, resample.

    ``samples``: float audio at ``hz``; ``times``: (start_s, end_s) per whitespace word in engine time
    (None for a word the engine spoke nothing for), or None without timings: then the speech is
    found by an energy threshold.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if times is not None:
        spoken = [t for t in times if t is not None and t[1] > t[0]]
        if not spoken:
            raise SynthesisError(f"{engine} produced no speech for {text[:80]!r}")
        full = fill_unspoken(times)
        first_s, last_s = min(t[0] for t in spoken), max(t[1] for t in spoken)
    else:
        full = None
        first_s, last_s = speech_bounds(samples, hz)
    lo, hi = round(first_s * hz), min(len(samples), round(last_s * hz))
    lead, tail = round(LEAD_S * hz), round(TAIL_S * hz)
    start = max(0, lo - lead)
    stop = min(len(samples), hi + tail)
    core = samples[start:stop]
    pad_front = lead - (lo - start)
    pad_back = (hi + tail) - stop
    audio = np.concatenate([np.zeros(pad_front, np.float32), core, np.zeros(pad_back, np.float32)])
    shift_s = (pad_front - start) / hz
    wave = resample(torch.from_numpy(np.ascontiguousarray(audio)), hz, sample_rate).clamp(-1.0, 1.0).contiguous()
    total_s = wave.numel() / sample_rate
    words = None
    if full is not None:
        words, prev_end = [], 0.0
        for (word, _, _), (t0, t1) in zip(word_spans(text), full):
            s = round(min(total_s, max(prev_end, t0 + shift_s)), 4)
            e = round(min(total_s, max(s, t1 + shift_s)), 4)
            words.append(WordTiming(word, s, e))
            prev_end = e
    return Synthesis(wave=wave, sample_rate=sample_rate, words=words, engine=engine, voice=voice)


def finish_tokens(samples: np.ndarray, hz: int, text: str,
                  tokens: list[tuple[str, list[tuple[float, float] | None]]], sample_rate: int, engine: str,
                  name: str) -> Synthesis:
    """:func:`finish` with the word times of an engine's Token relation (:func:`word_times`: the Flite and
    Festival engines); the voice is ``"<engine>:<name>"``."""
    return finish(samples, hz, text, word_times(text, tokens), sample_rate, engine, f"{engine}:{name}")


def align_tokens(full: Sequence[str], alone: Sequence[Sequence[str]]) -> list[int]:
    """Owner word of each token of ``full`` (the whole text as the engine spoke it) given each word's
    tokens spoken alone, by edit-distance alignment of ``full`` with the words' tokens in a row.

    Context changes a few tokens ("of the" is spoken as one group, numbers expand), so the two
    sequences are aligned; each full token takes the word of the reference token it is matched or
    substituted with, an inserted token joins the word before it. Owners never decrease.
    """
    ref = [t for seq in alone for t in seq]
    label = [k for k, seq in enumerate(alone) for _ in seq]
    n, m = len(full), len(ref)
    if n == 0:
        return []
    if m == 0:
        return [0] * n
    full_a = np.array(full, dtype=object)
    ref_a = np.array(ref, dtype=object)
    cost = np.zeros((n + 1, m + 1), dtype=np.int64)
    cost[0, :] = np.arange(m + 1)
    js = np.arange(m + 1)
    for i in range(1, n + 1):
        tmp = np.empty(m + 1, dtype=np.int64)
        tmp[0] = i
        sub = cost[i - 1, :-1] + (ref_a != full_a[i - 1]).astype(np.int64)
        tmp[1:] = np.minimum(sub, cost[i - 1, 1:] + 1)
        # Insertions along the row: cost[i, j] = min_k<=j tmp[k] + (j - k).
        cost[i] = np.minimum.accumulate(tmp - js) + js
    owner: list[int | None] = [None] * n
    i, j = n, m
    while i > 0 and j > 0:
        c = cost[i, j]
        if full[i - 1] == ref[j - 1] and c == cost[i - 1, j - 1]:
            owner[i - 1] = label[j - 1]
            i, j = i - 1, j - 1
        elif c == cost[i - 1, j] + 1:
            i -= 1
        elif c == cost[i - 1, j - 1] + 1:
            owner[i - 1] = label[j - 1]
            i, j = i - 1, j - 1
        else:
            j -= 1
    out, prev = [], 0
    for o in owner:
        prev = max(prev, o) if o is not None else prev
        out.append(prev)
    return out
