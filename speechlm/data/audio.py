"""The one audio loader: soundfile to read, mono down-mix, torchaudio to resample, clear errors."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torchaudio.transforms import Resample

from speechlm.errors import AudioError


@lru_cache(maxsize=16)
def _resampler(orig_hz: int, new_hz: int, dtype: torch.dtype) -> Resample:
    # The same sinc kernel that AF.resample builds on every call (same arguments, computed in the
    # wave's dtype), built once per rate pair and dtype.
    return Resample(orig_hz, new_hz, dtype=dtype)


def resample(wave: torch.Tensor, orig_hz: int, new_hz: int) -> torch.Tensor:
    """Resample a 1-D float waveform from ``orig_hz`` to ``new_hz`` (no-op when equal).

    Same samples as ``torchaudio.functional.resample``; the kernel of CPU float waves is cached
    per (orig_hz, new_hz, dtype).
    """
    if orig_hz == new_hz:
        return wave
    if wave.device.type == "cpu" and wave.is_floating_point():
        return _resampler(orig_hz, new_hz, wave.dtype)(wave)
    return AF.resample(wave, orig_hz, new_hz)


def load_audio(path: str | Path, target_sr: int | None = 16_000, expected_sr: int | None = None
               ) -> torch.Tensor:
    """Read ``path`` as a 1-D float32 waveform in [-1, 1], mono, at ``target_sr`` Hz.

    ``expected_sr`` (e.g. the manifest's ``sample_rate``) is checked against the file; a mismatch
    is an :class:`AudioError`, because it means the manifest describes another file.
    ``target_sr=None`` keeps the file's rate.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 -- soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise AudioError(f"{path}: cannot read audio ({e})") from None
    if expected_sr is not None and sr != expected_sr:
        raise AudioError(f"{path}: sample rate is {sr} Hz but {expected_sr} Hz was expected")
    if data.shape[0] == 0:
        raise AudioError(f"{path}: audio is empty")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    wave = torch.from_numpy(np.ascontiguousarray(mono))
    return resample(wave, sr, target_sr) if target_sr else wave


def audio_info(path: str | Path) -> tuple[int, float]:
    """``(sample_rate, duration_s)`` of an audio file, read from its header."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        info = sf.info(str(path))
    except Exception as e:  # noqa: BLE001 -- any header failure is the same user error
        raise AudioError(f"{path}: cannot read audio header ({e})") from None
    if info.frames == 0:
        raise AudioError(f"{path}: audio is empty")
    return info.samplerate, info.frames / info.samplerate


def save_audio(path: str | Path, wave: torch.Tensor | np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write a waveform ((T,) mono, or (T, channels)) as WAV, 16-bit PCM unless ``subtype`` says otherwise (a
    soundfile subtype, e.g. ``"FLOAT"``), atomically."""
    from speechlm.atomic import atomic_path

    arr = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), arr, sample_rate, subtype=subtype, format="WAV")
