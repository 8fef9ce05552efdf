"""Training cost per connector: stage-2 steps per second, audio seconds per wall second and peak memory on the same
batch of audio; and a stage-1 step with and without the feature cache.

    python tools/benchmarks/bench_training.py --run runs/small --threads 1 --repeats 5 [--json out.json]

One training step as the recipes run it on one rank, in one process (``--threads`` torch threads):
``recipes/configs/stage2_<preset>.yaml``'s first batch of rank 0 of 2 (its ``data.max_frames`` / ``max_tokens``
budget) from the run's aligned training split and its feature cache, through ``Stage2Finetune`` (the frozen
SmolLM2-135M, the connector trainable, AdamW): forward, backward, optimizer step. SSR is the run's stage-1
connector (``distill_weight`` of the config); the baselines are fresh connectors of their default config
(``distill_weight=0``, the speech as a prefix of the transcript). The same batch for all.

Stage 1 (SSR, ``stage1_<preset>.yaml``'s first batch): the step from cached features, against the step that
first runs the frozen encoder (Whisper base) on the batch's audio, as ``data.feature_cache=""`` does.

Each measurement runs in its own child process, so the peak resident memory (``VmHWM``) is that step's alone:
printed as the peak after loading the models and the peak over the steps. One warm-up step, then the median of
``--repeats``. Targets (issue 15): SSR's stage-2 throughput at least 1.5x stack-8's; the cache makes a stage-1 step
at least 3x faster. Writes JSON (``--json``) and a plot (``--png``).
"""

from __future__ import annotations

from speechlm.perf.bench import add_output_args, add_run_args, add_timing_args, bench_parser
from speechlm.perf.benchmarks.training import STAGE1, STAGE2, run


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__)
    add_run_args(ap, "a run with aligned/train.jsonl and stage1/connector",
                 "configs recipes/configs/stage{1,2}_<preset>.yaml (default: the run's name)", cache=("hours", "features"))
    ap.add_argument("--only", default=",".join(STAGE2 + STAGE1))
    add_timing_args(ap, threads=1, repeats=5)
    add_output_args(ap, "training")
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
