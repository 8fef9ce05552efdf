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

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: the repository and this folder (benchlib) importable
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from benchlib import (
    machine,
    pick_names,
    recipe_command,
    recipe_env,
    run_finished,
    stage1_inputs,
    stage1_overrides,
    stage_metrics,
    write_json,
)

from speechlm.errors import ConfigError

METHODS = ("frozen", "adapter-seq", "adapter-par", "lora", "prompt")
LABELS = {"frozen": "frozen encoder (on the fly)", "adapter-seq": "adapters, sequential",
          "adapter-par": "adapters, parallel", "lora": "LoRA (q, v)", "prompt": "prompt tuning"}


def method_overrides(name: str, bottleneck: int = 64, r: int = 8, n_prompts: int = 16) -> list[str]:
    """The ``model.encoder_adapt.*`` overrides of one method (none for the frozen encoder)."""
    key = "model.encoder_adapt."
    if name == "frozen":
        return []
    if name in ("adapter-seq", "adapter-par"):
        placement = "sequential" if name == "adapter-seq" else "parallel"
        return [f"{key}method=adapter", f"{key}placement={placement}", f"{key}where=both",
                f"{key}bottleneck={bottleneck}"]
    if name == "lora":
        return [f"{key}method=lora", f"{key}r={r}", f"{key}alpha={2 * r}", f"{key}projections=[q,v]"]
    if name == "prompt":
        return [f"{key}method=prompt", f"{key}n_prompts={n_prompts}"]
    raise ConfigError(f"bench_encoder_adapt: unknown method {name!r}")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the methods' rows (see ``main``); missing numbers are shown as -."""
    lines = ["| method | trainable encoder params | step s (median) | peak RSS MB | valid cosine | token acc |",
             "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['encoder_params']:,} | "
                     f"{_num(r.get('step_time_s_median'), '.3f')} | {_num(r.get('peak_rss_mb'), '.0f')} | "
                     f"{_num(r.get('cosine'), '.3f')} | {_num(r.get('token_acc'), '.3f')} |")
    return "\n".join(lines)


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run ``cmd`` with output to ``log``; (exit status, peak resident set in MB of it and its waited children)."""
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=recipe_env())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024.0  # Linux: KiB


def train(name: str, args: argparse.Namespace, paths: dict[str, Path], out: Path) -> float | None:
    """Stage 1 for one method, unless a run of ``--steps`` is already there; returns its peak RSS (MB) or None."""
    if args.retrain and out.exists():
        shutil.rmtree(out)
    if run_finished(out, args.steps):
        print(f"[{name}] reusing {out}", flush=True)
        saved = out / "peak_rss_mb.json"
        return json.loads(saved.read_text())["peak_rss_mb"] if saved.is_file() else None
    keys = [*stage1_overrides(paths, out, args.seed, args.steps),
            "data.feature_cache=", "data.valid_feature_cache=", f"data.valid_max_utts={args.valid_utts}",
            "loop.resume=false", *([f"data.max_frames={args.max_frames}"] if args.max_frames else []),
            *method_overrides(name, args.bottleneck, args.r, args.n_prompts)]
    cmd = [*recipe_command(ROOT / "recipes" / "stage1_distill.py", args.ranks, args.master_port),
           "--config", str(paths["config"]), *keys]
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{name}.log"
    print(f"[{name}] training: {' '.join(cmd)}", flush=True)
    rc, rss = _run(cmd, log)
    if rc != 0:
        raise RuntimeError(f"bench_encoder_adapt: stage 1 of {name} failed (exit {rc}); see {log}")
    write_json(out / "peak_rss_mb.json", {"peak_rss_mb": rss})
    return rss


def row(name: str, out: Path, rss: float | None) -> dict[str, Any]:
    """One method's numbers: its stage-1 metrics, trainable encoder parameters and peak memory."""
    s = stage_metrics(out)
    if s is None:
        raise RuntimeError(f"bench_encoder_adapt: {out} has no metrics.json")
    s.pop("connector", None)
    adapt = out / "encoder_adapt" / "config.json"
    params = json.loads(adapt.read_text())["trainable_parameters"] if adapt.is_file() else 0
    return {"method": name, **s, "encoder_params": params, "peak_rss_mb": rss, "run": str(out)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/small", help="a run with aligned/{train,valid}.jsonl")
    ap.add_argument("--preset", default="", help="config recipes/configs/stage1_<preset>.yaml (default: the run's name)")
    ap.add_argument("--llm", default="")
    ap.add_argument("--encoder", default="", help="the run's encoder (default: the embedded Whisper base)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bottleneck", type=int, default=64, help="adapters: bottleneck width")
    ap.add_argument("--r", type=int, default=8, help="lora: rank (alpha = 2r)")
    ap.add_argument("--n-prompts", type=int, default=16, help="prompt: learned vectors")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--valid-utts", type=int, default=200, help="validate on the first n valid rows (on the fly)")
    ap.add_argument("--max-frames", type=int, default=0, help="data.max_frames per batch (0: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--master-port", type=int, default=29563)
    ap.add_argument("--work", default="runs/encoder_adapt")
    ap.add_argument("--out", default="runs/bench/encoder_adapt.json")
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args(argv)
    names = pick_names(args.methods, list(METHODS), "bench_encoder_adapt --methods")
    for flag, value in (("--steps", args.steps), ("--ranks", args.ranks), ("--bottleneck", args.bottleneck),
                        ("--r", args.r), ("--n-prompts", args.n_prompts)):
        if value < 1:
            raise ConfigError(f"bench_encoder_adapt: {flag} must be >= 1, not {value}")
    paths = stage1_inputs(args.run, args.preset, args.llm, args.encoder, "bench_encoder_adapt")
    work = Path(args.work)
    rows = []
    for name in names:
        rss = train(name, args, paths, work / name)
        rows.append(row(name, work / name, rss))
    result = {"benchmark": "encoder adaptation (stage 1)", "machine": machine(), "run": args.run,
              "steps": args.steps, "seed": args.seed, "ranks": args.ranks, "bottleneck": args.bottleneck,
              "r": args.r, "n_prompts": args.n_prompts, "rows": rows}
    write_json(args.out, result)
    print(f"\nstage 1, {args.steps} steps, {args.ranks} rank(s), encoder on the fly, {result['machine']['cpu']}, "
          f"load {result['machine']['load_1min']}\n")
    print(table(rows))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
