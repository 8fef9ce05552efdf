"""Quality at equal budget: SSR against the baseline connectors, each trained by the stage recipes and scored by
the evaluation recipes (tools/benchmarks/bench_quality.py); the table and plot of their reports."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from speechlm.atomic import atomic_write_text
from speechlm.errors import ConfigError
from speechlm.perf import ROOT
from speechlm.perf.bench import (
    launch_recipe,
    machine,
    pick_names,
    pyplot,
    recipe_env,
    run_finished,
    save_figure,
    write_json,
)

#: name -> (connector config overrides, starts from the run's stage-1 connector)
CONNECTORS: dict[str, tuple[dict[str, object], bool]] = {
    "ssr": ({}, True),
    "ssr-scratch": ({}, False),
    "ssr-mid": ({}, True),  # + the supervised mid-training stage for --mid-steps of the --steps (MID=1)
    "stack": ({"name": "stack"}, False),
    "conv": ({"name": "conv"}, False),
    "qformer": ({"name": "qformer"}, False),
}
LABELS = {"ssr": "SSR (stage 1 + 2)", "ssr-scratch": "SSR (stage 2 only)", "ssr-mid": "SSR (stage 1 + mid + 2)", "stack": "stack k=8 (Ultravox)",
          "conv": "conv k=5 (SLAM-LLM)", "qformer": "window Q-Former (SALMONN)"}


def _paths(args: argparse.Namespace) -> dict[str, Path]:
    from speechlm.paths import cache_dir, models_dir

    run = Path(args.run)
    preset = args.preset or run.name
    corpus = Path(args.corpus) if args.corpus else cache_dir() / "corpus" / f"{preset}-{args.hours}h"
    features = Path(args.features) if args.features else cache_dir() / "features" / f"{preset}-{args.hours}h"
    paths = {
        "run": run, "corpus": corpus, "features": features,
        "train": run / "aligned" / "train.jsonl", "valid": run / "aligned" / "valid.jsonl",
        "test": corpus / "test.jsonl", "aligner": run / "aligner", "stage1": run / "stage1" / "connector",
        "config": ROOT / "recipes" / "configs" / f"stage2_{preset}.yaml",
        "mid_config": ROOT / "recipes" / "configs" / f"stage_mid_{preset}.yaml",
        "llm": Path(args.llm) if args.llm else models_dir() / "smollm2-135m",
        "encoder": Path(args.encoder) if args.encoder else models_dir() / "whisper-base",
    }
    for key in ("train", "valid", "test", "aligner", "config", "mid_config", "llm", "encoder", "features"):
        if not paths[key].exists():
            raise ConfigError(f"bench_quality: {key} not found: {paths[key]} (run `make small` first, or pass --run/"
                              "--corpus/--features)")
    return paths


def _data_keys(paths: dict[str, Path], out: Path, steps: int) -> list[str]:
    """The overrides every trained connector shares: the run's data, models, ``out`` and ``steps``."""
    return [f"data.train_manifest={paths['train']}", f"data.valid_manifest={paths['valid']}",
            f"data.feature_cache={paths['features'] / 'train'}",
            f"data.valid_feature_cache={paths['features'] / 'valid'}",
            f"model.llm={paths['llm']}", f"model.encoder={paths['encoder']}", f"out_dir={out}",
            f"loop.max_steps={steps}", "loop.eval_every=0", f"loop.save_every={steps}", "loop.progress=false"]


def _launch(name: str, script: str, config: Path, keys: list[str], args: argparse.Namespace, log: Path) -> float:
    """One training recipe under the launcher (output appended to ``log``); its wall seconds."""
    return launch_recipe(name, script, config, keys, args, log, f"bench_quality: {script} for {name}")[0]


def train_mid(args: argparse.Namespace, paths: dict[str, Path], out: Path) -> tuple[Path, dict]:
    """ssr-mid's first part: the supervised mid-training stage from the stage-1 connector for ``--mid-steps``
    steps into ``<out>/mid`` (reused when finished); its connector folder and metrics."""
    mid = out / "mid"
    wall = None
    if not run_finished(mid, args.mid_steps):
        mid.mkdir(parents=True, exist_ok=True)
        keys = [*_data_keys(paths, mid, args.mid_steps), f"model.init_connector={paths['stage1']}"]
        wall = _launch("ssr-mid", "stage_mid_supervised.py", paths["mid_config"], keys, args,
                       out.parent / "ssr-mid.log")
    metrics = json.loads((mid / "metrics.json").read_text())
    if wall is not None:
        metrics["bench_wall_s"] = wall
        atomic_write_text(mid / "metrics.json", json.dumps(metrics, indent=1))
    return mid / "connector", metrics


def train(name: str, args: argparse.Namespace, paths: dict[str, Path], out: Path) -> dict:
    """Stage 2 for one connector (the recipe, under the launcher); its metrics.json plus the wall time (ssr-mid:
    the mid stage's metrics under ``mid`` and its wall time added)."""
    overrides, from_stage1 = CONNECTORS[name]
    if from_stage1 and not paths["stage1"].is_dir():
        raise ConfigError(f"bench_quality: {name} starts from the stage-1 connector, not found: {paths['stage1']}")
    steps = args.steps
    if name == "ssr-mid" and not 0 < args.mid_steps < args.steps:
        raise ConfigError(f"bench_quality: --mid-steps must be between 0 and --steps ({args.steps}) exclusive, got "
                          f"{args.mid_steps}")
    if args.retrain and out.exists():
        shutil.rmtree(out)
    start, mid_metrics = paths["stage1"], None
    if name == "ssr-mid":
        start, mid_metrics = train_mid(args, paths, out)
        steps = args.steps - args.mid_steps  # equal total steps: mid + stage 2 = --steps
    wall = None
    if not run_finished(out, steps):
        keys = _data_keys(paths, out, steps)
        if from_stage1:
            keys.append(f"model.init_connector={start}")
        else:
            keys += ["leakage_utts=0"] + [f"model.connector.{k}={v}" for k, v in overrides.items()]
            if overrides:  # a baseline: no per-token vectors, so no stage-1 term
                keys.append("distill_weight=0")
            else:  # SSR from scratch gets the run's stage-1 connector shape
                keys += _ssr_shape(paths)
        out.mkdir(parents=True, exist_ok=True)
        wall = _launch(name, "stage2_finetune.py", paths["config"], keys, args, out.parent / f"{name}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    if wall is not None:
        metrics["bench_wall_s"] = wall
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    if mid_metrics is not None:
        metrics = {**metrics, "mid": mid_metrics}
        if metrics.get("bench_wall_s") is not None and mid_metrics.get("bench_wall_s") is not None:
            metrics["bench_wall_s"] += mid_metrics["bench_wall_s"]
    return metrics


def _ssr_shape(paths: dict[str, Path]) -> list[str]:
    """The stage-1 connector's SSR settings as overrides (so ssr-scratch differs from ssr only in its start)."""
    cfg = json.loads((paths["stage1"] / "config.json").read_text())["config"]
    keep = ("d_model", "n_layers", "n_heads", "mask", "stack", "slot_readout", "readout", "rope")
    return [f"model.connector.{k}={str(cfg[k]).lower() if isinstance(cfg[k], bool) else cfg[k]}"
            for k in keep if k in cfg]


def evaluate(names: list[str], args: argparse.Namespace, paths: dict[str, Path], work: Path) -> dict[str, Path]:
    """StoryCloze S->T, Speech-MMLU cloze and zero-shot ASR for every connector at once; the report paths."""
    conns = "[" + ",".join(str(work / n / "connector") for n in names) + "]"
    common = [f"llm={paths['llm']}", f"aligner={paths['aligner']}", f"out_dir={work / 'eval'}",
              f"threads={args.threads}"]
    py = sys.executable
    runs = {
        "storycloze": [py, "recipes/eval_storycloze.py", *common, f"connectors={conns}", "cascade=false",
                       f"limit={args.stories}", "conditions=[text,s2t]", "voices=[natural]"],
        "speech_mmlu": [py, "recipes/eval_speech_mmlu.py", *common, f"connectors={conns}", "methods=[cloze]",
                        "cascade=false", f"limit={args.questions}", "voices=[natural]"],
        "asr": [py, "recipes/eval_asr.py", *common, f"connectors={conns}", f"manifest={paths['test']}",
                f"limit={args.asr_utts}", f"max_new_tokens={args.asr_max_tokens}", "text_oracle=false"],
    }
    reports = {}
    for key, cmd in runs.items():
        print(f"[eval] {key}", flush=True)
        with open(work / f"eval_{key}.log", "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=recipe_env())
        if rc != 0:
            raise RuntimeError(f"bench_quality: {key} evaluation failed (exit {rc}); see {work / f'eval_{key}.log'}")
        reports[key] = work / "eval" / f"{key}.json"
    return reports


def _row(results: list[dict], label: str, **want) -> dict | None:
    for r in results:
        if r["connector"] == label and all(r.get(k) == v for k, v in want.items()):
            return r
    return None


def collect(names: list[str], metrics: dict[str, dict], reports: dict[str, Path]) -> list[dict]:
    sc = json.loads(reports["storycloze"].read_text())["results"]
    mm = json.loads(reports["speech_mmlu"].read_text())["results"]
    asr = json.loads(reports["asr"].read_text())["results"]
    rows = []
    for n in names:
        label = f"{n}/connector"
        m = metrics[n]
        valid = m.get("final_valid", {})  # a stage's metrics.json: the last validation
        mid_steps = m["mid"]["steps"] if "mid" in m else 0
        row = {"connector": n, "label": LABELS[n], "steps": m["steps"] + mid_steps, "mid_steps": mid_steps,
               "valid_loss_speech": valid.get("loss_speech", m.get("valid_loss_speech")),
               "valid_loss_text": valid.get("loss_text", m.get("valid_loss_text")),
               "step_time_s": m.get("step_time_s_median"), "train_wall_s": m.get("bench_wall_s")}
        for style in ("adversarial", "random"):
            r = _row(sc, label, task=f"storycloze/{style}", condition="s2t", scoring="summed")
            row[f"storycloze_{style}"] = None if r is None else {**r["accuracy"], "parity": r["parity"],
                                                                  "text": r["text_accuracy"]["acc"]}
        r = _row(mm, label, task="speech_mmlu/all", condition="speech_0shot", scoring="cloze")
        row["mmlu_0shot"] = None if r is None else {**r["accuracy"], "parity": r["parity"],
                                                    "text": r["text_accuracy"]["acc"]}
        a = next((x for x in asr if x["system"] == label), None)
        row["asr_wer"] = None if a is None else a["wer"]
        rows.append(row)
    return rows


def _acc(d: dict | None) -> str:
    if d is None:
        return "-"
    lo, hi = d["ci95"]
    return f"{100 * d['acc']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}] ({d['parity']:.2f})"


def table(rows: list[dict]) -> str:
    head = ("| connector | steps (mid + stage 2) | step s | valid loss (text) | ASR WER % | StoryCloze S->T adv. % (parity) "
            "| S->T random % (parity) | MMLU cloze 0-shot % (parity) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        loss = "-" if r["valid_loss_speech"] is None else f"{r['valid_loss_speech']:.3f} ({r['valid_loss_text']:.3f})"
        wer = "-" if r["asr_wer"] is None else f"{100 * r['asr_wer']:.1f}"
        step = "-" if r["step_time_s"] is None else f"{r['step_time_s']:.2f}"
        steps = f"{r['mid_steps']} + {r['steps'] - r['mid_steps']}" if r.get("mid_steps") else str(r["steps"])
        lines.append(f"| {r['label']} | {steps} | {step} | {loss} | {wer} | {_acc(r['storycloze_adversarial'])} "
                     f"| {_acc(r['storycloze_random'])} | {_acc(r['mmlu_0shot'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    keys = [("storycloze_adversarial", "StoryCloze S->T (adv.)"), ("storycloze_random", "StoryCloze S->T (random)"),
            ("mmlu_0shot", "Speech-MMLU cloze 0-shot")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), sharey=True)
    for ax, (key, title) in zip(axes, keys):
        accs = [r[key] for r in rows]
        xs = range(len(rows))
        vals = [100 * a["acc"] if a else 0.0 for a in accs]
        err = [[100 * (a["acc"] - a["ci95"][0]) if a else 0 for a in accs],
               [100 * (a["ci95"][1] - a["acc"]) if a else 0 for a in accs]]
        ax.bar(xs, vals, yerr=err, capsize=3, color=["#1f77b4" if r["connector"].startswith("ssr") else "#999999"
                                                      for r in rows])
        text = next((a.get("text") for a in accs if a and a.get("text") is not None), None)
        if text is not None:
            ax.axhline(100 * text, color="k", ls="--", lw=1, label="text (same LLM)")
            ax.legend(loc="lower right", fontsize=7)
        ax.set_xticks(list(xs), [r["connector"] for r in rows], rotation=30, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("accuracy % (95% CI)")
    fig.suptitle(f"Quality at equal stage-2 budget ({rows[0]['steps']} steps)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def run(args: argparse.Namespace) -> dict:
    """Train every connector of ``args.connectors`` (reused when finished), evaluate them all, write the report."""
    names = pick_names(args.connectors, list(CONNECTORS), "bench_quality --connectors")
    paths = _paths(args)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics = {n: train(n, args, paths, work / n) for n in names}
    if args.skip_eval:
        return {"metrics": metrics}
    reports = evaluate(names, args, paths, work)
    rows = collect(names, metrics, reports)
    result = {
        "benchmark": "quality at equal stage-2 budget", "machine": machine(), "run": str(paths["run"]),
        "steps": args.steps, "ranks": args.ranks, "stories": args.stories, "questions_per_subject": args.questions,
        "asr_utts": args.asr_utts, "wall_s": time.perf_counter() - t0, "rows": rows,
    }
    write_json(work / "bench_quality.json", result)
    plot(rows, work / "bench_quality.png")
    print(table(rows))
    print(f"\nwrote {work / 'bench_quality.json'} and {work / 'bench_quality.png'}")
    return result
