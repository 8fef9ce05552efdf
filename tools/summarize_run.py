"""Gather a recipe run's results into ``<run>/summary.json`` and print them as a table.

    python tools/summarize_run.py --run runs/tiny [--corpus DIR]

What each block holds and where it comes from: speechlm/eval/summary.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechlm.eval.summary import summarize, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder, e.g. runs/tiny")
    ap.add_argument("--corpus", default=None, help="the corpus folder the run trained on (its summary.json)")
    args = ap.parse_args(argv)
    summary = summarize(Path(args.run), Path(args.corpus) if args.corpus else None)
    print(table(summary))
    print(f"\nwritten: {Path(args.run) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
