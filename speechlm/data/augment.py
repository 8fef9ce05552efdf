"""Voice variety by augmentation, as speech toolkits do it: speed, tempo, pitch, reverb, noise, gain.

One :class:`Augmentation` describes what is done to one clip; :func:`apply` does it and rescales the
clip's word timings; :class:`AugmentationPolicy` draws augmentations for a corpus (presets in
:data:`POLICIES`). ``Augmentation.to_str()`` is the compact text kept in manifests, e.g.
``"speed=1.1,pitch=+2.0,snr=15.0:pink,rt60=0.4,seed=7"`` (``"none"`` for the identity).

Effects, in the fixed order :func:`apply` applies them
----------------------------------------------------
1. ``speed`` (factor, 0.5 < speed < 2.0): speed perturbation by resampling, as Kaldi/ESPnet do with
   0.9/1.0/1.1. The clip is played ``speed`` times faster: duration / speed, every frequency
   (pitch *and* formants) x speed. Implemented as one :func:`speechlm.data.audio.resample` call
   between the two integers of a rational approximation of ``speed`` (denominator <= 100, exact for
   0.9/1.1); timings use that rational factor.
2. ``tempo`` (factor, 0.5 < tempo < 2.0): duration / tempo, pitch and formants kept (like
   ``sox tempo``). WSOLA time-stretch written here (30 ms Hann frames, 50 % overlap, +-7.5 ms
   waveform-similarity search); output length is ``round(T / tempo)`` samples.
3. ``pitch_semitones`` (|pitch| <= 12): pitch (and formants) x 2^(pitch/12), duration kept:
   resample by that factor (as ``speed``) then WSOLA back to exactly the input length.
   WSOLA was chosen over ``torchaudio.functional.pitch_shift`` (phase vocoder): it is faster and
   has no phase-vocoder "phasiness".
4. ``rt60_s`` (seconds, 0 < rt60 <= 3): room reverberation. A synthetic room impulse response is
   drawn from the seed: a direct path (one sample at lag 0) plus exponentially decaying Gaussian
   noise whose energy falls by 60 dB after ``rt60_s`` (the RIR is ``rt60_s`` long).
   ``drr_db`` is the direct-to-reverberant energy ratio (default 3 dB; lower = more distant
   talker). The RIR is scaled to unit energy (loudness roughly kept) and convolved with
   ``torchaudio.functional.fftconvolve``; the output is cut to the input length, so the direct
   path stays at lag 0: onsets and word timings do not move (the tail past the clip end is lost).
5. ``snr_db`` (dB) with ``noise``: additive noise scaled so that
   10 log10(mean(signal^2) / mean(noise^2)) == snr_db exactly, the signal being the clip after
   steps 1-4. Colours: ``white`` (flat), ``pink`` (power ~ 1/f, -3 dB/octave), ``brown``
   (power ~ 1/f^2, -6 dB/octave), both shaped in the FFT domain with nothing below 20 Hz;
   ``babble``: the sum of 5 copies of the clip itself, each speed-perturbed (0.85-1.15) and
   circularly shifted by a random amount, each at unit RMS (a crowd of the same voice).
   A silent clip gets no noise (its SNR is undefined).
6. ``gain_db`` (dB, |gain| <= 40): multiply by 10^(gain_db/20).

Finally, if the result would clip (peak > 1) it is scaled down so its peak is 0.99; this is the
only normalisation (a clip that does not clip is never rescaled).

Seeds
-----
Only reverb and noise are random. Each draws from its own ``numpy.random.default_rng([seed, k])``
stream (k = 1 reverb, 2 noise), so the output is a pure function of (wave, sample rate,
augmentation): the same ``Augmentation`` (same ``seed``) gives bit-identical output, another
seed gives other noise/RIR, and turning one effect on or off does not change the other's draw.
:meth:`AugmentationPolicy.sample` takes a ``random.Random`` and is deterministic given its state;
it always draws the same number of values, whatever the probabilities decide.

Cost (measured on the 2-core development machine, 1 torch thread, 3 s clips at 16 kHz, best of 5;
seconds of CPU per second of audio; rerun with ``python -m speechlm.data.augment``)
--------------------------------------------------------------------------------------------------
speed 1.1: 0.0002 | tempo 1.1: 0.0007 | pitch +2: 0.0011 | rt60 0.5 s: 0.0043 |
noise white: 0.0003 | pink/brown: 0.0007 | babble: 0.0016 | gain: 0.00001 |
all of speed+tempo+pitch+reverb+pink noise+gain: 0.0066 (budget: 0.05).
For comparison ``torchaudio.functional.pitch_shift`` (phase vocoder) took 3.2 s per audio second.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch
import torchaudio.functional as AF

from speechlm.data.audio import resample
from speechlm.data.manifest import WordTiming
from speechlm.errors import SpeechLMError


class AugmentationError(SpeechLMError):
    """An augmentation or its input is invalid (bad factor, unknown noise, empty or NaN audio)."""


NOISES = ("white", "pink", "brown", "babble")
#: Open interval allowed for ``speed`` and ``tempo``.
FACTOR_RANGE = (0.5, 2.0)
MAX_PITCH_SEMITONES = 12.0
MAX_RT60_S = 3.0
MAX_GAIN_DB = 40.0
#: A clip that would clip is scaled to this peak.
CLIP_PEAK = 0.99

_RNG_REVERB = 1
_RNG_NOISE = 2
_MAX_DENOMINATOR = 100
_WSOLA_FRAME_S = 0.030
_WSOLA_TOLERANCE_S = 0.0075
_COLOR_LOW_CUT_HZ = 20.0
_BABBLE_VOICES = 5
_BABBLE_SPEEDS = (0.85, 0.9, 0.95, 1.05, 1.1, 1.15)


def _finite(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AugmentationError(f"augmentation: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise AugmentationError(f"augmentation: {name} must be finite, got {value!r}")
    return v


@dataclass(frozen=True)
class Augmentation:
    """What to do to one clip (see the module docstring for each effect, its units and the order).

    Invalid values raise :class:`AugmentationError` at construction.
    """

    speed: float = 1.0
    pitch_semitones: float = 0.0
    tempo: float = 1.0
    snr_db: float | None = None
    noise: str = "white"
    rt60_s: float | None = None
    drr_db: float = 3.0
    gain_db: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = FACTOR_RANGE
        for name in ("speed", "tempo"):
            v = _finite(name, getattr(self, name))
            if not lo < v < hi:
                raise AugmentationError(f"augmentation: {name}={v} is outside ({lo}, {hi})")
        p = _finite("pitch_semitones", self.pitch_semitones)
        if abs(p) > MAX_PITCH_SEMITONES:
            raise AugmentationError(
                f"augmentation: pitch_semitones={p} is outside [-{MAX_PITCH_SEMITONES}, {MAX_PITCH_SEMITONES}]")
        if self.snr_db is not None:
            _finite("snr_db", self.snr_db)
        if self.noise not in NOISES:
            raise AugmentationError(f"augmentation: unknown noise {self.noise!r} (one of {', '.join(NOISES)})")
        if self.rt60_s is not None:
            r = _finite("rt60_s", self.rt60_s)
            if not 0.0 < r <= MAX_RT60_S:
                raise AugmentationError(f"augmentation: rt60_s={r} is outside (0, {MAX_RT60_S}]")
        _finite("drr_db", self.drr_db)
        g = _finite("gain_db", self.gain_db)
        if abs(g) > MAX_GAIN_DB:
            raise AugmentationError(f"augmentation: gain_db={g} is outside [-{MAX_GAIN_DB}, {MAX_GAIN_DB}]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise AugmentationError(f"augmentation: seed must be a non-negative int, got {self.seed!r}")

    @property
    def is_identity(self) -> bool:
        """True when :func:`apply` returns the clip unchanged (the seed is then irrelevant)."""
        return (self.speed == 1.0 and self.tempo == 1.0 and self.pitch_semitones == 0.0
                and self.snr_db is None and self.rt60_s is None and self.gain_db == 0.0)

    def to_str(self) -> str:
        """Compact, stable text: non-default fields in a fixed order, ``"none"`` when all are default.

        Keys: ``speed, tempo, pitch, snr[:noise], noise, rt60, drr, gain, seed``; floats are written
        with ``repr`` so that :meth:`from_str` gives back an equal object.
        """
        entries = (  # (key, its text, or a false value when the field is at its default)
            ("speed", self.speed != 1.0 and repr(float(self.speed))),
            ("tempo", self.tempo != 1.0 and repr(float(self.tempo))),
            ("pitch", self.pitch_semitones != 0.0 and f"{float(self.pitch_semitones):+}"),
            ("snr", self.snr_db is not None and f"{float(self.snr_db)!r}:{self.noise}"),
            ("noise", self.snr_db is None and self.noise != "white" and self.noise),
            ("rt60", self.rt60_s is not None and repr(float(self.rt60_s))),
            ("drr", self.drr_db != 3.0 and repr(float(self.drr_db))),
            ("gain", self.gain_db != 0.0 and f"{float(self.gain_db):+}"),
            ("seed", self.seed != 0 and str(self.seed)),
        )
        parts = [f"{key}={text}" for key, text in entries if text]
        return ",".join(parts) if parts else "none"

    @classmethod
    def from_str(cls, text: str) -> Augmentation:
        """Parse :meth:`to_str`'s form (any key order); raises :class:`AugmentationError`."""
        s = text.strip()
        if s in ("", "none"):
            return cls()
        keys = {"speed": "speed", "tempo": "tempo", "pitch": "pitch_semitones", "snr": "snr_db",
                "noise": "noise", "rt60": "rt60_s", "drr": "drr_db", "gain": "gain_db", "seed": "seed"}
        kw: dict = {}
        for item in s.split(","):
            key, sep, value = item.strip().partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in keys:
                raise AugmentationError(f"augmentation {text!r}: cannot parse {item!r} "
                                        f"(expected key=value with key in {', '.join(keys)})")
            if keys[key] in kw:
                raise AugmentationError(f"augmentation {text!r}: {key} given twice")
            try:
                if key == "noise":
                    kw["noise"] = value
                elif key == "seed":
                    kw["seed"] = int(value)
                elif key == "snr":
                    num, _, colour = value.partition(":")
                    kw["snr_db"] = float(num)
                    if colour:
                        if "noise" in kw:
                            raise AugmentationError(f"augmentation {text!r}: noise given twice")
                        kw["noise"] = colour.strip()
                else:
                    kw[keys[key]] = float(value)
            except ValueError:
                raise AugmentationError(f"augmentation {text!r}: bad value in {item!r}") from None
        return cls(**kw)

    def __str__(self) -> str:
        return self.to_str()


# --------------------------------------------------------------------------------------------------
# The effects. Each takes and returns a 1-D float32 numpy array.


def _rational(factor: float) -> Fraction:
    return Fraction(factor).limit_denominator(_MAX_DENOMINATOR)


def _resample_by(x: np.ndarray, factor: Fraction) -> np.ndarray:
    """Play ``x`` ``factor`` times faster: length / factor, frequencies x factor."""
    if factor == 1:
        return x
    y = resample(torch.from_numpy(x), factor.numerator, factor.denominator)
    return y.numpy()


def _wsola(x: np.ndarray, out_len: int, sample_rate: int) -> np.ndarray:
    """Time-stretch ``x`` to ``out_len`` samples keeping its pitch (WSOLA, Verhelst & Roelands 1993).

    Output frame k (Hann, length N, centred at k*N/2) is copied from the input near its nominal
    position k*N/2*rate, shifted within +-tolerance to best continue (cross-correlation) the input
    that followed the previous copied frame.
    """
    n_in = len(x)
    if out_len == n_in:
        return x
    frame = max(2 * round(_WSOLA_FRAME_S * sample_rate / 2), 8)
    hop = frame // 2
    tol = max(round(_WSOLA_TOLERANCE_S * sample_rate), 1)
    rate = n_in / out_len
    n_frames = out_len // hop + 2
    # input padded so every candidate segment (and the natural continuation) is in range
    lead = hop + tol + frame
    max_nominal = math.ceil((n_frames - 1) * hop * rate)
    tail = max_nominal + 2 * frame + 2 * tol + 2 * hop - n_in + 1
    xp = np.concatenate([np.zeros(lead, np.float32), x.astype(np.float32, copy=False),
                         np.zeros(max(tail, 0), np.float32)])
    win = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame)).astype(np.float32)  # periodic Hann
    y = np.zeros(n_frames * hop + frame, np.float32)
    prev = None
    for k in range(n_frames):
        # padded-input start of the frame centred at nominal input position k*hop*rate
        nominal = lead + round(k * hop * rate) - hop
        if prev is None:
            start = nominal
        else:
            template = xp[prev + hop: prev + hop + frame]
            region = xp[nominal - tol: nominal + tol + frame]
            corr = np.correlate(region, template, "valid")
            start = nominal - tol + int(np.argmax(corr))
        y[k * hop: k * hop + frame] += xp[start: start + frame] * win
        prev = start
    # output frame k is centred at output sample k*hop, i.e. y index k*hop + hop
    return y[hop: hop + out_len].copy()


def _reverb(x: np.ndarray, sample_rate: int, rt60_s: float, drr_db: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _RNG_REVERB])
    n = max(round(rt60_s * sample_rate), 2)
    t = np.arange(n) / sample_rate
    h = rng.standard_normal(n) * np.exp(-3.0 * math.log(10.0) * t / rt60_s)  # energy -60 dB at rt60
    h[0] = 0.0
    h *= math.sqrt(10.0 ** (-drr_db / 10.0) / float(np.sum(h * h)))  # reverberant energy vs direct = 1
    h[0] = 1.0
    h /= math.sqrt(float(np.sum(h * h)))
    y = AF.fftconvolve(torch.from_numpy(x), torch.from_numpy(h.astype(np.float32)), mode="full")
    return y[: len(x)].numpy()


def _colored(n: int, sample_rate: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1/f^exponent (nothing below 20 Hz when exponent > 0)."""
    white = rng.standard_normal(n)
    if exponent == 0.0:
        return white
    spec = np.fft.rfft(white)
    f = np.fft.rfftfreq(n, 1.0 / sample_rate)
    shape = np.zeros_like(f)
    keep = f >= _COLOR_LOW_CUT_HZ
    shape[keep] = (f[keep] / _COLOR_LOW_CUT_HZ) ** (-exponent / 2.0)
    return np.fft.irfft(spec * shape, n)


def _babble(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(x)
    out = np.zeros(n, np.float64)
    for _ in range(_BABBLE_VOICES):
        factor = _BABBLE_SPEEDS[int(rng.integers(len(_BABBLE_SPEEDS)))]
        v = _resample_by(x, Fraction(factor).limit_denominator(_MAX_DENOMINATOR)).astype(np.float64)
        v = np.resize(v, n)  # tiles when the copy got shorter
        v = np.roll(v, int(rng.integers(n)))
        rms = math.sqrt(float(np.mean(v * v)))
        if rms > 0:
            out += v / rms
    return out


def _noise(x: np.ndarray, sample_rate: int, snr_db: float, kind: str, seed: int) -> np.ndarray:
    p_signal = float(np.mean(x.astype(np.float64) ** 2))
    if p_signal == 0.0:
        return x
    rng = np.random.default_rng([seed, _RNG_NOISE])
    if kind == "babble":
        noise = _babble(x, rng)
    else:
        noise = _colored(len(x), sample_rate, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind], rng)
    p_noise = float(np.mean(noise * noise))
    if p_noise == 0.0:
        return x
    scale = math.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (x + noise * scale).astype(np.float32)


def _scale_words(words: list[WordTiming], factor: float, duration_s: float) -> list[WordTiming]:
    out = []
    for w in words:
        start = min(max(w.start_s * factor, 0.0), duration_s)
        end = min(max(w.end_s * factor, start), duration_s)
        out.append(WordTiming(w.word, start, end))
    return out


def apply(wave: torch.Tensor | np.ndarray, sample_rate: int, aug: Augmentation,
          words: list[WordTiming] | None = None) -> tuple[torch.Tensor | np.ndarray, list[WordTiming] | None]:
    """Apply ``aug`` to a mono clip; return ``(new_wave, new_words)``.

    ``wave`` is a 1-D float waveform in [-1, 1] (torch tensor or numpy array; the result has the same
    kind, float32, at the same ``sample_rate``). Effects run in the order speed, tempo, pitch,
    reverb, noise, gain (module docstring). ``words`` are rescaled by the duration change (speed
    and tempo multiply times by 1/factor) and clipped inside the new clip; they are new objects
    (``None`` stays ``None``). The result is peak-normalised to 0.99 only if it would clip.
    Deterministic: the same ``aug`` (incl. its seed) gives the same output.
    Raises :class:`AugmentationError` on an empty, non-1-D or non-finite wave, a bad sample rate or
    an invalid augmentation.
    """
    if not isinstance(aug, Augmentation):
        raise AugmentationError(f"apply: expected an Augmentation, got {type(aug).__name__}")
    aug.__post_init__()  # re-check: a frozen dataclass can still be forged with object.__setattr__
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AugmentationError(f"apply: sample_rate must be a positive int, got {sample_rate!r}")
    as_torch = isinstance(wave, torch.Tensor)
    x = wave.detach().cpu().numpy() if as_torch else np.asarray(wave)
    if x.ndim != 1:
        raise AugmentationError(f"apply: expected a 1-D waveform, got shape {tuple(x.shape)}")
    if x.size == 0:
        raise AugmentationError("apply: waveform is empty")
    x = x_in = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise AugmentationError("apply: waveform contains NaN or infinite samples")
    time_factor = 1.0  # new time = old time * time_factor
    if aug.speed != 1.0:
        r = _rational(aug.speed)
        x = _resample_by(x, r)
        time_factor /= float(r)
    if aug.tempo != 1.0:
        x = _wsola(x, max(round(len(x) / aug.tempo), 1), sample_rate)
        time_factor /= aug.tempo
    if aug.pitch_semitones != 0.0:
        n = len(x)
        x = _wsola(_resample_by(x, _rational(2.0 ** (aug.pitch_semitones / 12.0))), n, sample_rate)
    if aug.rt60_s is not None:
        x = _reverb(x, sample_rate, aug.rt60_s, aug.drr_db, aug.seed)
    if aug.snr_db is not None:
        x = _noise(x, sample_rate, aug.snr_db, aug.noise, aug.seed)
    if aug.gain_db != 0.0:
        x = x * np.float32(10.0 ** (aug.gain_db / 20.0))
    x = np.ascontiguousarray(x, dtype=np.float32)
    peak = float(np.max(np.abs(x)))
    if peak > 1.0:
        x = x * np.float32(CLIP_PEAK / peak)
    elif np.shares_memory(x, x_in):
        x = x.copy()  # never hand back the caller's buffer
    new_words = None if words is None else _scale_words(words, time_factor, len(x) / sample_rate)
    return (torch.from_numpy(x) if as_torch else x), new_words


# --------------------------------------------------------------------------------------------------
# Drawing augmentations for a corpus.


@dataclass
class AugmentationPolicy:
    """How to draw one :class:`Augmentation` per clip. Each ``p_*`` is the probability of that effect;
    its value is drawn uniformly from its range (``speed`` uniformly from ``speeds``).

    The defaults keep speech intelligible for an ASR encoder (Whisper): speed 0.9-1.1, pitch within
    3 semitones, tempo within 10 %, SNR >= 10 dB, RT60 <= 0.7 s with a direct path 0-10 dB above the
    reverberation, gain within -6..0 dB.
    """

    speeds: tuple[float, ...] = (0.9, 1.0, 1.1)
    pitch_range_semitones: tuple[float, float] = (-3.0, 3.0)
    p_pitch: float = 0.3
    tempo_range: tuple[float, float] = (0.9, 1.1)
    p_tempo: float = 0.2
    snr_db_range: tuple[float, float] = (10.0, 30.0)
    p_noise: float = 0.3
    noises: tuple[str, ...] = ("white", "pink", "brown", "babble")
    rt60_range_s: tuple[float, float] = (0.2, 0.7)
    drr_db_range: tuple[float, float] = (0.0, 10.0)
    p_reverb: float = 0.2
    gain_db_range: tuple[float, float] = (-6.0, 0.0)
    p_gain: float = 0.2

    def __post_init__(self) -> None:
        self.speeds = tuple(self.speeds)
        self.noises = tuple(self.noises)
        if not self.speeds:
            raise AugmentationError("augmentation policy: speeds is empty")
        if not self.noises:
            raise AugmentationError("augmentation policy: noises is empty")
        for name in ("p_pitch", "p_tempo", "p_noise", "p_reverb", "p_gain"):
            p = _finite(name, getattr(self, name))
            if not 0.0 <= p <= 1.0:
                raise AugmentationError(f"augmentation policy: {name}={p} is not a probability")
        for name in ("pitch_range_semitones", "tempo_range", "snr_db_range", "rt60_range_s",
                     "drr_db_range", "gain_db_range"):
            rng = tuple(getattr(self, name))
            if len(rng) != 2 or _finite(name, rng[0]) > _finite(name, rng[1]):
                raise AugmentationError(f"augmentation policy: {name}={rng} is not a (low, high) pair")
            setattr(self, name, rng)
        # every extreme must make a valid Augmentation
        for field_name, values in (("speed", self.speeds), ("tempo", self.tempo_range),
                                   ("pitch_semitones", self.pitch_range_semitones), ("rt60_s", self.rt60_range_s),
                                   ("gain_db", self.gain_db_range), ("noise", self.noises)):
            for v in values:
                Augmentation(**{field_name: v})

    def sample(self, rng: random.Random) -> Augmentation:
        """Draw one augmentation; deterministic given ``rng``'s state (always 13 draws).

        Values are rounded (speed/tempo 0.01, pitch 0.1 semitone, SNR/DRR/gain 0.1 dB, RT60 10 ms)
        so that manifests stay short. The seed is drawn always but kept only when noise or reverb
        is on (otherwise it has no effect and is 0).
        """
        speed = self.speeds[rng.randrange(len(self.speeds))]
        use_pitch, pitch = rng.random() < self.p_pitch, round(rng.uniform(*self.pitch_range_semitones), 1)
        use_tempo, tempo = rng.random() < self.p_tempo, round(rng.uniform(*self.tempo_range), 2)
        use_noise, snr = rng.random() < self.p_noise, round(rng.uniform(*self.snr_db_range), 1)
        noise = self.noises[rng.randrange(len(self.noises))]
        use_reverb, rt60 = rng.random() < self.p_reverb, round(rng.uniform(*self.rt60_range_s), 2)
        drr = round(rng.uniform(*self.drr_db_range), 1)
        use_gain, gain = rng.random() < self.p_gain, round(rng.uniform(*self.gain_db_range), 1)
        seed = rng.randrange(2**31)
        # rounding must not leave the (open) factor interval or the configured range
        tempo = min(max(tempo, self.tempo_range[0]), self.tempo_range[1])
        rt60 = min(max(rt60, self.rt60_range_s[0]), self.rt60_range_s[1])
        return Augmentation(
            speed=float(speed),
            pitch_semitones=pitch if use_pitch and pitch != 0.0 else 0.0,
            tempo=tempo if use_tempo else 1.0,
            snr_db=snr if use_noise else None,
            noise=noise if use_noise else "white",
            rt60_s=rt60 if use_reverb else None,
            drr_db=drr if use_reverb else 3.0,
            gain_db=gain if use_gain and gain != 0.0 else 0.0,
            seed=seed if (use_noise or use_reverb) else 0,
        )


#: Named presets. Use :func:`get_policy` for a private copy.
POLICIES: dict[str, AugmentationPolicy] = {
    "none": AugmentationPolicy(speeds=(1.0,), p_pitch=0.0, p_tempo=0.0, p_noise=0.0, p_reverb=0.0,
                               p_gain=0.0),
    "light": AugmentationPolicy(speeds=(0.9, 1.0, 1.1), p_pitch=0.0, p_tempo=0.0,
                                snr_db_range=(20.0, 30.0), p_noise=0.2, noises=("white", "pink"),
                                rt60_range_s=(0.2, 0.4), drr_db_range=(5.0, 10.0), p_reverb=0.1,
                                p_gain=0.0),
    "default": AugmentationPolicy(),
}


def get_policy(name: str) -> AugmentationPolicy:
    """A copy of preset ``name`` (one of :data:`POLICIES`)."""
    if name not in POLICIES:
        raise AugmentationError(f"unknown augmentation policy {name!r} (one of {', '.join(POLICIES)})")
    return replace(POLICIES[name])


# --------------------------------------------------------------------------------------------------
# Cost measurement: python -m speechlm.data.augment


def measure_cost(sample_rate: int = 16_000, clip_s: float = 3.0, repeats: int = 5) -> dict[str, float]:
    """Seconds of CPU per second of audio for each effect (best of ``repeats``), 1 torch thread."""
    import time

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    t = np.arange(int(clip_s * sample_rate)) / sample_rate
    wave = (0.3 * np.sin(2 * np.pi * 150 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
    cases = {
        "speed 1.1": Augmentation(speed=1.1),
        "tempo 1.1": Augmentation(tempo=1.1),
        "pitch +2": Augmentation(pitch_semitones=2.0),
        "rt60 0.5 s": Augmentation(rt60_s=0.5),
        "noise white": Augmentation(snr_db=15.0, noise="white"),
        "noise pink": Augmentation(snr_db=15.0, noise="pink"),
        "noise brown": Augmentation(snr_db=15.0, noise="brown"),
        "noise babble": Augmentation(snr_db=15.0, noise="babble"),
        "gain -3": Augmentation(gain_db=-3.0),
        "all": Augmentation(speed=1.1, tempo=0.95, pitch_semitones=2.0, rt60_s=0.5, snr_db=15.0,
                            noise="pink", gain_db=-3.0, seed=1),
    }
    out = {}
    for name, aug in cases.items():
        apply(wave, sample_rate, aug)  # warm-up
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            apply(wave, sample_rate, aug)
            best = min(best, time.perf_counter() - t0)
        out[name] = best / clip_s
    return out


if __name__ == "__main__":
    for effect, cost in measure_cost().items():
        print(f"{effect:14s} {cost:.5f} s per audio second")
