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

import argparse

from speechlm.perf.bench_training import STAGE1, STAGE2, run


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/small", help="a run with aligned/train.jsonl and stage1/connector")
    ap.add_argument("--preset", default="")
    ap.add_argument("--hours", default="5.0")
    ap.add_argument("--features", default="")
    ap.add_argument("--llm", default="")
    ap.add_argument("--encoder", default="")
    ap.add_argument("--only", default=",".join(STAGE2 + STAGE1))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="runs/bench/training.json")
    ap.add_argument("--png", default="runs/bench/training.png")
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
