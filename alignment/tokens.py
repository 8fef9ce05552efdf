"""The one place that maps character spans of a transcript to one end frame per LLM token.

Rule (docs/METHOD.md section 2, "Token boundaries"; the SSR connector relies on it):

* The LLM tokens of a text are ``tokenizer(text, add_special_tokens=False).input_ids``; every one of
  them gets exactly one boundary (1:1), special and punctuation tokens included.
* Each token covers a span of characters of ``text``, found by walking decoded token prefixes
  (leading-space aware: works for byte-level BPE with 'Ġ' and SentencePiece with '▁').
* A token ends where its last *spoken* character ends (letters, digits, apostrophes: characters that
  the aligner's normalisation turns into sounds). Spaces and punctuation are not spoken.
* A token with no spoken character (punctuation, a lone space, a piece of a split UTF-8 character)
  gets its predecessor's boundary; a leading one gets the frame just before the first spoken
  character starts (the leading silence), clipped at 0.
* Boundaries are made non-decreasing (running maximum) and clipped to ``[0, num_frames - 1]``.
  Segments are ``(b_{i-1}, b_i]``; a zero-length segment (b_i == b_{i-1}) is allowed and means the
  token shares its read-out frame with its predecessor.

Text normalisation for the character aligner (:func:`normalize_for_alignment`) lives here too, and
keeps, for every normalised character, the index of the source character it came from, so that the
same text is seen on both sides (aligner labels and LLM tokens).
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from speechlm.data.boundaries import convert_boundaries  # noqa: F401  (re-exported; the conversion lives in data)

#: The character aligner's alphabet besides the blank: word separator, apostrophe, a-z.
CHAR_ALPHABET = " '" + "abcdefghijklmnopqrstuvwxyz"

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))
_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "@": " at "}
_APOSTROPHES = "'’‘`´"
_WORD_JOINERS = "-–—/_"


def number_to_words(n: int) -> str:
    """English cardinal words of a non-negative integer (``1984`` -> ``one thousand nine hundred eighty four``)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            words = number_to_words(head) + " " + name
            return words if rest == 0 else words + " " + number_to_words(rest)
    raise AssertionError("unreachable")


@dataclass
class NormalizedText:
    """Aligner-side text: lower-case ``CHAR_ALPHABET`` only, single spaces between words.

    ``source[i]`` is the index in the original text of the character that produced ``text[i]``
    (-1 for the word-separator spaces, which are not spoken).
    """

    text: str
    source: list[int]


def normalize_for_alignment(text: str) -> NormalizedText:
    """Lower-case, strip accents, spell out digits and a few symbols, drop other punctuation.

    Digits are read as one cardinal number per digit run (``"3.5"`` -> ``three five``: the point is
    dropped; a TTS front end that reads it differently will cost a little alignment accuracy).
    """
    out: list[str] = []
    src: list[int] = []

    def put_space() -> None:
        if out and out[-1] != " ":
            out.append(" ")
            src.append(-1)

    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() and ch.isascii():
            m = re.match(r"[0-9]+", text[i:])
            assert m is not None
            run = m.group(0)
            # Keep grouped thousands ("1,000") together as one number.
            while True:
                g = re.match(r",[0-9]{3}(?![0-9])", text[i + len(run):])
                if not g:
                    break
                run += g.group(0)
            words = number_to_words(int(run.replace(",", ""))) if len(run) <= 12 else \
                " ".join(_ONES[int(d)] for d in run if d.isdigit())
            put_space()
            # Every letter of the spoken number points at the digit run's last digit, so a token
            # holding only the first digits of a long number is treated like any other token.
            for w_ch in words:
                if w_ch == " ":
                    put_space()
                else:
                    out.append(w_ch)
                    src.append(i + len(run) - 1)
            put_space()
            i += len(run)
            continue
        if ch in _SYMBOLS:
            put_space()
            for w_ch in _SYMBOLS[ch].strip():
                out.append(w_ch)
                src.append(i)
            put_space()
        elif ch.isspace() or ch in _WORD_JOINERS:
            put_space()
        elif ch in _APOSTROPHES:
            # An apostrophe is spoken only inside a word ("don't"), not as a quote mark.
            prev_letter = i > 0 and text[i - 1].isalpha()
            next_letter = i + 1 < len(text) and text[i + 1].isalpha()
            if prev_letter and next_letter:
                out.append("'")
                src.append(i)
        else:
            for base in unicodedata.normalize("NFKD", ch.lower()):
                if base in CHAR_ALPHABET and base not in " '":
                    out.append(base)
                    src.append(i)
        i += 1
    while out and out[-1] == " ":
        out.pop()
        src.pop()
    return NormalizedText("".join(out), src)


def token_char_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """LLM token ids of ``text`` and each token's character span ``[start, end)`` in ``text``.

    Spans come from decoding growing prefixes of the ids, so they work for any HF tokenizer (slow
    or fast, byte-level BPE or SentencePiece). A token that decodes to half a UTF-8 character gets an
    empty span. Spans tile ``text`` from 0 without gaps; the last one ends at ``len(text)``.
    """
    ids: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        return [], []
    full = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ends_decoded: list[int] = []
    prev = 0
    for k in range(1, len(ids) + 1):
        prefix = full if k == len(ids) else tokenizer.decode(
            ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        n = len(prefix.rstrip("\ufffd")) if k < len(ids) else len(prefix)
        prev = min(max(prev, n), len(full))
        ends_decoded.append(prev)
    to_text = _offset_map(full, text)
    spans: list[tuple[int, int]] = []
    start = 0
    for k, e in enumerate(ends_decoded):
        end = len(text) if k == len(ids) - 1 else max(start, to_text[e])
        spans.append((start, end))
        start = end
    return ids, spans


def _offset_map(decoded: str, text: str) -> list[int]:
    """For each offset 0..len(decoded) of ``decoded``, the matching offset in ``text``.

    Identity when the tokenizer round-trips; otherwise (tokenizers that normalise, add or drop a
    leading space) a character diff decides, and unmatched offsets stay at the previous match.
    """
    if decoded == text:
        return list(range(len(text) + 1))
    out = [0] * (len(decoded) + 1)
    matcher = difflib.SequenceMatcher(None, decoded, text, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        for k in range(i1, i2 + 1):
            if tag == "equal":
                out[k] = j1 + (k - i1)
            else:
                # A replaced/deleted run ends where its counterpart ends.
                out[k] = j2 if k == i2 else j1
    out[len(decoded)] = len(text)
    for k in range(1, len(out)):
        out[k] = max(out[k], out[k - 1])
    return out


def char_spans_from_normalized(norm: NormalizedText, text_len: int,
                               start_frames: Sequence[int], end_frames: Sequence[int]
                               ) -> tuple[list[int | None], list[int | None]]:
    """Frames of each normalised character -> ``(start, end)`` frame of each *source* character.

    Source characters that produced no spoken normalised character get ``None`` (not spoken).
    """
    starts: list[int | None] = [None] * text_len
    ends: list[int | None] = [None] * text_len
    for i, s in enumerate(norm.source):
        if s < 0:
            continue
        a, b = int(start_frames[i]), int(end_frames[i])
        starts[s] = a if starts[s] is None else min(starts[s], a)
        ends[s] = b if ends[s] is None else max(ends[s], b)
    return starts, ends


def token_boundaries(token_spans: Sequence[tuple[int, int]], char_start: Sequence[int | None],
                     char_end: Sequence[int | None], num_frames: int) -> list[int]:
    """One inclusive end frame per token (the rule in this module's docstring)."""
    if num_frames <= 0:
        raise ValueError("num_frames must be positive")
    spoken_starts = [s for s in char_start if s is not None]
    lead = max(0, min(spoken_starts) - 1) if spoken_starts else 0
    out: list[int] = []
    prev: int | None = None
    for a, b in token_spans:
        ends = [char_end[c] for c in range(a, b) if char_end[c] is not None]
        if ends:
            cur = max(ends)
        else:
            cur = prev if prev is not None else lead
        if prev is not None:
            cur = max(cur, prev)
        cur = min(max(cur, 0), num_frames - 1)
        out.append(cur)
        prev = cur
    return out


def frames_for_duration(duration_s: float, frame_rate_hz: float) -> int:
    """Number of encoder frames that ``duration_s`` of audio yields at ``frame_rate_hz`` (at least 1)."""
    return max(1, math.ceil(duration_s * frame_rate_hz - 1e-6))


def words_from_char_spans(text: str, char_start: Sequence[int | None], char_end: Sequence[int | None],
                          frame_rate_hz: float) -> list[tuple[str, float, float] | None]:
    """Whitespace-separated words of ``text`` with ``(word, start_s, end_s)``, None if not spoken."""
    words: list[tuple[str, float, float] | None] = []
    for m in re.finditer(r"\S+", text):
        starts = [char_start[c] for c in range(m.start(), m.end()) if char_start[c] is not None]
        ends = [char_end[c] for c in range(m.start(), m.end()) if char_end[c] is not None]
        if not starts:
            words.append(None)
            continue
        words.append((m.group(0), min(starts) / frame_rate_hz, (max(ends) + 1) / frame_rate_hz))
    return words
