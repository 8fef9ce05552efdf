"""Token mapping (alignment.tokens) on tricky strings, for byte-level BPE and SentencePiece tokenizers."""

from __future__ import annotations

import itertools

import pytest
from alignment_helpers import byte_level_bpe, sentencepiece_llama

from alignment import tokens
from alignment.tokens import (
    char_spans_from_normalized,
    normalize_for_alignment,
    number_to_words,
    token_boundaries,
    token_char_spans,
)
from speechlm.data.boundaries import convert_boundaries

TRICKY = [
    "The cat sat.",
    " leading space and  double space",
    "Hello, world! It's 1984.",
    "bookkeeper committee aaa",
    "Supercalifragilistic words, tokenized!",
    "\"Quoted\" (parenthesised) -- dashes; naïve café",
    "3 apples & 42 pears: 100% done",
]


@pytest.fixture(scope="module", params=["byte_level_bpe", "sentencepiece"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte_level_bpe":
        return byte_level_bpe()
    return sentencepiece_llama(tmp_path_factory.mktemp("spm"))


def _frames_per_char(text: str) -> tuple[list[int | None], list[int | None]]:
    """Fake aligner output: source char c (if spoken) spans frames [2c, 2c + 1]."""
    norm = normalize_for_alignment(text)
    starts = [2 * s for s in norm.source]
    ends = [2 * s + 1 for s in norm.source]
    return char_spans_from_normalized(norm, len(text), starts, ends)


@pytest.mark.parametrize("text", TRICKY)
def test_spans_tile_text_and_match_token_strings(tokenizer, text):
    ids, spans = token_char_spans(tokenizer, text)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(spans) == len(ids) > 0
    assert "".join(text[a:b] for a, b in spans) == text
    for tid, (a, b) in zip(ids, spans):
        piece = tokenizer.decode([tid])
        if "\ufffd" not in piece and piece.strip():
            assert text[a:b].strip() == piece.strip(), (text, tokenizer.convert_ids_to_tokens(tid))


@pytest.mark.parametrize("text", TRICKY)
def test_every_token_gets_one_boundary_by_the_rule(tokenizer, text):
    ids, spans = token_char_spans(tokenizer, text)
    char_start, char_end = _frames_per_char(text)
    num_frames = 2 * len(text) + 4
    bounds = token_boundaries(spans, char_start, char_end, num_frames)
    assert len(bounds) == len(ids)
    assert all(0 <= b < num_frames for b in bounds)
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bounds))
    first_spoken = min(s for s in char_start if s is not None)
    prev = None
    for (a, b), got in zip(spans, bounds):
        ends = [char_end[c] for c in range(a, b) if char_end[c] is not None]
        if ends:
            want = max(ends)                          # ends where its last spoken character ends
        elif prev is None:
            want = max(0, first_spoken - 1)           # leading no-audio token: the leading silence
        else:
            want = prev                               # punctuation / space: predecessor's boundary
        assert got == want, (text, text[a:b])
        prev = got


def test_hand_checked_boundaries(tokenizer):
    text = "Hi, you!"
    # spoken: H(0) i(1) y(4) o(5) u(6); "Hi" ends at frame 5, "you" at frame 20
    char_start = [2, 4, None, None, 10, 14, 18, None]
    char_end = [3, 5, None, None, 13, 17, 20, None]
    _ids, spans = token_char_spans(tokenizer, text)
    bounds = token_boundaries(spans, char_start, char_end, num_frames=30)
    by_piece = {text[a:b]: bnd for (a, b), bnd in zip(spans, bounds)}
    assert bounds[-1] == 20 and by_piece["!"] == 20          # trailing punctuation: predecessor
    assert by_piece[","] == 5                                 # comma after "Hi"
    tok_with_u = next(k for k, (a, b) in enumerate(spans) if a <= 6 < b)
    assert bounds[tok_with_u] == 20


def test_digits_end_where_the_spoken_number_ends(tokenizer):
    text = "in 1984 now"
    norm = normalize_for_alignment(text)
    assert norm.text == "in one thousand nine hundred eighty four now"
    assert {text[s] for s in norm.source if s >= 0} == set("in4now")
    # every normalised char k spans frame k
    starts, ends = char_spans_from_normalized(norm, len(text), list(range(len(norm.text))),
                                              list(range(len(norm.text))))
    _ids, spans = token_char_spans(tokenizer, text)
    bounds = token_boundaries(spans, starts, ends, num_frames=len(norm.text))
    last_digit_tok = next(k for k, (a, b) in enumerate(spans) if a <= text.index("4") < b)
    assert bounds[last_digit_tok] == norm.text.index(" now") - 1     # end of "four"
    assert all(bounds[k] <= bounds[last_digit_tok] for k in range(last_digit_tok))


def test_normalisation_keeps_source_map():
    text = "Don't — STOP, naïve 'quotes' 3.5%!"
    norm = normalize_for_alignment(text)
    assert norm.text == "don't stop naive quotes three five percent"
    for ch, src in zip(norm.text, norm.source):
        if ch == " ":
            assert src == -1
        elif text[src].isalpha():
            assert text[src].lower().startswith(ch) or (text[src] == "ï" and ch == "i")
    assert number_to_words(0) == "zero" and number_to_words(2_000_013) == "two million thirteen"
    assert normalize_for_alignment("...!").text == ""


def test_frame_rate_conversion():
    # 50 Hz frames end at 20 ms steps; 12.5 Hz frames at 80 ms steps.
    assert tokens.convert_boundaries is convert_boundaries      # the one conversion, re-exported by alignment.tokens
    assert convert_boundaries([0, 3, 4, 7, 49], 50, 12.5, 13) == [0, 0, 1, 1, 12]
    assert convert_boundaries([0, 1, 5], 50, 100, 20) == [1, 3, 11]
    assert convert_boundaries([2, 9], 50, 50, 5) == [2, 4]          # clipped to the target's frames
    b = convert_boundaries(list(range(100)), 50, 25, 50)
    assert all(y >= x for x, y in itertools.pairwise(b))
