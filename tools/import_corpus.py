"""Write a manifest from a LibriSpeech, MLS or plain folder corpus.

    python tools/import_corpus.py --layout librispeech --root LibriSpeech/train-clean-100 \
        --split train --out data/train.jsonl [--skip-bad]
"""

from __future__ import annotations

import argparse
import sys

from speechlm.data.importers import IMPORTERS
from speechlm.data.manifest import write_manifest
from speechlm.errors import SpeechLMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=sorted(IMPORTERS), required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-bad", action="store_true", help="skip and report bad rows instead of stopping")
    args = ap.parse_args(argv)
    bad: list[str] = []
    try:
        rows = IMPORTERS[args.layout](args.root, args.split, skip_bad=args.skip_bad, bad_rows=bad)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = write_manifest(args.out, rows)
    hours = sum(r.duration_s for r in rows) / 3600
    print(f"wrote {n} rows ({hours:.2f} h) to {args.out}; skipped {len(bad)} bad rows")
    for b in bad:
        print(f"  skipped: {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
