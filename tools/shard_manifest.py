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
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechlm.data.manifest import Utterance, read_manifest, write_manifest
from speechlm.errors import SpeechLMError


def shard_paths(out_dir: Path, name: str, shards: int) -> list[Path]:
    if shards == 1:
        return [out_dir / f"{name}.jsonl"]
    return [out_dir / f"{name}-{k:05d}-of-{shards:05d}.jsonl" for k in range(shards)]


def shard_rows(rows: list[Utterance], shards: int) -> list[list[Utterance]]:
    """Row i goes to shard i % shards, so every shard gets a slice of every input corpus."""
    return [rows[k::shards] for k in range(shards)]


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
        # Whole corpus in memory: ~1 kB a row (LibriSpeech 960 h: 281k rows; MLS English: ~11M rows, ~10 GB).
        rows = [u for path in args.inputs for u in read_manifest(path)]
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.limit:
        rows = rows[: args.limit]
    if args.lowercase:
        rows = [replace(u, text=u.text.lower()) for u in rows]
    seen: set[str] = set()
    for u in rows:
        if u.id in seen:
            print(f"error: id {u.id!r} occurs in more than one input manifest", file=sys.stderr)
            return 1
        seen.add(u.id)
    out_dir = Path(args.out_dir)
    for path, part in zip(shard_paths(out_dir, args.name, args.shards), shard_rows(rows, args.shards), strict=True):
        write_manifest(path, part)
    hours = sum(u.duration_s for u in rows) / 3600
    print(f"{len(rows)} rows ({hours:.1f} h) -> {args.shards} shard(s) {out_dir}/{args.name}*.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
