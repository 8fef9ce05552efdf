"""Compression: LLM input vectors per second of audio, SSR against the baselines, on the test split.

    python tools/benchmarks/bench_compression.py --manifest ~/.cache/speechlm/corpus/small-5.0h/test.jsonl \\
        --feature-cache ~/.cache/speechlm/features/small-5.0h/test --aligner runs/small/aligner [--json out.json]

For every test clip (its cached encoder frames) each connector's output count is taken from the connector
itself (a fresh one of the default config: the count depends on the frames only, not on the weights):

* **SSR**: one vector per LLM token. Counted twice: the reference transcript's tokens (what training sees), and
  the tokens the aligner decodes in free mode (what inference sees, no transcript given; ``--aligner``).
* **stack** k=8 (Ultravox), **conv** k=5 (SLAM-LLM), window **Q-Former** (one query per 0.33 s, SALMONN).

Printed: vectors per audio second over the whole split (total vectors / total seconds) and the median clip's,
and the LLM sequence the speech takes for a 30 s and a 5 min clip (baselines: their own count for that many
frames; SSR: the split's measured token rate x duration, since its count follows the words spoken). The
target of issue 15 (SSR at most 4.5 LLM inputs per audio second) is checked on the free-mode count. Writes
JSON (``--json``) and a bar plot (``--png``).
"""

from __future__ import annotations

from speechlm.perf.bench import add_output_args, add_timing_args, bench_parser
from speechlm.perf.benchmarks.compression import run


def main(argv: list[str] | None = None) -> dict:
    from speechlm.paths import cache_dir, models_dir

    ap = bench_parser(__doc__)
    ap.add_argument("--manifest", default=str(cache_dir() / "corpus" / "small-5.0h" / "test.jsonl"))
    ap.add_argument("--feature-cache", default=str(cache_dir() / "features" / "small-5.0h" / "test"))
    ap.add_argument("--tokenizer", default=str(models_dir() / "smollm2-135m"), help="the LLM's tokenizer folder")
    ap.add_argument("--aligner", default="runs/small/aligner", help="'' = no free-mode count")
    ap.add_argument("--limit", type=int, default=0)
    add_timing_args(ap, threads=2)
    add_output_args(ap, "compression")
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
