"""eSpeak synthesis: word timings (one per word, ordered, inside the audio), determinism, errors."""

import pytest
import torch

from speechlm.data.tts import SynthesisError, list_english_voices, synthesize

SENTENCES = [
    "He is one of the best in the world.",
    "The study of the Law is hard.",
    "I am not sure if he will be able to come to the party.",
    "It was the end of the day and they went home.",
    "Give it to me now, please.",
    "A cat and a dog sat on the mat in the sun.",
    "She said that it is in the box on top of the table.",
    "Yes.",
    "In 1995 the cost of a house was three hundred thousand dollars.",
]


def _check_timings(text: str, syn) -> None:
    words = text.split()
    assert [w.word for w in syn.words] == words
    duration_s = syn.wave.numel() / syn.sample_rate
    prev_end = 0.0
    for w in syn.words:
        assert w.start_s < w.end_s, w
        assert w.start_s >= prev_end - 1e-6, (w, prev_end)
        prev_end = w.end_s
    assert syn.words[0].start_s >= 0 and syn.words[-1].end_s <= duration_s


@pytest.mark.parametrize("voice", ["en-us", "en-gb-x-rp+f2", "en-gb-scotland+m3"])
def test_word_timings_one_per_word_ordered_inside_audio(voice):
    for text in SENTENCES:
        syn = synthesize(text, voice=voice, rate_wpm=160)
        assert syn.sample_rate == 16000 and syn.wave.dtype == torch.float32 and syn.wave.dim() == 1
        assert syn.wave.abs().max() > 0.05
        _check_timings(text, syn)


def test_deterministic_across_calls():
    a = synthesize(SENTENCES[0], voice="en-us", rate_wpm=150, pitch=40)
    synthesize(SENTENCES[1], voice="en-gb-x-rp", rate_wpm=200, pitch=70)  # change engine state
    b = synthesize(SENTENCES[0], voice="en-us", rate_wpm=150, pitch=40)
    assert torch.equal(a.wave, b.wave) and a.words == b.words


def test_rate_changes_duration():
    slow = synthesize(SENTENCES[2], rate_wpm=120)
    fast = synthesize(SENTENCES[2], rate_wpm=260)
    assert slow.wave.numel() > 1.5 * fast.wave.numel()


@pytest.mark.parametrize("text,voice", [("", "en-us"), ("   ", "en-us"), ("hello", "xx-nonexistent"),
                                        ("hello", "en-us+nonexistent")])
def test_errors(text, voice):
    with pytest.raises(SynthesisError):
        synthesize(text, voice=voice)


def test_english_voices_listed():
    voices = list_english_voices()
    assert {"en-us", "en", "en-gb-x-rp", "en-029", "en-gb-scotland"} <= set(voices)
    assert "m3" in list_english_voices(variants=True)
