"""Time connector forward+backward on CPU for a batch of clips (default: 8 x 10 s at 50 Hz, d_enc 512, d_llm 576).

    .venv/bin/python tools/benchmarks/bench_connector.py --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse

from speechlm.perf.bench import add_timing_args
from speechlm.perf.benchmarks.connector import run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate-hz", type=float, default=50.0)
    ap.add_argument("--d-enc", type=int, default=512)
    ap.add_argument("--d-llm", type=int, default=576)
    ap.add_argument("--tokens-per-s", type=float, default=3.5)
    add_timing_args(ap, threads=1, repeats=5)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
