"""Voice activity: where in a clip somebody speaks. One detector for inference, serving and data import.

    from speechlm.data.vad import VADConfig, VoiceActivity

    vad = VoiceActivity(VADConfig(pad_ms=50))
    found = vad.detect(wave, 16_000)         # a 1-D tensor/array at any rate (resampled to 16 kHz)
    found.regions                            # [(start_s, end_s), ...] in the clip's time, padded, merged
    found.speech_s, found.no_speech          # seconds of (padded) speech; True when there is none

The detector is Silero VAD (the ``silero-vad`` package ships its model files; nothing is downloaded). Of
the package's three CPU models the *sequence* ONNX model is used: it gives the same per-frame (32 ms)
speech probabilities as the streaming JIT and ONNX models (to 2e-6) but runs a whole block of frames in one
ONNX Runtime call instead of one Python call per frame, about 5x faster than the streaming ONNX model and
6x faster than the JIT model on one CPU thread (docs/PERFORMANCE.md, "Voice activity"). The model is loaded
once per process (:func:`silero_model`, behind a lock) and keeps no state between calls (its LSTM state is
local to each call), so one :class:`VoiceActivity` can serve many threads at once. It runs on one CPU thread.

The probabilities become regions by Silero's own rule (``get_speech_timestamps_from_probs``): speech starts
where the probability rises above ``threshold`` and ends where it stays below ``threshold - 0.15`` for
``min_silence_ms``; regions shorter than ``min_speech_ms`` are dropped; each region is widened by ``pad_ms``
on both sides (``regions`` stop at the clip's edges, ``extents`` keep the whole padding; regions closer than
twice the padding merge). Before the padding, each edge is made sample-exact: it moves to the first / last
sample above ``quiet_db`` within ``edge_search_ms`` of the model's edge (:func:`refine_edges`), so the same
speech gives the same regions wherever it sits in a clip. A clip shorter than one model frame (512 samples at
16 kHz, 32 ms) has no speech.

Importing ``silero_vad`` sets torch's thread count to 1 for the whole process (``silero_vad/model.py``);
:func:`silero_model` puts the caller's thread count back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from speechlm.errors import ConfigError, ModelError

#: The rate the detector runs at; other rates are resampled to it.
VAD_SAMPLE_RATE = 16_000
#: One model frame: 512 samples at 16 kHz (32 ms).
FRAME_SAMPLES = 512
#: The model file (in the silero_vad package's data folder): the whole-sequence ONNX export.
MODEL_FILE = "silero_vad_16k_sequence.onnx"


@dataclass
class VADConfig:
    """How speech regions are found. ``enabled=False``: the whole clip counts as speech (no detector runs)."""

    enabled: bool = True
    threshold: float = 0.5  # speech probability above which a frame is speech (Silero's default)
    min_speech_ms: int = 250  # shorter bursts are dropped (clicks, a cough's onset)
    min_silence_ms: int = 300  # a pause must last this long to end a region (shorter pauses stay inside)
    pad_ms: int = 50  # each region is widened by this much on both sides (within the clip)
    edge_search_ms: int = 150  # how far past the model's edges the sample-exact edges are looked for
    quiet_db: float = -55.0  # samples below this level (dB of full scale) count as silence at the edges

    def __post_init__(self) -> None:
        if not 0.15 < self.threshold < 1:  # the end threshold is threshold - 0.15 and must stay above 0
            raise ConfigError(f"vad.threshold must be in (0.15, 1), got {self.threshold}")
        if not -120.0 <= self.quiet_db < 0:
            raise ConfigError(f"vad.quiet_db must be in [-120, 0) dB of full scale, got {self.quiet_db}")
        for key in ("min_speech_ms", "min_silence_ms", "pad_ms", "edge_search_ms"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"vad.{key} must be an integer >= 0 (milliseconds), got {value!r}")


@dataclass
class VoiceActivityResult:
    """Speech regions of one clip, in seconds from its start (sorted, disjoint, padded)."""

    regions: list[tuple[float, float]]
    duration_s: float
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32), repr=False)
    #: Each region with its whole padding, which may reach past the clip's edges (as if silence surrounded it):
    #: what a decoder should see, zeros outside the clip, so speech at a clip's edge decodes as it would inside.
    extents: list[tuple[float, float]] = field(default_factory=list)

    @property
    def speech_s(self) -> float:
        """Seconds of detected speech (the padded regions' total length)."""
        return float(sum(e - s for s, e in self.regions))

    @property
    def no_speech(self) -> bool:
        return not self.regions

    def sample_bounds(self, sample_rate: int, num_samples: int, extents: bool = False) -> list[tuple[int, int]]:
        """The regions as (start, end) sample indices at ``sample_rate`` within a clip of ``num_samples``
        (``extents``: the :attr:`extents` instead, which may start below 0 and end past the clip)."""
        out = []
        for s, e in (self.extents or self.regions) if extents else self.regions:
            a, b = round(s * sample_rate), round(e * sample_rate)
            if not extents:
                a, b = max(0, a), min(num_samples, b)
            if b > a:
                out.append((a, b))
        return out


_LOCK = threading.Lock()
_MODEL: Any = None


def silero_model() -> Any:
    """The Silero sequence model of this process, loaded on first use (thread-safe)."""
    global _MODEL
    if _MODEL is not None:
        return _MODEL
    with _LOCK:
        if _MODEL is None:
            threads = torch.get_num_threads()  # importing silero_vad sets 1 torch thread: put it back below
            try:
                from importlib.resources import files

                from silero_vad.sequence_vad import SileroVADSequence

                path = files("silero_vad.data").joinpath(MODEL_FILE)
                _MODEL = SileroVADSequence(str(path), sampling_rate=VAD_SAMPLE_RATE)
            except (ImportError, OSError) as e:
                raise ModelError(f"Silero VAD cannot be loaded ({e}): pip install silero-vad onnxruntime") from None
            finally:
                torch.set_num_threads(threads)
    return _MODEL


class VoiceActivity:
    """Silero VAD with one :class:`VADConfig`; :meth:`detect` a clip's speech regions. Safe to share between
    threads (the model is loaded once per process and holds no state between calls)."""

    def __init__(self, cfg: VADConfig | None = None):
        self.cfg = cfg or VADConfig()

    def probabilities(self, wave: Any, sample_rate: int = VAD_SAMPLE_RATE) -> np.ndarray:
        """Speech probability per 32 ms frame of a 1-D clip (any rate; resampled to 16 kHz)."""
        x = self._as_16k(wave, sample_rate)
        if x.size < FRAME_SAMPLES:
            return np.zeros(0, dtype=np.float32)
        return silero_model().audio_forward(x, VAD_SAMPLE_RATE)

    def detect(self, wave: Any, sample_rate: int = VAD_SAMPLE_RATE) -> VoiceActivityResult:
        """The clip's speech regions (seconds). With ``enabled=False`` the whole clip is one region."""
        x = self._as_16k(wave, sample_rate)
        duration_s = x.size / VAD_SAMPLE_RATE
        if not self.cfg.enabled:
            return VoiceActivityResult([(0.0, duration_s)] if x.size else [], duration_s)
        probs = self.probabilities(x, VAD_SAMPLE_RATE)
        if probs.size == 0:
            return VoiceActivityResult([], duration_s, probs)
        from silero_vad.utils_vad import get_speech_timestamps_from_probs

        c = self.cfg
        stamps = get_speech_timestamps_from_probs(
            probs.tolist(), sampling_rate=VAD_SAMPLE_RATE, threshold=c.threshold, min_speech_duration_ms=c.min_speech_ms,
            min_silence_duration_ms=c.min_silence_ms, speech_pad_ms=0, audio_length_samples=int(x.size))
        bounds = refine_edges(x, [(int(t["start"]), int(t["end"])) for t in stamps], VAD_SAMPLE_RATE,
                              c.edge_search_ms, c.quiet_db, c.pad_ms)
        return VoiceActivityResult([(max(a, 0) / VAD_SAMPLE_RATE, min(b, x.size) / VAD_SAMPLE_RATE) for a, b in bounds],
                                   duration_s, probs, [(a / VAD_SAMPLE_RATE, b / VAD_SAMPLE_RATE) for a, b in bounds])

    @staticmethod
    def _as_16k(wave: Any, sample_rate: int) -> np.ndarray:
        from speechlm.data.audio import resample

        t = wave.detach().cpu() if isinstance(wave, torch.Tensor) else torch.from_numpy(np.asarray(wave))
        t = t.float().reshape(-1) if t.ndim <= 1 else None
        if t is None:
            raise ValueError("voice activity needs a 1-D waveform (mono)")
        if int(sample_rate) != VAD_SAMPLE_RATE and t.numel():
            t = resample(t, int(sample_rate), VAD_SAMPLE_RATE)
        return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def refine_edges(x: np.ndarray, spans: list[tuple[int, int]], sample_rate: int, search_ms: int, quiet_db: float,
                 pad_ms: int) -> list[tuple[int, int]]:
    """The model's speech spans (samples, on its 32 ms grid, late at onsets) -> sample-exact padded regions.

    A span's start moves to the first sample above ``quiet_db`` from ``search_ms`` before it on, its end to
    the last such sample up to ``search_ms`` after it (so leading/trailing digital silence is cut and an onset
    the model heard late is caught); a span without any such sample is dropped. Each edge is then widened by
    ``pad_ms`` and overlapping regions are merged. The padding is not cut at the clip's edges (a region may start
    below 0 or end past the clip: clip it to report it). The edges depend only on the samples near them, so
    the same speech gives the same regions wherever it sits in a clip."""
    level = 10.0 ** (quiet_db / 20.0)
    search, pad, n = int(search_ms * sample_rate / 1000), int(pad_ms * sample_rate / 1000), x.size
    out: list[tuple[int, int]] = []
    for s, e in spans:
        lo, hi = max(0, s - search), min(n, e + search)
        loud = np.flatnonzero(np.abs(x[lo:hi]) > level)
        if loud.size == 0:
            continue
        a, b = lo + int(loud[0]) - pad, lo + int(loud[-1]) + 1 + pad
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
