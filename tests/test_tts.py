"""eSpeak synthesis (the default engine of speechlm.data.tts): word timings (one per word, ordered, inside the audio), determinism, errors."""

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
    # Breathy variants (f2, f3) use eSpeak's noise source, and its wave generator keeps state between
    # utterances: neither may leak from one call into the next. The first call also speaks merged
    # words alone (to split "to the"), the second finds them cached: the audio must not change.
    text = "The red dog ran to the park and sat down."
    a = synthesize(text, voice="en+f2", rate_wpm=174, pitch=42)
    for other in SENTENCES[:4]:
        synthesize(other, voice="en-gb-x-rp+f3", rate_wpm=201, pitch=70)
        b = synthesize(text, voice="en+f2", rate_wpm=174, pitch=42)
        assert torch.equal(a.wave, b.wave) and a.words == b.words



@pytest.mark.parametrize("variant", ["caleb", "f2"])
def test_klatt_and_breathy_variants_do_not_depend_on_earlier_calls(variant):
    """The Klatt variants (caleb) draw noise from libc's rand(): without reseeding it the same utterance changed
    with what the process had spoken before (the corpus's workers made different audio run to run)."""
    text = "I do it for the fun of it."
    a = synthesize(text, voice=f"en-us+{variant}", rate_wpm=151, pitch=69)
    for other in SENTENCES[:3]:
        synthesize(other, voice="en-us+caleb", rate_wpm=180, pitch=40)
        b = synthesize(text, voice=f"en-us+{variant}", rate_wpm=151, pitch=69)
        assert torch.equal(a.wave, b.wave)

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


def test_merged_function_words_split_at_their_own_phonemes():
    # eSpeak speaks "of the" as one word group; the boundary must fall where "the" (D) starts.
    from speechlm.data.tts.espeak import _split_group

    assert _split_group(["V", "v", "D", "I", ";"], [["V", "v"], ["D", "@"]]) == [0, 2]
    assert _split_group(["n", "0", "t", "a", "v"], [["n", "0", "t"], ["h", "a", "v"]]) == [0, 3]  # h dropped
    assert _split_group(["D", "e@", "r", "A@"], [["D", "e@"], ["A@"]]) == [0, 3]  # linking r
    assert _split_group(["@", "v", "a", "r-"], [["0", "v"], ["eI"]]) == [0, 2]


def test_merged_group_boundary_is_the_phoneme_event_time():
    # Independent check of the derived timing: "the" must start exactly at the D phoneme that
    # eSpeak reports inside the "of the" group (times relative to the first phoneme + LEAD_S).
    from speechlm.data.tts import espeak as tts

    text = "They sat in the garden of the house."
    syn = synthesize(text, voice="en-us")
    with tts._LOCK:
        engine = tts._Engine()
        try:
            _, phonemes, word_positions = engine.run(text, "en-us", 175, 50)
        finally:
            engine.close()
    of_pos = text.index(" of ") + 2  # 1-based position of "of"
    assert of_pos in word_positions and text.index(" the house") + 2 not in word_positions  # merged
    first = next(p.time_s for p in phonemes if not p.is_pause)
    d_time = next(p.time_s for p in phonemes if p.text_position == of_pos and p.name == "D")
    the = syn.words[6]
    assert the.word == "the" and abs(the.start_s - (d_time - first + tts.LEAD_S)) < 2e-3
    assert syn.words[5].end_s == the.start_s
