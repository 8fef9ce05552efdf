"""Runs the GPU check's parts within one time budget: each part (or group of parts) in its own process with a
hard limit, the 8B -> 1B LLM fallback, and the report written after every part."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from speechlm.perf import ROOT
from speechlm.perf.flops import FORMULAS, H200_BF16_PEAK
from speechlm.perf.gpu_check.context import Ctx
from speechlm.perf.gpu_check.parts import part_encoders, part_env, part_stage, part_tests
from speechlm.perf.gpu_check.report import print_table, report_path, write_report
from speechlm.perf.gpu_check.stage1_run import part_stage1_run

SCHEMA = "speechlm-gpu-check-1"
#: the module a part process runs (``python -m``): the command line of tools/gpu_check.py
CLI_MODULE = "speechlm.perf.gpu_check.cli"

# (name, budget on a GPU s, budget in the tiny CPU dry run s, least time worth starting it with s)
PARTS: list[tuple[str, float, float, float]] = [
    ("env", 45, 40, 5),
    ("stage1_zero2", 60, 60, 15),
    ("stage1_zero3", 60, 60, 15),
    ("stage2_zero2", 110, 60, 30),
    ("stage2_zero3", 110, 60, 30),
    ("encoders", 120, 60, 20),
    ("tests", 150, 60, 15),
    ("stage1_run", 100, 60, 20),
]
PART_NAMES = [p[0] for p in PARTS]
# --isolation group (the default of --tiny): these run together, one process each (fewer interpreter starts)
GROUPS = [["env"], ["stage1_zero2", "stage1_zero3", "stage2_zero2", "stage2_zero3"], ["encoders", "tests", "stage1_run"]]

PART_FUNCS = {
    "env": part_env,
    "stage1_zero2": lambda c: part_stage(c, 1, 2),
    "stage1_zero3": lambda c: part_stage(c, 1, 3),
    "stage2_zero2": lambda c: part_stage(c, 2, 2),
    "stage2_zero3": lambda c: part_stage(c, 2, 3),
    "encoders": part_encoders,
    "stage1_run": part_stage1_run,
    "tests": part_tests,
}


def run_part_here(name: str, args: argparse.Namespace, out: Path | None) -> dict:
    """Run one part in this process; returns {status, error, traceback, result, checks}."""
    ctx = Ctx(args, out)
    ctx.name = name
    ctx.save()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if os.environ.get("GPU_CHECK_HANG") == name:  # tests: a part that never ends (the kill path)
            ctx.put("hanging", True)
            time.sleep(3600)
        PART_FUNCS[name](ctx)
        status, err, tb = ("ok" if all(ctx.checks.values()) else "fail"), None, None
    except BaseException as e:  # noqa: BLE001 -- the report keeps the error; KeyboardInterrupt too
        status, err, tb = "error", f"{type(e).__name__}: {e}"[:2000], traceback.format_exc()[-6000:]
        print(tb, file=sys.stderr, flush=True)
    ctx.save(status, err, tb)
    return {"status": status, "error": err, "traceback": tb, "result": ctx.result, "checks": ctx.checks,
            "wall_s": time.time() - ctx.start}


def part_argv(args: argparse.Namespace) -> list[str]:
    """The options a part process needs, as command-line arguments."""
    out = ["--work", str(args.work), "--llm", args.llm, "--encoder", args.encoder, "--clips", str(args.clips),
           "--clip-s", str(args.clip_s), "--tokens", str(args.tokens), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--enc-batch", str(args.enc_batch), "--enc-clip-s", str(args.enc_clip_s),
           "--enc-repeats", str(args.enc_repeats), "--run-steps", str(args.run_steps),
           "--run-sentences", str(args.run_sentences), "--run-ratio", str(args.run_ratio),
           "--dist-backend", args.dist_backend, "--ds", args.ds, "--threads", str(args.threads)]
    return out + (["--cpu"] if args.cpu else []) + (["--tiny"] if args.tiny else [])


def child_env(args: argparse.Namespace) -> dict:
    """This environment without the launcher's rank variables, the checkout first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu" if args.cpu else "cuda")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def part_out(args: argparse.Namespace, name: str) -> Path:
    return Path(args.work) / f"part-{name}.json"


def run_parts_process(names: list[str], args: argparse.Namespace, budget: float, log: Path) -> dict[str, dict]:
    """Run parts one after the other in a fresh process with one time limit (its process group is killed at
    the limit); each part writes its own result file as it goes. Returns {name: result}."""
    for name in names:
        part_out(args, name).unlink(missing_ok=True)
    cmd = [sys.executable, "-u", "-m", CLI_MODULE, "--part", ",".join(names), "--deadline", str(time.time() + budget),
           "--llm-size", args.llm_size, *part_argv(args)]
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n===== part {','.join(names)} (budget {budget:.0f} s, llm {args.llm_size}) "
                 f"{time.strftime('%H:%M:%S')}\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=child_env(args),
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    elapsed = time.time() - t0
    results: dict[str, dict] = {}
    for name in names:
        out = part_out(args, name)
        data = {"status": None, "error": None, "traceback": None, "result": {}, "checks": {}, "wall_s": 0.0}
        if out.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                data.update(json.loads(out.read_text()))
        if data["status"] == "running":  # the part the process was in when it was killed or died
            data["wall_s"] = max(0.0, elapsed - sum(r["wall_s"] for r in results.values()))
            if timed_out:
                data["status"] = "timeout"
                data["error"] = f"killed at the {budget:.0f} s budget" + (f" (last: {data['error']})"
                                                                           if data["error"] else "")
            else:
                data["status"] = "error"
                data["error"] = f"the part process died (exit code {proc.returncode})"
        elif data["status"] is None:  # never started
            data["status"] = "timeout" if timed_out else "error"
            data["error"] = "not started: " + ("the budget ran out before it" if timed_out else
                                               f"the part process exited with code {proc.returncode} before it")
        if data["status"] in ("error", "timeout"):
            data["log_tail"] = _tail(log, 40)
        results[name] = data
    return results


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def orchestrate(args: argparse.Namespace) -> int:
    start = time.time()
    deadline = start + args.budget
    out = report_path(args)
    log = out.with_name("gpu_check.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.isolation != "none":
        log.write_text(f"tools/gpu_check.py {' '.join(sys.argv[1:])}  started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    wanted = args.parts.split(",") if args.parts else PART_NAMES
    unknown = [p for p in wanted if p not in PART_NAMES]
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(unknown)}; parts: {', '.join(PART_NAMES)}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
        "mode": "cpu" if args.cpu else "gpu", "tiny": bool(args.tiny), "budget_s": args.budget,
        "isolation": args.isolation, "ds_configs": args.ds, "llm_requested": args.llm, "llm_size": None,
        "peak_flops": H200_BF16_PEAK,
        "formulas": FORMULAS, "batch": {"clips": args.clips, "clip_s": args.clip_s, "tokens_per_clip": args.tokens,
                                        "steps": args.steps, "warmup": args.warmup},
        "log": str(log), "parts": {},
    }
    args.llm_size = "tiny" if args.tiny else ("8b" if args.llm == "auto" else args.llm)
    report["llm_size"] = args.llm_size
    info = {p[0]: p for p in PARTS}
    later_min = {name: sum(p[3] for p in PARTS[i + 1:] if p[0] in wanted) for i, (name, *_rest) in enumerate(PARTS)}
    if args.isolation == "group":
        units = [[n for n in g if n in wanted] for g in GROUPS]
        units = [u for u in units if u]
    else:
        units = [[n] for n in PART_NAMES if n in wanted]
    fallen_back = False

    def run(names: list[str], budget: float) -> dict[str, dict]:
        if args.isolation == "none":
            args.deadline = time.time() + budget
            return {names[0]: run_part_here(names[0], args, None)}
        return run_parts_process(names, args, budget, log)

    for names in units:
        name = names[0]
        remaining = deadline - time.time()
        cap = sum(info[n][2 if args.cpu else 1] for n in names)
        least = info[name][3]
        if name.startswith("stage2") and args.llm == "auto" and not args.tiny and not fallen_back:
            need = args.need_8b + later_min[name]
            if name == "stage2_zero2" and remaining < need:
                args.llm_size = "1b"
                fallen_back = True
                report["llm_choice"] = f"1b: {remaining:.0f} s left < {need:.0f} s needed for the 8B parts"
        budget = min(cap, max(0.0, remaining))
        if budget < least:
            for n in names:
                report["parts"][n] = {"status": "skipped", "error": f"no time left ({remaining:.0f} s)",
                                      "wall_s": 0.0, "budget_s": 0.0}
            write_report(out, report)
            continue
        print(f"[{time.time() - start:6.1f} s] {', '.join(names)} (budget {budget:.0f} s)", flush=True)
        results = run(names, budget)
        for data in results.values():
            data["budget_s"] = budget
        data = results[name]
        if (len(names) == 1 and name.startswith("stage2") and args.llm_size == "8b" and args.llm == "auto"
                and data["status"] in ("error", "timeout")):
            reason = data["status"] + ": " + str(data.get("error", ""))[:300]
            left = deadline - time.time()
            if left >= least:  # the 8B did not fit (time or memory): the 1B-size LLM instead
                args.llm_size = "1b"
                fallen_back = True
                report["llm_choice"] = f"1b after the 8B {name} {reason}"
                budget = min(cap, left)
                print(f"[{time.time() - start:6.1f} s] {name} again with the 1B LLM (budget {budget:.0f} s)",
                      flush=True)
                retry = run(names, budget)[name]
                retry.update(budget_s=budget, fallback_from={"llm": "8b", "reason": reason, "wall_s": data["wall_s"]})
                results[name] = retry
        for n, data in results.items():
            report["parts"][n] = data
            print(f"[{time.time() - start:6.1f} s] {n}: {data['status']} ({data['wall_s']:.1f} s)"
                  + (f" {data['error']}" if data.get("error") else ""), flush=True)
        report["llm_size"] = args.llm_size
        report["wall_s"] = time.time() - start
        write_report(out, report)
    report["wall_s"] = time.time() - start
    counts: dict[str, int] = {}
    for p in report["parts"].values():
        counts[p["status"]] = counts.get(p["status"], 0) + 1
    report["summary"] = counts
    print()
    report["table"] = print_table(report)
    write_report(out, report)
    print(f"\nreport: {out}  ({report['wall_s']:.0f} s, {', '.join(f'{v} {k}' for k, v in counts.items())})",
          flush=True)
    bad = sum(v for k, v in counts.items() if k in ("error", "timeout", "fail"))
    return 1 if bad else 0
