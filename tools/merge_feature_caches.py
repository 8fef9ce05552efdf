"""Join feature caches built in parallel (one per manifest shard / GPU) into the one cache training reads.

    python tools/merge_feature_caches.py --in feats/train-part-0 feats/train-part-1 ... --out feats/train

Every input must be complete and built by the same encoder settings. Shards are hard-linked (no copy:
inputs and output must be on one filesystem) under new names, then ``index.json`` is written last, so
an interrupted merge leaves no openable cache. The inputs stay valid.
"""

from __future__ import annotations

import argparse
import sys

from speechlm.data.cache_jobs import merge_feature_caches
from speechlm.errors import SpeechLMError


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
