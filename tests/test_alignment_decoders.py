"""Both boundary decoders recover a known path from synthetic CTC posteriors; short audio is an error."""

from __future__ import annotations

import numpy as np
import pytest
from alignment_helpers import peaky_posteriors

from alignment.decoders import DECODERS, align_labels, beam_decode, greedy_decode
from speechlm.errors import AlignmentError

CASES = [
    # path (one label per frame, 0 = blank), labels, expected starts, expected ends (inclusive)
    ([0, 1, 1, 0, 2, 0, 2, 0, 0, 3, 0, 0], [1, 2, 2, 3], [1, 4, 6, 9], [3, 5, 8, 9]),
    ([1, 1, 0, 2, 0, 2, 0, 0, 3, 0, 0, 0], [1, 2, 2, 3], [0, 3, 5, 8], [2, 4, 7, 8]),   # speech at frame 0
    ([1, 2, 0, 2, 3], [1, 2, 2, 3], [0, 1, 3, 4], [0, 2, 3, 4]),                         # no spare frame
    ([0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 2, 2, 0, 3, 3, 0], [1, 2, 2, 3], [2, 7, 10, 13], [6, 9, 12, 14]),
    ([0, 4, 0, 0, 1, 0, 0, 0, 0, 4, 4, 0], [4, 1, 4], [1, 4, 9], [3, 8, 10]),
]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("path,labels,starts,ends", CASES)
def test_exact_boundaries_from_known_posteriors(decoder, path, labels, starts, ends):
    lp = peaky_posteriors(path, vocab=5)
    spans = align_labels(lp, labels, frame_rate_hz=50.0, decoder=decoder, utt_id="u1")
    assert spans.labels == labels
    assert spans.start_frames.tolist() == starts
    assert spans.end_frames.tolist() == ends
    assert spans.num_frames == len(path)
    start_s, end_s = spans.seconds()
    np.testing.assert_allclose(start_s, np.array(starts) / 50.0)
    np.testing.assert_allclose(end_s, (np.array(ends) + 1) / 50.0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_audio_shorter_than_text_names_the_utterance(decoder):
    lp = peaky_posteriors([0, 1, 0, 2], vocab=5)
    with pytest.raises(AlignmentError, match="utt-short.*shorter than its text"):
        align_labels(lp, [1, 2, 3, 4, 1], 50.0, decoder, utt_id="utt-short")
    # a repeated label needs a blank frame between its copies
    with pytest.raises(AlignmentError, match="utt-rep"):
        align_labels(peaky_posteriors([1, 1, 2], vocab=5), [1, 1, 2], 50.0, decoder, utt_id="utt-rep")


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoders_agree_on_random_posteriors(decoder):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 6)).astype(np.float32)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = [1, 2, 3, 3, 4, 5, 1, 2]
    spans = align_labels(lp, labels, 50.0, decoder)
    s = spans.start_frames
    assert (np.diff(s) > 0).all() and s[0] >= 0 and spans.end_frames[-1] < 60
    assert (spans.end_frames >= spans.start_frames).all()


def test_greedy_and_beam_decoding():
    path = [0, 1, 1, 0, 2, 0, 2, 0, 0, 3, 3, 0]
    lp = peaky_posteriors(path, vocab=5)
    assert greedy_decode(lp) == [1, 2, 2, 3]
    assert beam_decode(lp, beam_size=4) == [1, 2, 2, 3]
    # beam search sums paths: "1" spread over blank-ish frames beats the greedy best path
    p = np.array([[0.4, 0.35, 0.25], [0.4, 0.35, 0.25]], dtype=np.float32)
    assert greedy_decode(np.log(p)) == []
    assert beam_decode(np.log(p), beam_size=4) == [1]
