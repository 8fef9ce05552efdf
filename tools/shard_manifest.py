"""Join manifests and deal their rows round-robin into N shards (for per-rank streaming and parallel jobs).

    python tools/shard_manifest.py --in train-clean-100.jsonl train-clean-360.jsonl --out-dir shards \
        --name train --shards 64 [--lowercase] [--limit 15000]

Writes ``<out-dir>/<name>-00000-of-00064.jsonl`` ... (or ``<out-dir>/<name>.jsonl`` with ``--shards 1``).
``--lowercase`` lower-cases the transcripts (LibriSpeech's are upper case, which a cased LLM tokenizes
into rare pieces); ``--limit`` keeps the first N rows (e.g. a subset to train the aligner on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechlm.data.sharding import shard_manifests
from speechlm.errors import SpeechLMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in", dest="inputs", nargs="+", required=True, help="manifests to join, in order")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--name", required=True, help="shard file name prefix")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--lowercase", action="store_true", help="lower-case the transcripts")
    ap.add_argument("--limit", type=int, default=0, help="keep the first N rows (0 = all)")
    args = ap.parse_args(argv)
    if args.shards < 1:
        print("error: --shards must be at least 1", file=sys.stderr)
        return 2
    try:
        rows = shard_manifests(args.inputs, args.out_dir, args.name, args.shards, args.lowercase, args.limit)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    hours = sum(u.duration_s for u in rows) / 3600
    print(f"{len(rows)} rows ({hours:.1f} h) -> {args.shards} shard(s) {Path(args.out_dir)}/{args.name}*.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
