"""Word-boundary error, CER and real-time factor of alignment.metrics."""

from __future__ import annotations

import pytest

from alignment.metrics import BoundaryErrors, SpeedMeter, character_error_rate, word_boundary_errors

REF = [("The", 0.10, 0.25), ("cat,", 0.25, 0.60), ("eighty-three", 0.60, 1.20), ("sat.", 1.30, 1.70)]


def test_forced_words_compare_starts_and_ends():
    hyp = [("The", 0.12, 0.25), ("cat,", 0.25, 0.66), ("eighty-three", 0.58, 1.20), ("sat.", 1.30, 1.60)]
    e = word_boundary_errors(REF, hyp)
    assert e.words_ref == e.words_matched == 4
    s = e.summary()
    assert s["boundaries"] == 8
    assert s["mae_ms"] == pytest.approx((20 + 0 + 0 + 60 + 20 + 0 + 0 + 100) / 8)
    assert s["within_20ms"] == pytest.approx(6 / 8) and s["within_50ms"] == pytest.approx(6 / 8)
    assert s["start_mae_ms"] == pytest.approx(10.0) and s["end_mae_ms"] == pytest.approx(40.0)


def test_free_words_are_matched_by_edit_distance():
    # decoded: "the" dropped, "eighty-three" decoded as two words: only "cat" and "sat" are scored
    hyp = [("cat", 0.26, 0.60), ("eighty", 0.6, 0.9), ("three", 0.9, 1.2), ("sat", 1.30, 1.75)]
    e = word_boundary_errors(REF, hyp)
    assert e.words_ref == 4 and e.words_matched == 2
    assert sorted(round(x, 3) for x in e.start + e.end) == [0.0, 0.0, 0.01, 0.05]
    assert e.summary()["start_bias_ms"] == pytest.approx(5.0) and e.summary()["end_bias_ms"] == pytest.approx(25.0)
    assert word_boundary_errors(REF, []).summary()["mae_ms"] is None


def test_cer_rtf_and_merging():
    assert character_error_rate(["The cat."], ["the cat"]) == 0.0
    assert character_error_rate(["abcd"], ["abxd"]) == pytest.approx(0.25)
    sp = SpeedMeter()
    sp.add(audio_s=10.0, compute_s=0.5)
    sp.add(audio_s=10.0, compute_s=1.5)
    assert sp.rtf == pytest.approx(0.1)
    total = BoundaryErrors()
    total.extend(word_boundary_errors(REF, REF))
    total.extend(word_boundary_errors(REF, REF))
    assert total.summary()["boundaries"] == 16 and total.summary()["mae_ms"] == 0.0


def test_median_offsets_undo_a_constant_bias():
    from alignment.metrics import median_offsets_frames

    late = [(w, s + 0.041, e - 0.019) for w, s, e in REF]
    assert median_offsets_frames(word_boundary_errors(REF, late), 50.0) == (-2, 1)
    assert median_offsets_frames(BoundaryErrors(), 50.0) == (0, 0)


def test_matched_pairs_follow_the_edit_distance_alignment():
    from alignment.metrics import matched_pairs

    assert matched_pairs(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == [(0, 0), (2, 2), (3, 3)]
    assert matched_pairs(["the", "cat", "the", "dog"], ["cat", "the", "dog"]) == [(1, 0), (2, 1), (3, 2)]
    assert matched_pairs([], ["a"]) == []
    # a garbled decode: pairing the last "the" with the first would cost 8 edits instead of 5
    ref = ["the", "b", "c", "d", "e"]
    assert matched_pairs(ref, ["v", "w", "x", "y", "the"]) == []
