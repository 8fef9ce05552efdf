"""Encoder throughput on the real Whisper base: variable-length input vs the standard 30 s padding.

    python tools/benchmarks/bench_encoder.py [--threads 2] [--clip-s 10] [--batch 4] [--repeats 3]

Prints audio seconds encoded per wall second for each mode and batch size, and how close the
variable-length features are to the padded ones (per-frame cosine, last layer). The speech is
eSpeak NG reading real English sentences (gensim's test corpus), cut/joined into ~clip-s clips.
"""

from __future__ import annotations

from speechlm.perf.bench import add_timing_args, bench_parser
from speechlm.perf.benchmarks.encoder import run


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__)
    add_timing_args(ap, threads=2, repeats=3)
    ap.add_argument("--clip-s", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--clips", type=int, default=8)
    args = ap.parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
