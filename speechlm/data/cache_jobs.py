"""Feature caches from the command line's side (tools/cache_features.py, tools/merge_feature_caches.py): encode a
manifest with an encoder loaded by name, and join caches built in parallel into the one cache training reads."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from speechlm.atomic import atomic_write_text
from speechlm.data.feature_cache import FORMAT, INDEX, FeatureCache, build_feature_cache, key_mismatch
from speechlm.errors import FeatureCacheError


def encode_manifest(manifest: str | Path, encoder: str, out_dir: str | Path, layers: Sequence[int] = (-1,),
                    batch_size: int = 8, skip_bad: bool = False, whisper_pad_to_30s: bool = False,
                    dtype: str = "auto", shard_mb: float = 256.0) -> FeatureCache:
    """Encode ``manifest``'s audio with the frozen encoder ``encoder`` (HF name or folder; on the GPU when
    there is one) into the cache ``out_dir`` (see :func:`build_feature_cache`: fresh entries are reused).
    ``dtype`` is the precision the encoder runs in (``auto``: bf16 on a GPU that has it, else fp32)."""
    import torch

    from speechlm.models.encoder import SpeechEncoder

    gpu = torch.cuda.is_available()
    if dtype == "auto":
        dtype = "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    model = SpeechEncoder.from_pretrained(encoder, layers=list(layers), whisper_pad_to_30s=whisper_pad_to_30s,
                                          dtype=dtype)
    if gpu:
        model.to("cuda")
    return build_feature_cache(manifest, model, out_dir, batch_size=batch_size, skip_bad=skip_bad, shard_mb=shard_mb)


def merge_feature_caches(inputs: Sequence[str | Path], out_dir: str | Path) -> FeatureCache:
    """Merge complete caches ``inputs``, built by the same encoder settings, into ``out_dir``; returns the
    opened result. Shards are hard-linked (no copy: inputs and output must be on one filesystem) under new
    names, then ``index.json`` is written last, so an interrupted merge leaves no openable cache. The
    inputs stay valid."""
    caches = [FeatureCache.open(p) for p in inputs]
    if not caches:
        raise FeatureCacheError("no input feature caches given")
    key = caches[0].encoder_key
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)
    for old in out.glob("shard-*.safetensors"):
        old.unlink()
    shards: dict[str, int] = {}
    utterances: dict[str, dict] = {}
    skipped: list[dict] = []
    manifests: list[str] = []
    for cache in caches:
        diff = key_mismatch(cache.encoder_key, key)
        if diff:
            raise FeatureCacheError(f"{cache.root}: built with other encoder settings than {caches[0].root} "
                                    f"({', '.join(diff)})")
        renamed: dict[str, str] = {}
        for name, size in cache.index["shards"].items():
            new = f"shard-{len(shards):05d}.safetensors"
            try:
                os.link(cache.root / name, out / new)
            except OSError as e:
                raise FeatureCacheError(f"{cache.root / name}: cannot hard-link into {out} ({e}); "
                                        "inputs and output must be on one filesystem") from None
            renamed[name] = new
            shards[new] = size
        for utt_id, entry in cache.index["utterances"].items():
            if utt_id in utterances:
                raise FeatureCacheError(f"{cache.root}: utterance {utt_id!r} is also in another input cache")
            utterances[utt_id] = {**entry, "shard": renamed[entry["shard"]]}
        skipped += cache.skipped
        manifests.append(str(cache.index.get("manifest", "")))
    index = {"format": FORMAT, "encoder_key": key, "manifest": manifests, "dtype": caches[0].index.get("dtype"),
             "shards": shards, "utterances": utterances, "skipped": skipped}
    atomic_write_text(out / INDEX, json.dumps(index, indent=1))
    return FeatureCache.open(out, key)
