"""Frozen-encoder frames for manifest rows, from a feature cache or by running the encoder, in padded batches."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from speechlm.data.audio import load_audio
from speechlm.data.manifest import Utterance
from speechlm.errors import AudioError, FeatureCacheError, SpeechLMError


@dataclass
class FeatureBatch:
    utts: list[Utterance]
    features: torch.Tensor        # (B, L, T, D) float32, zero-padded in T
    lengths: torch.Tensor         # (B,) int64 valid frames
    encode_s: float               # wall seconds spent producing these features (0 from a cache)


def pad_features(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of ``(L, T_i, D)`` -> ``(B, L, T_max, D)`` zero-padded + ``(B,)`` lengths."""
    lengths = torch.tensor([f.shape[1] for f in feats], dtype=torch.int64)
    out = feats[0].new_zeros(len(feats), feats[0].shape[0], int(lengths.max()), feats[0].shape[2])
    for i, f in enumerate(feats):
        out[i, :, : f.shape[1]] = f
    return out, lengths


def by_length(utts: Sequence[Utterance]) -> list[int]:
    """Indices of ``utts`` shortest first: batches of neighbours in this order carry almost no padding (rows in
    a synthesized manifest's own order make batches about half padding, and the aligner's attention pays for it)."""
    return sorted(range(len(utts)), key=lambda i: (utts[i].duration_s, i))


def iter_feature_batches(utts: Sequence[Utterance], batch_size: int, encoder=None, cache=None,
                         skip_bad: bool = False, bad_rows: list[str] | None = None) -> Iterator[FeatureBatch]:
    """Batches of ``utts`` in order with their frames: from ``cache`` (a FeatureCache) when it has the row,
    else from ``encoder`` (a SpeechEncoder). With ``skip_bad`` unreadable rows are reported in ``bad_rows``."""
    if encoder is None and cache is None:
        raise ValueError("need a feature cache or an encoder")
    for i in range(0, len(utts), batch_size):
        chunk = list(utts[i:i + batch_size])
        feats, kept = [], []
        t0 = time.perf_counter()
        waves, wave_utts = [], []
        for utt in chunk:
            try:
                if cache is not None and utt.id in cache:
                    feats.append(cache[utt.id])
                    kept.append(utt)
                elif encoder is None:
                    raise FeatureCacheError(f"{cache.root}: utterance {utt.id!r} is not in the feature cache")
                else:
                    waves.append(load_audio(utt.audio_path, target_sr=encoder.sample_rate,
                                            expected_sr=utt.sample_rate))
                    wave_utts.append(utt)
            except (AudioError, FeatureCacheError) as e:
                if not skip_bad:
                    raise
                if bad_rows is not None:
                    bad_rows.append(f"{utt.id}: {e}")
        cached_s = time.perf_counter() - t0
        if waves:
            t1 = time.perf_counter()
            with torch.no_grad():
                enc = encoder(waves)
            encode_s = time.perf_counter() - t1
            for k, utt in enumerate(wave_utts):
                feats.append(enc.features[k, :, : int(enc.lengths[k])])
                kept.append(utt)
        else:
            encode_s = 0.0
        if not kept:
            continue
        features, lengths = pad_features([f.float() for f in feats])
        yield FeatureBatch(kept, features, lengths, encode_s + cached_s)


def describe(encoder=None, cache=None) -> tuple[str, list[int], float, int]:
    """``(encoder name, layers, frame rate Hz, hidden size)`` of whatever provides the frames."""
    if encoder is not None:
        return encoder.name, list(encoder.layers), float(encoder.frame_rate_hz), int(encoder.hidden_size)
    if cache is not None:
        key = cache.encoder_key
        return str(key.get("encoder", "")), list(cache.layers), cache.frame_rate_hz, cache.hidden_size
    raise SpeechLMError("need a feature cache or an encoder")


def open_frame_source(aligner, encoder_path: str = "", cache_dir: str = ""):
    """``(encoder or None, FeatureCache or None)`` giving the frames ``aligner`` (an
    :class:`alignment.aligner.Aligner`) was trained on.

    A cache is used when given (checked against the model); the encoder (``encoder_path``, default the
    one the model names) is loaded when there is no cache or it is asked for (rows missing in the cache).
    An aligner trained with an adapted encoder reads the adapted encoder's frames: a cache (the frozen
    encoder's frames) is refused.
    """
    from speechlm.data.feature_cache import FeatureCache
    from speechlm.errors import ModelError

    cfg = aligner.model.config
    if cache_dir and aligner.encoder_adapt is not None:
        raise ModelError(f"{cache_dir}: this aligner was trained with an adapted encoder ({aligner.encoder_adapt}); "
                         "cached frames are the frozen encoder's, so it reads audio instead: drop the feature cache")
    cache = FeatureCache.open(Path(cache_dir).expanduser()) if cache_dir else None
    if cache is not None and (cache.hidden_size != cfg.input_dim or abs(cache.frame_rate_hz - cfg.frame_rate_hz) > 1e-6
                              or len(cache.layers) != cfg.num_input_layers):
        raise ModelError(f"{cache_dir}: cached frames ({cache.hidden_size}-dim, layers {list(cache.layers)}, "
                         f"{cache.frame_rate_hz} Hz) do not match the aligner ({cfg.input_dim}-dim, layers "
                         f"{cfg.encoder_layers}, {cfg.frame_rate_hz} Hz)")
    encoder = aligner.load_encoder(encoder_path) if cache is None or encoder_path else None
    return encoder, cache
