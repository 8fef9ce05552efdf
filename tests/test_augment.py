"""speechlm.data.augment: each effect does what it says, timings follow, seeds and text form are stable."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch

from speechlm.data.augment import (
    POLICIES,
    Augmentation,
    AugmentationError,
    AugmentationPolicy,
    apply,
    get_policy,
)
from speechlm.data.manifest import WordTiming
from speechlm.errors import SpeechLMError

SR = 16_000


def tone(freq: float, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SR)[int(np.argmax(spec))])


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    clean = clean.astype(np.float64)
    noise = noisy.astype(np.float64) - clean
    return 10 * math.log10(np.mean(clean**2) / np.mean(noise**2))


def band_density(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / SR)
    return float(spec[(f >= lo) & (f < hi)].mean())


WORDS = [WordTiming("a", 0.10, 0.30), WordTiming("b", 0.30, 0.90), WordTiming("c", 0.90, 1.50)]


def test_identity_is_a_noop_and_returns_a_copy():
    x = tone(300)
    aug = Augmentation()
    assert aug.is_identity and aug.to_str() == "none"
    y, words = apply(x, SR, aug, WORDS)
    np.testing.assert_array_equal(y, x)
    assert not np.shares_memory(y, x)
    assert words[:2] == WORDS[:2] and words[0] is not WORDS[0]
    assert words[2] == WordTiming("c", 0.90, 1.0)  # timings are always clipped inside the audio
    yt, no_words = apply(torch.from_numpy(x), SR, aug)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32 and no_words is None
    assert torch.equal(yt, torch.from_numpy(x))


def test_speed_shortens_raises_pitch_and_scales_word_timings():
    x = tone(400)
    y, words = apply(x, SR, Augmentation(speed=1.1), WORDS)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert abs(len(y) - len(x) / 1.1) <= 2
    assert dominant_hz(y) == pytest.approx(440, abs=2)
    assert words[0].start_s == pytest.approx(0.10 / 1.1) and words[1].end_s == pytest.approx(0.90 / 1.1)
    # the last word ran past the clip: clipped inside the new audio
    assert words[2].end_s == pytest.approx(len(y) / SR)
    y, words = apply(x, SR, Augmentation(speed=0.9), WORDS)
    assert abs(len(y) - len(x) / 0.9) <= 2
    assert words[1].end_s == pytest.approx(0.90 / 0.9)


@pytest.mark.parametrize("tempo", [0.8, 1.25])
def test_tempo_changes_length_and_keeps_pitch(tempo):
    x = tone(440)
    y, words = apply(x, SR, Augmentation(tempo=tempo), WORDS)
    assert len(y) == round(len(x) / tempo)
    assert dominant_hz(y) == pytest.approx(440, abs=2)
    assert words[1].start_s == pytest.approx(0.30 / tempo)
    # no big level change or gaps: frame RMS stays that of the tone
    frames = y[: len(y) // 160 * 160].reshape(-1, 160)
    rms = np.sqrt(np.mean(frames[2:-2] ** 2, axis=1))
    assert np.all(np.abs(rms - 0.5 / math.sqrt(2)) < 0.05)


@pytest.mark.parametrize(("semitones", "expected_hz"), [(12, 880), (-12, 220), (3, 440 * 2 ** 0.25)])
def test_pitch_shift_scales_frequency_and_keeps_length(semitones, expected_hz):
    x = tone(440)
    y, words = apply(x, SR, Augmentation(pitch_semitones=semitones), WORDS)
    assert len(y) == len(x)
    assert dominant_hz(y) == pytest.approx(expected_hz, abs=2)
    assert [(w.start_s, w.end_s) for w in words[:2]] == [(w.start_s, w.end_s) for w in WORDS[:2]]


@pytest.mark.parametrize("noise", ["white", "pink", "brown", "babble"])
@pytest.mark.parametrize("target", [5.0, 15.0])
def test_noise_reaches_the_requested_snr(noise, target):
    x = tone(1000, amp=0.2) * np.hanning(SR).astype(np.float32)
    y, _ = apply(x, SR, Augmentation(snr_db=target, noise=noise, seed=3))
    assert len(y) == len(x)
    assert snr_db(x, y) == pytest.approx(target, abs=0.5)


def test_noise_colours_have_the_right_spectral_slope():
    x = tone(1000, seconds=2.0, amp=0.2)
    ratio = {}
    for noise in ("white", "pink", "brown"):
        y, _ = apply(x, SR, Augmentation(snr_db=10.0, noise=noise, seed=1))
        n = y.astype(np.float64) - x
        ratio[noise] = band_density(n, 100, 400) / band_density(n, 2000, 6000)
    assert 0.7 < ratio["white"] < 1.4
    assert ratio["pink"] > 5  # ~ (4000 / 250) = 16
    assert ratio["brown"] > 5 * ratio["pink"]  # ~ 16 ** 2


def decay_time_s(y: np.ndarray, burst_end_s: float, drop_db: float = 40.0) -> float:
    """Time after ``burst_end_s`` until 10 ms frame energy is ``drop_db`` below the burst's."""
    hop = SR // 100
    e = np.mean(y[: len(y) // hop * hop].reshape(-1, hop).astype(np.float64) ** 2, axis=1) + 1e-20
    end = int(burst_end_s * 100)
    ref = np.median(e[end - 20: end])
    below = np.nonzero(10 * np.log10(e[end:] / ref) < -drop_db)[0]
    return float(below[0]) / 100 if len(below) else (len(e) - end) / 100


def test_reverb_lengthens_the_decay_and_keeps_the_onset():
    rng = np.random.default_rng(0)
    x = np.zeros(int(1.5 * SR), np.float32)
    on, off = int(0.2 * SR), int(0.5 * SR)
    x[on:off] = 0.3 * rng.standard_normal(off - on).astype(np.float32)
    dry = decay_time_s(x, 0.5)
    short, _ = apply(x, SR, Augmentation(rt60_s=0.3, seed=1))
    long, _ = apply(x, SR, Augmentation(rt60_s=0.8, seed=1))
    assert len(short) == len(long) == len(x)
    assert dry <= 0.02
    assert decay_time_s(short, 0.5) > 0.1
    assert decay_time_s(long, 0.5) > decay_time_s(short, 0.5) + 0.15
    for y in (short, long):
        onset = int(np.nonzero(np.abs(y) > 0.05 * np.abs(y).max())[0][0])
        assert abs(onset - on) <= 0.003 * SR
    # lower direct-to-reverberant ratio: more of the energy is in the tail
    far, _ = apply(x, SR, Augmentation(rt60_s=0.3, drr_db=-5.0, seed=1))
    assert np.sum(far[off:] ** 2) > np.sum(short[off:] ** 2)


def test_seed_determinism():
    x = tone(300) + 0.05 * tone(1700)
    aug = Augmentation(speed=1.1, pitch_semitones=1.0, snr_db=12.0, noise="pink", rt60_s=0.4, seed=7)
    a, _ = apply(x, SR, aug)
    b, _ = apply(x.copy(), SR, Augmentation.from_str(aug.to_str()))
    np.testing.assert_array_equal(a, b)
    c, _ = apply(x, SR, Augmentation(**{**aug.__dict__, "seed": 8}))
    assert a.shape == c.shape and not np.allclose(a, c)
    for noise in ("white", "babble"):
        d1, _ = apply(x, SR, Augmentation(snr_db=10.0, noise=noise, seed=1))
        d2, _ = apply(x, SR, Augmentation(snr_db=10.0, noise=noise, seed=1))
        d3, _ = apply(x, SR, Augmentation(snr_db=10.0, noise=noise, seed=2))
        np.testing.assert_array_equal(d1, d2)
        assert not np.allclose(d1, d3)


def test_output_stays_in_range_and_is_only_normalised_when_clipping():
    x = tone(300, amp=0.9)
    loud, _ = apply(x, SR, Augmentation(gain_db=12.0))
    assert np.abs(loud).max() == pytest.approx(0.99, abs=1e-6)
    quiet, _ = apply(x, SR, Augmentation(gain_db=-6.0))
    np.testing.assert_allclose(quiet, x * 10 ** (-6 / 20), rtol=1e-6)
    noisy, _ = apply(x, SR, Augmentation(snr_db=0.0, noise="brown", rt60_s=0.5, seed=2))
    assert np.abs(noisy).max() <= 1.0
    silent, _ = apply(np.zeros(SR, np.float32), SR, Augmentation(snr_db=10.0))
    assert not silent.any()


@pytest.mark.parametrize("aug", [
    Augmentation(),
    Augmentation(speed=1.1, pitch_semitones=2.0, snr_db=15.0, noise="pink", rt60_s=0.4, seed=7),
    Augmentation(tempo=0.93, pitch_semitones=-0.5, gain_db=-3.5, drr_db=-2.0, rt60_s=0.25),
    Augmentation(seed=5),
    Augmentation(noise="babble"),
    Augmentation(snr_db=1 / 3, noise="brown", speed=0.1 + 0.8),
])
def test_text_form_round_trips(aug):
    text = aug.to_str()
    assert Augmentation.from_str(text) == aug
    assert Augmentation.from_str(text).to_str() == text
    assert " " not in text


def test_text_form_is_compact_and_parses_any_order():
    aug = Augmentation(speed=1.1, pitch_semitones=2.0, snr_db=15.0, noise="pink", rt60_s=0.4, seed=7)
    assert aug.to_str() == "speed=1.1,pitch=+2.0,snr=15.0:pink,rt60=0.4,seed=7"
    assert Augmentation.from_str("seed=7, rt60=0.4,snr=15:pink,pitch=2,speed=1.1") == aug
    assert Augmentation.from_str("none").is_identity
    assert Augmentation(pitch_semitones=-1.5).to_str() == "pitch=-1.5"


def test_policy_sampling_is_deterministic_and_within_ranges():
    policy = get_policy("default")
    draws = [policy.sample(random.Random(11)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng_a, rng_b = random.Random(3), random.Random(3)
    seq_a = [policy.sample(rng_a) for _ in range(300)]
    assert seq_a == [policy.sample(rng_b) for _ in range(300)]
    assert len({a.to_str() for a in seq_a}) > 100
    for a in seq_a:
        assert a.speed in policy.speeds
        assert a.pitch_semitones == 0.0 or -3.0 <= a.pitch_semitones <= 3.0
        assert a.tempo == 1.0 or 0.9 <= a.tempo <= 1.1
        assert a.snr_db is None or 10.0 <= a.snr_db <= 30.0
        assert a.rt60_s is None or 0.2 <= a.rt60_s <= 0.7
        assert a.noise in policy.noises
        if a.snr_db is None and a.rt60_s is None:
            assert a.seed == 0  # no random effect: the seed is irrelevant and left out of the text
        assert Augmentation.from_str(a.to_str()) == a
    # every effect is drawn sometimes, and not always
    for pred in (lambda a: a.pitch_semitones != 0, lambda a: a.tempo != 1, lambda a: a.snr_db is not None,
                 lambda a: a.rt60_s is not None, lambda a: a.speed != 1.0):
        assert 0 < sum(map(pred, seq_a)) < len(seq_a)
    assert all(get_policy("none").sample(random.Random(i)).is_identity for i in range(20))
    assert set(POLICIES) == {"none", "light", "default"}
    light = [get_policy("light").sample(random.Random(i)) for i in range(50)]
    assert all(a.pitch_semitones == 0 and a.tempo == 1 for a in light)


def test_errors_on_bad_values():
    for kw in ({"speed": 2.0}, {"speed": 0.5}, {"tempo": 3.0}, {"tempo": 0.4}, {"pitch_semitones": 12.5},
               {"speed": float("nan")}, {"snr_db": float("inf")}, {"noise": "purple"}, {"rt60_s": 0.0},
               {"rt60_s": 5.0}, {"seed": -1}, {"gain_db": 100.0}):
        with pytest.raises(AugmentationError):
            Augmentation(**kw)
    assert issubclass(AugmentationError, SpeechLMError)
    with pytest.raises(AugmentationError, match="empty"):
        apply(np.zeros(0, np.float32), SR, Augmentation(speed=1.1))
    with pytest.raises(AugmentationError, match="NaN"):
        apply(np.array([0.1, float("nan")], np.float32), SR, Augmentation())
    with pytest.raises(AugmentationError, match="1-D"):
        apply(np.zeros((1, 100), np.float32), SR, Augmentation())
    with pytest.raises(AugmentationError, match="sample_rate"):
        apply(tone(300), 0, Augmentation())
    for text in ("speed", "speed=fast", "volume=3", "speed=1.1,speed=0.9", "speed=3", "snr=10:purple"):
        with pytest.raises(AugmentationError):
            Augmentation.from_str(text)
    with pytest.raises(AugmentationError):
        AugmentationPolicy(p_noise=1.5)
    with pytest.raises(AugmentationError):
        AugmentationPolicy(speeds=(0.9, 2.5))
    with pytest.raises(AugmentationError):
        AugmentationPolicy(snr_db_range=(30.0, 10.0))
    with pytest.raises(AugmentationError):
        get_policy("heavy")


def test_short_clips_survive_every_effect():
    x = tone(300, seconds=0.01)
    aug = Augmentation(speed=1.1, tempo=0.9, pitch_semitones=3.0, rt60_s=0.3, snr_db=10.0, noise="babble",
                       seed=1)
    y, words = apply(x, SR, aug, [WordTiming("w", 0.0, 0.01)])
    assert len(y) > 0 and np.isfinite(y).all() and words[0].end_s <= len(y) / SR


def test_cost_is_well_under_budget():
    torch.set_num_threads(1)
    x = tone(150, seconds=3.0, amp=0.3) + 0.02 * np.random.default_rng(0).standard_normal(3 * SR).astype(
        np.float32)
    aug = Augmentation(speed=1.1, tempo=0.95, pitch_semitones=2.0, rt60_s=0.5, snr_db=15.0, noise="babble",
                       gain_db=-3.0, seed=1)
    apply(x, SR, aug)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        apply(x, SR, aug)
        best = min(best, time.perf_counter() - t0)
    assert best / 3.0 < 0.05
