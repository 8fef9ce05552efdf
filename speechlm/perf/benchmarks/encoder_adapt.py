"""Parameter-efficient encoder adaptation against the frozen encoder: stage 1 of the SSR connector per method,
its peak memory and the table (tools/benchmarks/bench_encoder_adapt.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from speechlm.errors import ConfigError
from speechlm.perf.bench import (
    launch_recipe,
    machine,
    pick_names,
    reuse_finished,
    stage1_inputs,
    stage1_overrides,
    stage_metrics,
    write_json,
    write_stage1_report,
)

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


def train(name: str, args: argparse.Namespace, paths: dict[str, Path], out: Path) -> float | None:
    """Stage 1 for one method, unless a run of ``--steps`` is already there; returns its peak RSS (MB) or None."""
    if reuse_finished(name, out, args.steps, args.retrain):
        saved = out / "peak_rss_mb.json"
        return json.loads(saved.read_text())["peak_rss_mb"] if saved.is_file() else None
    keys = [*stage1_overrides(paths, out, args.seed, args.steps),
            "data.feature_cache=", "data.valid_feature_cache=", f"data.valid_max_utts={args.valid_utts}",
            "loop.resume=false", *([f"data.max_frames={args.max_frames}"] if args.max_frames else []),
            *method_overrides(name, args.bottleneck, args.r, args.n_prompts)]
    out.mkdir(parents=True, exist_ok=True)
    _, rss = launch_recipe(name, "stage1_distill.py", paths["config"], keys, args, out.parent / f"{name}.log",
                           f"bench_encoder_adapt: stage 1 of {name}", peak_rss=True)
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


def run(args: argparse.Namespace) -> dict:
    """Stage 1 for every method of ``args.methods`` (reused when finished), the table and the JSON report."""
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
    write_stage1_report(result, args, table(rows), note="encoder on the fly, ")
    return result
