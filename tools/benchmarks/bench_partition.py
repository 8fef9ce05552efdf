"""Partition-and-fusion against the dense block: the speaker probe (EER/minDCF on held-out speakers) on encoder
features and on the SSR connector's vectors, and the SSR connector's parameters, FLOPs and fwd+bwd time.

    nice -n 19 .venv/bin/python tools/benchmarks/bench_partition.py --groups 4 --seeds 0 1 \
        [--stage1 runs/pf/stage1_g0 runs/pf/stage1_g4] [--out runs/bench/partition.json]

Probe: recipes/configs/speaker_probe_tiny.yaml with --probe-steps steps, trained on the tiny corpus's train split,
scored on all pairs of valid+test utterances (held-out voices) and on valid alone (the speakers the connector
probe can be scored on: only train/valid are aligned). DCF: p_target 0.01, C_miss = C_fa = 1 (normalised).
Connector: bench_connector's batch (8 clips x 10 s, d_enc 512 -> d_llm 576), FLOPs of one forward+backward by
torch.utils.flop_counter (matmuls/attention only), median of --repeats timed steps after a warm-up.
--stage1 adds the final validation metrics of stage-1 runs (their metrics.json) to the table.
Writes JSON and a PNG of the probes' loss curves next to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speechlm.perf.bench import add_timing_args
from speechlm.perf.benchmarks.partition import run

HOME = Path.home() / ".cache" / "speechlm"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--probe-steps", type=int, default=600)
    ap.add_argument("--corpus", default=str(HOME / "corpus/tiny-2.0h"))
    ap.add_argument("--features", default=str(HOME / "features/tiny-2.0h"))
    ap.add_argument("--connector", default="runs/tiny/stage1/connector")
    ap.add_argument("--aligned", default="runs/tiny/aligned")
    ap.add_argument("--stage1", nargs="*", default=[], help="stage-1 run folders to tabulate (metrics.json)")
    add_timing_args(ap, threads=1, repeats=5)
    ap.add_argument("--work", default="runs/pf/bench")
    ap.add_argument("--out", default="runs/bench/partition.json")
    ap.add_argument("--skip-probe", action="store_true")
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
