"""Quality at equal budget: SSR against the baseline connectors, same encoder, LLM, data, steps and machine.

    python tools/benchmarks/bench_quality.py --run runs/small --steps 100 [--seeds 0,1] [--out runs/bench_quality]

Every connector is trained through the same stage-2 budget (``--steps`` steps of ``recipes/configs/stage2_<preset>
.yaml``: per seed the same batches, learning rate and schedule) on the run's aligned training split, with the
recipe's own launcher (``deepspeed``, ``--ranks`` CPU ranks), once per seed of ``--seeds`` (the stage config's
``seed=``: a fresh connector's initialisation and the batch order) into ``<out>/<connector>-s<seed>``:

* ``ssr``: SSR from the run's stage-1 connector (stage 1 applies to SSR only: the baselines have no vector per token);
* ``ssr-scratch``: SSR without stage 1, from a fresh connector like the baselines (the architecture alone);
* ``ssr-mid``: SSR from the stage-1 connector through the supervised mid-training stage first
  (``recipes/stage_mid_supervised.py`` with ``recipes/configs/stage_mid_<preset>.yaml``: task prompt + speech ->
  transcript, ``--mid-steps`` steps), then stage 2 for the rest of the budget: ``--steps`` in all, as ``ssr``;
* ``stack`` (k=8, Ultravox, 6.25 Hz), ``conv`` (k=5, SLAM-LLM, 10 Hz), ``qformer`` (one query per 0.33 s window,
  SALMONN, ~3 Hz): from fresh connectors, trained with the speech as a prefix of the transcript (all of its
  tokens targets) and ``distill_weight=0``.

Then the same evaluations for every (connector, seed) not evaluated yet, in one go, on the same rendered audio
(held-out natural voices, free boundaries for SSR): spoken StoryCloze S->T (adversarial and random wrong endings; ``--stories``),
Speech-MMLU cloze 0-shot (``--questions`` per subject), zero-shot ASR (WER; ``--asr-utts``) of the stage-2
connectors, and the stage-2 validation loss on the transcript tokens 1..N-1 (the targets every connector and the
text scoring share). ``--stories 0 --questions 0 --asr-utts 0`` evaluate the whole sets.

Prints three tables and writes them to ``<out>/bench_quality.json`` (with ``<out>/bench_quality.png``):

* per (connector, seed): accuracies with Wilson 95% intervals, parity = speech / text;
* ``paired_vs_ssr``: every connector minus ``ssr`` of the same seed on the same items (StoryCloze S->T, Speech-MMLU
  0-shot), in points with the paired-bootstrap 95% interval and McNemar's exact p; "inside the noise" when the
  interval contains 0 (speechlm.eval.paired);
* ``over_seeds``: each connector's mean accuracy over the seeds, the seed-to-seed spread (sd, range) and its mean
  difference from SSR.

For the data sizes, run it on runs of different sizes (``--run``/``--hours``, e.g. 5 h and 30 h) with the same
``--steps``. Trained connectors are reused when a run of that seed already reached ``--steps`` (a folder holding
another seed's run is refused; ``--retrain`` trains them again), and so are a run's evaluation reports when they
were made with the same ``--stories``/``--questions``/``--asr-utts``/``--asr-max-tokens`` and LLM after its connector
was trained (``<out>/eval/index.json`` says which; ``--reevaluate`` evaluates every run again): adding a seed trains
and evaluates only that seed's connectors.
"""

from __future__ import annotations

from speechlm.perf.bench import add_launch_args, add_run_args, add_timing_args, bench_parser
from speechlm.perf.benchmarks.quality import CONNECTORS, run


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__)
    add_run_args(ap, "a finished run: aligned manifests, aligner, stage-1 connector",
                 "configs recipes/configs/stage2_<preset>.yaml (default: the run's name)",
                 cache=("hours", "corpus", "features"))
    ap.add_argument("--out", default="runs/bench_quality")
    ap.add_argument("--connectors", default=",".join(CONNECTORS))
    ap.add_argument("--seeds", default="0", help="comma-separated stage-2 seeds (each connector once per seed)")
    ap.add_argument("--steps", type=int, default=100, help="training steps per connector (ssr-mid: mid + stage 2)")
    ap.add_argument("--mid-steps", type=int, default=50, help="ssr-mid: of --steps, the mid-training stage's")
    add_launch_args(ap, ranks=2, master_port=29541)
    add_timing_args(ap, threads=2)
    ap.add_argument("--stories", type=int, default=80, help="StoryCloze stories (0 = all)")
    ap.add_argument("--questions", type=int, default=8, help="Speech-MMLU questions per subject (0 = all)")
    ap.add_argument("--asr-utts", type=int, default=60, help="test utterances for ASR (0 = all)")
    ap.add_argument("--asr-max-tokens", type=int, default=96, help="cap on a baseline's read-out (SSR: its N)")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--skip-eval", action="store_true", help="train only")
    ap.add_argument("--reevaluate", action="store_true", help="evaluate every run again, not reusing its reports")
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
