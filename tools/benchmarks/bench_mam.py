"""Multimodal attention merging (MAM): Whisper base's own ASR word error rate as its decoder's self-attention is
merged into its encoder, for a sweep of fixed factors and for learnable MAM.

    nice -n 19 python tools/benchmarks/bench_mam.py --manifest ~/.cache/speechlm/corpus/small-5.0h/test.jsonl \\
        [--max-utts 100] [--factors 0,0.05,0.1,0.2,0.3] [--learn-steps 50] [--out runs/bench/mam.json]

Every configuration starts from the same pristine encoder: a fixed factor a merges q/k/v (``--projections``) of
every layer with W = (1 - a) W_enc + a W_dec; learnable MAM trains one factor per layer (from ``--learn-init``)
for ``--learn-steps`` Adam steps on Whisper's teacher-forced ASR loss over ``--train-manifest`` (default: the
train.jsonl next to the test manifest), the rest frozen. Each merged model transcribes the test rows greedily
(``generate``: English, transcribe); WER is speechlm.eval.asr.word_error_rate on normalised text. Printed: a
table with WER and its relative change against factor 0 (the unmerged model); written: JSON (``--out``).
"""

from __future__ import annotations

from speechlm.perf.bench import bench_parser
from speechlm.perf.benchmarks.mam import parse_factors, run_benchmark


def main(argv: list[str] | None = None) -> dict:
    from speechlm.paths import cache_dir, models_dir

    ap = bench_parser(__doc__)
    ap.add_argument("--manifest", default=str(cache_dir() / "corpus" / "small-5.0h" / "test.jsonl"))
    ap.add_argument("--split", default="test", help="rows of --manifest to score ('' = all)")
    ap.add_argument("--model", default=str(models_dir() / "whisper-base"), help="Whisper model folder")
    ap.add_argument("--max-utts", type=int, default=0, help="score the first N test rows (0 = all)")
    ap.add_argument("--factors", type=parse_factors, default=[0.0, 0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--projections", default="q,k,v")
    ap.add_argument("--rule", choices=("same", "spread"), default="same")
    ap.add_argument("--learn-steps", type=int, default=0, help="learnable MAM: Adam steps (0 = skip)")
    ap.add_argument("--learn-init", type=float, default=0.1)
    ap.add_argument("--learn-batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--train-manifest", default="", help="default: train.jsonl next to --manifest")
    ap.add_argument("--train-utts", type=int, default=0, help="draw training batches from the first N rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="decoding batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/mam.json")
    args = ap.parse_args(argv)
    return run_benchmark(args)


if __name__ == "__main__":
    main()
