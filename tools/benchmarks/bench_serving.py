"""Serving: throughput with batching against one request at a time, and the latency of speech streamed in.

    python tools/benchmarks/bench_serving.py --run runs/tiny [--requests 16 --batch 8 --max-tokens 32]
    python tools/benchmarks/bench_serving.py --random        # random connector/aligner on the real models

What is measured and how: speechlm/perf/benchmarks/serving.py; results in docs/PERFORMANCE.md and docs/SERVING.md.
"""

from __future__ import annotations

from speechlm.perf.bench import add_timing_args, bench_parser
from speechlm.perf.benchmarks.serving import run


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__)
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--random", action="store_true", help="a random SSR connector + aligner on the embedded models")
    add_timing_args(ap, threads=1)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clip-s", type=float, default=3.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream-clip-s", type=float, default=6.0)
    ap.add_argument("--hop-s", type=float, default=0.5)
    ap.add_argument("--margin-s", type=float, default=0.2)
    ap.add_argument("--context-s", type=float, default=2.0, help="the second streaming run's re-encoded context")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="", help="also write the JSON here")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
