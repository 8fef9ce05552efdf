"""The GPU check's command line (tools/gpu_check.py), shared with the part processes it starts (``python -m``),
which read their options from the same arguments."""

from __future__ import annotations

import argparse
import os
import sys

# Only the standard library at import time below these (torch and the rest load inside the parts): --plan-install
# runs before the GPU machine has its wheels.
from speechlm.perf import ROOT
from speechlm.perf.gpu_check.install_plan import plan_install
from speechlm.perf.gpu_check.orchestrate import PART_NAMES, orchestrate, part_out, run_part_here
from speechlm.perf.gpu_check.stage1_run import SENTENCES
from speechlm.perf.shapes import ENCODERS


def parse_args(argv: list[str] | None, description: str | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (the dry run), fp32")
    ap.add_argument("--tiny", action="store_true", help="tiny stand-ins of every model and small batches")
    ap.add_argument("--llm", choices=["auto", "8b", "1b"], default="auto",
                    help="LLM size of stage 2 (auto: 8B unless too little time is left, then 1B; "
                         "also 1B after an 8B part that timed out or failed)")
    ap.add_argument("--need-8b", type=float, default=150.0,
                    help="auto: seconds the two 8B stage-2 parts need (besides the later parts' minimums)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all parts together (default 420 on a GPU, 300 on the CPU)")
    ap.add_argument("--parts", default="", help=f"comma list of parts to run (default all: {','.join(PART_NAMES)})")
    ap.add_argument("--isolation", choices=["auto", "part", "group", "none"], default="auto",
                    help="part: each part in its own process with a hard time limit (the 8B -> 1B fallback needs "
                         "it or none); group: GROUPS share a process and a limit; none: all in this process "
                         "(auto: part, or group with --tiny)")
    ap.add_argument("--out", default="", help="report path (default $OUT/gpu_report.json or runs/gpu_check/report.json)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "gpu_check" / "work"), help="scratch folder (models, data)")
    ap.add_argument("--encoder", choices=list(ENCODERS), default="w2v-bert", help="encoder width of the stage steps")
    ap.add_argument("--clips", type=int, default=None, help="clips per stage step (default 12; tiny 2)")
    ap.add_argument("--clip-s", type=float, default=None, help="seconds per clip in stage steps (default 12; tiny 2)")
    ap.add_argument("--tokens", type=int, default=None, help="LLM tokens per clip (default 40; tiny 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; tiny 1)")
    ap.add_argument("--enc-batch", type=int, default=None, help="30 s clips per encoder batch (default 32; tiny 2)")
    ap.add_argument("--enc-clip-s", type=float, default=None, help="clip length for the encoders (default 30; tiny 10)")
    ap.add_argument("--enc-repeats", type=int, default=None, help="timed encoder batches (default 1)")
    ap.add_argument("--run-steps", type=int, default=None, help="steps of the short stage-1 run (default 100; tiny 60)")
    ap.add_argument("--run-sentences", type=int, default=None,
                    help=f"sentences synthesized for it, every 6th for validation (default {len(SENTENCES)}; tiny 24)")
    ap.add_argument("--run-ratio", type=float, default=0.9,
                    help="the short run passes when its last losses average below this times its first ones")
    ap.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"], default="auto",
                    help="process-group backend of the one-rank DeepSpeed runs (auto: DeepSpeed's choice)")
    ap.add_argument("--ds", choices=["auto", "gpu", "cpu"], default="auto",
                    help="DeepSpeed JSONs: gpu = recipes/ds/zero{2,3}_gpu.json (the recipe's), cpu = zero{2,3}.json "
                         "(auto: gpu, or cpu with --cpu)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of a part (default: all cores; 1 with --cpu, as the test suite)")
    ap.add_argument("--plan-install", metavar="WHEEL_DIR", default=None,
                    help="print the wheels (one a line) that must be installed here, notes on stderr; then exit")
    # internal: one part in this process
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--llm-size", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tiny = args.tiny
    defaults = {"clips": (12, 2), "clip_s": (12.0, 2.0), "tokens": (40, 8), "steps": (10, 3), "warmup": (3, 1),
                "enc_batch": (32, 2), "enc_clip_s": (30.0, 10.0), "enc_repeats": (1, 1), "run_steps": (100, 60),
                "run_sentences": (len(SENTENCES), 24)}
    for k, (real, small) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, small if tiny else real)
    if args.isolation == "auto":
        args.isolation = "group" if args.tiny else "part"
    if args.threads is None:
        args.threads = 1 if args.cpu else 0
    if args.ds == "auto":
        args.ds = "cpu" if args.cpu else "gpu"
    if args.budget is None:
        args.budget = 300.0 if args.cpu else 420.0
    if args.llm_size is None:
        args.llm_size = "tiny" if tiny else ("8b" if args.llm == "auto" else args.llm)
    return args


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    args = parse_args(argv, description)
    if args.plan_install is not None:
        files, notes = plan_install(args.plan_install)
        for n in notes:
            print(n, file=sys.stderr)
        print("\n".join(files))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.cpu else "cuda")
    if args.part:  # inside a part process: each part writes its own result file
        codes = [run_part_here(name, args, part_out(args, name))["status"] for name in args.part.split(",")]
        return 0 if all(c in ("ok", "fail") for c in codes) else 1
    return orchestrate(args)


if __name__ == "__main__":  # a part process: python -m speechlm.perf.gpu_check.cli --part NAME ...
    sys.exit(main())
