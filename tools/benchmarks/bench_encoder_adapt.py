"""Parameter-efficient encoder adaptation (Cappellazzo et al., 2023) against the frozen encoder: stage 1
(distillation) of the SSR connector from the same start, the encoder run on the fly in every variant.

    nice -n 19 .venv/bin/python tools/benchmarks/bench_encoder_adapt.py --run runs/small --steps 300 \\
        [--methods frozen,adapter-seq,adapter-par,lora,prompt] [--bottleneck 64] [--r 8] [--n-prompts 16] \\
        [--valid-utts 200] [--max-frames 0] [--ranks 1] [--work runs/encoder_adapt] [--out runs/bench/encoder_adapt.json]

Methods (``recipes/configs/stage1_<preset>.yaml``'s connector and schedule, ``--steps`` steps, the run's aligned
train and valid manifests, no feature cache; only ``model.encoder_adapt`` differs):

  frozen        the frozen encoder, run on the fly (what the recipes train, without their feature cache)
  adapter-seq   bottleneck adapters (``--bottleneck``) after every layer's attention and feed-forward sublayers
  adapter-par   the same adapters beside the sublayers (parallel: from the sublayer's input)
  lora          LoRA of rank ``--r`` on the attention's q and v projections
  prompt        ``--n-prompts`` learned vectors before the sequence at the input of the transformer layers

Table: trainable encoder parameters (the exported encoder_adapt/config.json), median step time, peak memory (the
training process's maximum resident set, from ``wait4``; with ``--ranks`` > 1 the largest process), stage-1 valid
cosine and token accuracy (the final validation, metrics.json). Runs that already reached ``--steps`` are reused
(``--retrain`` trains them again). Writes JSON (``--out``).
"""

from __future__ import annotations

from speechlm.perf.bench import add_run_args, add_stage1_training_args, bench_parser
from speechlm.perf.benchmarks.encoder_adapt import METHODS, run


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__)
    add_run_args(ap)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bottleneck", type=int, default=64, help="adapters: bottleneck width")
    ap.add_argument("--r", type=int, default=8, help="lora: rank (alpha = 2r)")
    ap.add_argument("--n-prompts", type=int, default=16, help="prompt: learned vectors")
    ap.add_argument("--valid-utts", type=int, default=200, help="validate on the first n valid rows (on the fly)")
    ap.add_argument("--max-frames", type=int, default=0, help="data.max_frames per batch (0: the config's)")
    add_stage1_training_args(ap, "encoder_adapt", ranks=1, master_port=29563)
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
