"""Join feature caches built in parallel (one per manifest shard / GPU) into the one cache training reads.

    python tools/merge_feature_caches.py --in feats/train-part-0 feats/train-part-1 ... --out feats/train

Every input must be complete and built by the same encoder settings. Shards are hard-linked (no copy:
inputs and output must be on one filesystem) under new names, then ``index.json`` is written last, so
an interrupted merge leaves no openable cache. The inputs stay valid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechlm.atomic import atomic_write_text
from speechlm.data.feature_cache import FORMAT, INDEX, FeatureCache, key_mismatch
from speechlm.errors import FeatureCacheError, SpeechLMError


def merge_feature_caches(inputs: list[str | Path], out_dir: str | Path) -> FeatureCache:
    """Merge complete caches ``inputs`` into ``out_dir`` (hard links); returns the opened result."""
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in", dest="inputs", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        cache = merge_feature_caches(args.inputs, args.out)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(cache)} utterances from {len(args.inputs)} caches, {len(cache.index['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
