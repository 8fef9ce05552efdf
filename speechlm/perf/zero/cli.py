"""The ZeRO benchmark's command line (tools/benchmarks/bench_zero.py): measured runs per ZeRO stage, then the
real-scale projection, into one JSON report, a plot and markdown tables."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from speechlm.perf import ROOT
from speechlm.perf.bench import add_launch_args, bench_parser
from speechlm.perf.procmem import mem_available
from speechlm.perf.zero.memory import ASSUMPTIONS, GIB, BenchError, cpu_check, project, real_scale_inputs
from speechlm.perf.zero.report import mib_text, plot, render, write_report
from speechlm.perf.zero.runs import BenchPaths, loss_agreement, measured_params, run_stage

SCHEMA = "speechlm-bench-zero-1"


def _expand(p: str) -> Path:
    path = Path(os.path.expanduser(p))
    return path if path.is_absolute() else ROOT / path


def parse_args(argv: list[str] | None, description: str | None = None) -> argparse.Namespace:
    ap = bench_parser(description)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3], choices=[0, 1, 2, 3])
    add_launch_args(ap, ranks=2, master_port=29561, port_help="stage i uses this + i (29541 is taken)")
    ap.add_argument("--work-dir", default="runs/bench_zero")
    ap.add_argument("--out", default="", help="JSON report (default WORK_DIR/report.json)")
    ap.add_argument("--plot", default="", help="PNG (default WORK_DIR/bench_zero.png)")
    ap.add_argument("--config", default="recipes/configs/stage2_small.yaml")
    ap.add_argument("--train-manifest", default="runs/small/aligned/train.jsonl")
    ap.add_argument("--valid-manifest", default="runs/small/aligned/valid.jsonl")
    ap.add_argument("--feature-cache", default="~/.cache/speechlm/features/small-5.0h/train")
    ap.add_argument("--valid-feature-cache", default="~/.cache/speechlm/features/small-5.0h/valid")
    ap.add_argument("--llm", default="~/.cache/speechlm/models/smollm2-135m")
    ap.add_argument("--encoder", default="~/.cache/speechlm/models/whisper-base")
    ap.add_argument("--init-connector", default="runs/small/stage1/connector", help="'' = a fresh connector")
    ap.add_argument("--valid-max-utts", type=int, default=16, help="rows of the final validation every run ends with")
    ap.add_argument("--override", nargs="*", default=[], help="more key=value overrides for every stage")
    ap.add_argument("--poll-s", type=float, default=0.1)
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per launcher run")
    ap.add_argument("--min-available-gib", type=float, default=3.5,
                    help="MemAvailable needed before a run starts (0 = no check)")
    ap.add_argument("--wait-mem-s", type=float, default=0.0, help="wait this long for that memory, then fail")
    ap.add_argument("--keep-shm", action="store_true", help="leave this run's DeepSpeed /dev/shm buffers")
    ap.add_argument("--projection-only", action="store_true")
    ap.add_argument("--real-config", default="recipes/configs/librispeech_llama3_stage2.yaml")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--clips", type=int, default=12, help="clips per micro-batch assumed by the projection")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    args = parse_args(argv, description)
    work = _expand(args.work_dir)
    out = _expand(args.out) if args.out else work / "report.json"
    png = _expand(args.plot) if args.plot else work / "bench_zero.png"
    report: dict[str, Any] = {
        "schema": SCHEMA, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "mem_available_gib_start": round((mem_available() or 0) / GIB, 1)},
    }
    try:
        if not args.projection_only:
            paths = BenchPaths(_expand(args.config), _expand(args.train_manifest), _expand(args.valid_manifest),
                               _expand(args.feature_cache), _expand(args.valid_feature_cache), _expand(args.llm),
                               _expand(args.encoder), _expand(args.init_connector) if args.init_connector else None)
            paths.check()
            work.mkdir(parents=True, exist_ok=True)
            params = measured_params(paths)
            runs: dict[int, dict] = {}
            report["measured"] = {"steps": args.steps, "ranks": args.ranks, "config": str(paths.config),
                                  "params": params, "runs": runs}
            for i, stage in enumerate(args.stages):
                print(f"=== ZeRO-{stage}: {args.steps} steps on {args.ranks} CPU ranks (log {work}/zero{stage}.log)",
                      flush=True)
                runs[stage] = run_stage(stage, paths, args, work, args.master_port + i)
                r = runs[stage]
                print(f"    median step {r['step_time_s_median']:.3f} s, VmHWM "
                      f"{' / '.join(mib_text(m['vm_hwm']) for m in r['ranks'])} MiB, wall {r['wall_s']} s", flush=True)
                write_report(out, report)  # partial results survive a later failure
            report["measured"]["loss_agreement"] = loss_agreement(runs)
            report["measured"]["cpu_check"] = cpu_check(params, runs, args.ranks)
        inp, facts = real_scale_inputs(_expand(args.real_config), args.gpus, args.clips)
        report["projection"] = {"inputs": asdict(inp), "facts": facts, "assumptions": ASSUMPTIONS,
                                "per_gpu": project(inp)}
    except BenchError as e:
        report["error"] = str(e)
        work.mkdir(parents=True, exist_ok=True)
        write_report(out, report)
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    png_path = plot(report, png)
    report["plot"] = str(png_path) if png_path else None
    write_report(out, report)
    print(render(report))
    print(f"\nreport: {out}" + (f"\nplot: {png_path}" if png_path else ""))
    return 0
