"""Quality at equal budget: SSR against the baseline connectors, each trained by the stage recipes and scored by
the evaluation recipes (tools/benchmarks/bench_quality.py); the tables and plot of their reports.

* :func:`train`: stage 2 (ssr-mid: the mid stage, then stage 2) for one connector and one seed (the stage config's
  ``seed=``) into ``<out>/<name>-s<seed>``; a finished run there is reused only when its ``config.yaml`` records that
  seed (a folder holding another seed's run is refused, never resumed or mixed);
* speechlm.perf.benchmarks.quality_eval: StoryCloze S->T, Speech-MMLU cloze and zero-shot ASR of the (connector,
  seed) runs not evaluated yet with the same settings, in one go (the same rendered audio for all); the others'
  reports are reused;
* :func:`collect`: one row per (connector, seed) from the reports, with each metric's per-item outcomes;
* speechlm.perf.benchmarks.quality_paired: every connector minus SSR of the same seed on the same items (95%
  interval, McNemar p, "inside the noise"), and each connector's mean accuracy over the seeds with its spread;
* :func:`run`: all of it, ``<out>/bench_quality.json`` and ``.png``, the tables printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from speechlm.atomic import atomic_write_text
from speechlm.errors import ConfigError
from speechlm.perf import ROOT
from speechlm.perf.bench import (
    launch_recipe,
    machine,
    pick_names,
    pyplot,
    run_finished,
    save_figure,
    write_json,
)
from speechlm.perf.benchmarks.quality_eval import KEYS as EVAL_KEYS
from speechlm.perf.benchmarks.quality_eval import evaluate
from speechlm.perf.benchmarks.quality_paired import (
    METRICS,
    over_seeds,
    paired_table,
    paired_vs_ssr,
    seeds_table,
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


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1`` -> ``[0, 1]`` (distinct integers >= 0, in the order given); ConfigError otherwise."""
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"bench_quality --seeds: need comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"bench_quality --seeds: need distinct integers >= 0, got {text!r}")
    return seeds


def run_name(name: str, seed: int) -> str:
    """The folder (and report label) of one connector trained with one seed: ``<name>-s<seed>``."""
    return f"{name}-s{seed}"


def recorded_seed(folder: Path) -> int | None:
    """The ``seed`` of the stage run in ``folder`` (its config.yaml, written when the run starts); None without
    one."""
    cfg = folder / "config.yaml"
    if not cfg.is_file():
        return None
    data = yaml.safe_load(cfg.read_text()) or {}
    if not isinstance(data, dict) or "seed" not in data:
        raise ConfigError(f"bench_quality: {cfg} records no seed")
    return int(data["seed"])


def _reusable(name: str, folder: Path, steps: int, seed: int) -> bool:
    """True when ``folder`` holds a finished run of ``steps`` with ``seed``; ConfigError when it holds a run (finished
    or not) of another seed, which neither reuse nor a resume may mix in."""
    got = recorded_seed(folder)
    if got is not None and got != seed:
        raise ConfigError(f"bench_quality: {folder} holds a {name} run with seed {got}, not {seed} (--retrain, or "
                          "another --out)")
    return got == seed and run_finished(folder, steps)


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


def train_mid(args: argparse.Namespace, paths: dict[str, Path], out: Path, seed: int = 0) -> tuple[Path, dict]:
    """ssr-mid's first part: the supervised mid-training stage from the stage-1 connector for ``--mid-steps``
    steps with ``seed`` into ``<out>/mid`` (reused when finished with that seed); its connector folder and metrics."""
    mid = out / "mid"
    wall = None
    if not _reusable("ssr-mid (mid stage)", mid, args.mid_steps, seed):
        mid.mkdir(parents=True, exist_ok=True)
        keys = [*_data_keys(paths, mid, args.mid_steps), f"model.init_connector={paths['stage1']}", f"seed={seed}"]
        wall = _launch("ssr-mid", "stage_mid_supervised.py", paths["mid_config"], keys, args,
                       out.parent / f"{out.name}.log")
    metrics = json.loads((mid / "metrics.json").read_text())
    if wall is not None:
        metrics["bench_wall_s"] = wall
        atomic_write_text(mid / "metrics.json", json.dumps(metrics, indent=1))
    return mid / "connector", metrics


def train(name: str, args: argparse.Namespace, paths: dict[str, Path], out: Path, seed: int = 0) -> dict:
    """Stage 2 for one connector with ``seed`` (the recipe, under the launcher) into ``out``, reused when a run of
    that seed finished there; its metrics.json plus the wall time and ``seed`` (ssr-mid: the mid stage's metrics
    under ``mid`` and its wall time added)."""
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
        start, mid_metrics = train_mid(args, paths, out, seed)
        steps = args.steps - args.mid_steps  # equal total steps: mid + stage 2 = --steps
    wall = None
    if not _reusable(name, out, steps, seed):
        keys = [*_data_keys(paths, out, steps), f"seed={seed}"]
        if from_stage1:
            keys.append(f"model.init_connector={start}")
        else:
            keys += ["leakage_utts=0"] + [f"model.connector.{k}={v}" for k, v in overrides.items()]
            if overrides:  # a baseline: no per-token vectors, so no stage-1 term
                keys.append("distill_weight=0")
            else:  # SSR from scratch gets the run's stage-1 connector shape
                keys += _ssr_shape(paths)
        out.mkdir(parents=True, exist_ok=True)
        wall = _launch(name, "stage2_finetune.py", paths["config"], keys, args, out.parent / f"{out.name}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    if wall is not None:
        metrics["bench_wall_s"] = wall
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    if mid_metrics is not None:
        metrics = {**metrics, "mid": mid_metrics}
        if metrics.get("bench_wall_s") is not None and mid_metrics.get("bench_wall_s") is not None:
            metrics["bench_wall_s"] += mid_metrics["bench_wall_s"]
    return {**metrics, "seed": seed}


def _ssr_shape(paths: dict[str, Path]) -> list[str]:
    """The stage-1 connector's SSR settings as overrides (so ssr-scratch differs from ssr only in its start)."""
    cfg = json.loads((paths["stage1"] / "config.json").read_text())["config"]
    keep = ("d_model", "n_layers", "n_heads", "mask", "stack", "slot_readout", "readout", "rope")
    return [f"model.connector.{k}={str(cfg[k]).lower() if isinstance(cfg[k], bool) else cfg[k]}"
            for k in keep if k in cfg]


def _row(results: list[dict], label: str, **want) -> dict | None:
    for r in results:
        if r["connector"] == label and all(r.get(k) == v for k, v in want.items()):
            return r
    return None


def _accuracy(r: dict | None) -> tuple[dict | None, dict[str, bool] | None]:
    """A report row's accuracy (with its parity and text accuracy) and its per-item outcomes (None without)."""
    if r is None:
        return None, None
    acc = {**r["accuracy"], "parity": r["parity"], "text": (r.get("text_accuracy") or {}).get("acc")}
    items = {k: bool(v) for k, v in r["items"].items()} if r.get("items") else None
    return acc, items


def _results(path: Path, cache: dict[Path, list]) -> list[dict]:
    if path not in cache:
        cache[path] = json.loads(path.read_text())["results"]
    return cache[path]


def collect(runs: list[tuple[str, int]], metrics: dict[str, dict], reports: dict[str, dict[str, Path]]) -> list[dict]:
    """One row per trained ``(connector, seed)`` of ``runs`` (``metrics`` keyed by :func:`run_name`), read from its
    evaluation reports (``reports[run][key]``; a run without reports gets None for all): its accuracies (None when a
    report lacks it: missing, not made up), ASR WER, validation loss, and ``items``: ``{metric: {item id: right?}}``
    for the paired comparisons (not written to the JSON). The floors (the LLM without the spoken part: endings alone,
    options alone) are the same items for every report; they are read from the first report that has them."""
    cache: dict[Path, list] = {}
    floors: dict[str, dict | None] = {f"storycloze_{s}": None for s in ("adversarial", "random")}
    floors |= {f"mmlu_{shots}shot": None for shots in (0, 5)}
    for rep in reports.values():
        sc, mm = _results(rep["storycloze"], cache), _results(rep["speech_mmlu"], cache)
        for style in ("adversarial", "random"):
            floors[f"storycloze_{style}"] = floors[f"storycloze_{style}"] or _row(
                sc, "llm", task=f"storycloze/{style}", condition="endings", scoring="summed")
        for shots in (0, 5):
            floors[f"mmlu_{shots}shot"] = floors[f"mmlu_{shots}shot"] or _row(
                mm, "llm", task="speech_mmlu/all", condition=f"noquestion_{shots}shot", scoring="cloze")
    rows = []
    for n, seed in runs:
        label = f"{run_name(n, seed)}/connector"
        m = metrics[run_name(n, seed)]
        rep = reports.get(run_name(n, seed))
        sc, mm, asr = ([], [], []) if rep is None else [_results(rep[k], cache) for k in EVAL_KEYS]
        valid = m.get("final_valid", {})  # a stage's metrics.json: the last validation
        mid_steps = m["mid"]["steps"] if "mid" in m else 0
        row = {"connector": n, "seed": seed, "label": LABELS[n], "steps": m["steps"] + mid_steps,
               "mid_steps": mid_steps, "valid_loss_speech": valid.get("loss_speech", m.get("valid_loss_speech")),
               "valid_loss_text": valid.get("loss_text", m.get("valid_loss_text")),
               "step_time_s": m.get("step_time_s_median"), "train_wall_s": m.get("bench_wall_s"), "items": {}}
        for style in ("adversarial", "random"):
            key = f"storycloze_{style}"
            row[key], row["items"][key] = _accuracy(
                _row(sc, label, task=f"storycloze/{style}", condition="s2t", scoring="summed"))
        for shots in (0, 5):  # 5-shot: the text exemplars before the spoken question (the recipe's default shots)
            row[f"mmlu_{shots}shot"], row["items"][f"mmlu_{shots}shot"] = _accuracy(
                _row(mm, label, task="speech_mmlu/all", condition=f"speech_{shots}shot", scoring="cloze"))
        for key, floor in floors.items():
            if row[key] is not None and floor is not None:
                row[key]["floor"] = floor["accuracy"]["acc"]
        a = next((x for x in asr if x["system"] == label), None)
        row["asr_wer"] = None if a is None else a["wer"]
        rows.append(row)
    return rows


def _acc(d: dict | None) -> str:
    if d is None:
        return "-"
    lo, hi = d["ci95"]
    parity = "-" if d.get("parity") is None else f"{d['parity']:.2f}"  # None: no text accuracy, or text got 0
    return f"{100 * d['acc']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}] ({parity})"


def table(rows: list[dict]) -> str:
    head = ("| connector | seed | steps (mid + stage 2) | step s | valid loss (text) | ASR WER % "
            "| StoryCloze S->T adv. % (parity) | S->T random % (parity) | MMLU cloze 0-shot % (parity) "
            "| 5-shot % (parity) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        loss = "-" if r["valid_loss_speech"] is None else f"{r['valid_loss_speech']:.3f} ({r['valid_loss_text']:.3f})"
        wer = "-" if r["asr_wer"] is None else f"{100 * r['asr_wer']:.1f}"
        step = "-" if r["step_time_s"] is None else f"{r['step_time_s']:.2f}"
        steps = f"{r['mid_steps']} + {r['steps'] - r['mid_steps']}" if r.get("mid_steps") else str(r["steps"])
        lines.append(f"| {r['label']} | {r['seed']} | {steps} | {step} | {loss} | {wer} "
                     f"| {_acc(r['storycloze_adversarial'])} "
                     f"| {_acc(r['storycloze_random'])} | {_acc(r['mmlu_0shot'])} | {_acc(r['mmlu_5shot'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    seeds = len({r["seed"] for r in rows})
    ticks = [r["connector"] if seeds == 1 else f"{r['connector']}/s{r['seed']}" for r in rows]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(max(4.2, 0.45 * len(rows) + 1.5) * len(METRICS), 3.6),
                             sharey=True)
    for ax, (key, title) in zip(axes, METRICS):
        accs = [r[key] for r in rows]
        xs = range(len(rows))
        vals = [100 * a["acc"] if a else 0.0 for a in accs]
        err = [[100 * (a["acc"] - a["ci95"][0]) if a else 0 for a in accs],
               [100 * (a["ci95"][1] - a["acc"]) if a else 0 for a in accs]]
        ax.bar(xs, vals, yerr=err, capsize=3, color=["#1f77b4" if r["connector"].startswith("ssr") else "#999999"
                                                      for r in rows])
        text = next((a.get("text") for a in accs if a and a.get("text") is not None), None)
        floor = next((a.get("floor") for a in accs if a and a.get("floor") is not None), None)
        if text is not None:
            ax.axhline(100 * text, color="k", ls="--", lw=1, label="text (same LLM)")
        if floor is not None:
            ax.axhline(100 * floor, color="C3", ls=":", lw=1.2, label="no context (same LLM)")
        if text is not None or floor is not None:
            ax.legend(loc="lower right", fontsize=7)
        ax.set_xticks(list(xs), ticks, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("accuracy % (95% CI)")
    fig.suptitle(f"Quality at equal stage-2 budget ({rows[0]['steps']} steps)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def run(args: argparse.Namespace) -> dict:
    """Train every connector of ``args.connectors`` once per seed of ``args.seeds`` (reused when finished), evaluate
    them all in one go, compare each with SSR of its seed item by item, write the report."""
    names = pick_names(args.connectors, list(CONNECTORS), "bench_quality --connectors")
    seeds = parse_seeds(args.seeds)
    for opt in ("stories", "questions", "asr_utts"):
        if getattr(args, opt) < 0:
            raise ConfigError(f"bench_quality --{opt.replace('_', '-')}: need >= 0 (0 = the whole set), got "
                              f"{getattr(args, opt)}")
    paths = _paths(args)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = [(n, s) for s in seeds for n in names]
    metrics = {run_name(n, s): train(n, args, paths, work / run_name(n, s), s) for n, s in runs}
    if args.skip_eval:
        return {"metrics": metrics}
    reports = evaluate([run_name(n, s) for n, s in runs], args, paths, work)
    rows = collect(runs, metrics, reports)
    paired = paired_vs_ssr(rows)
    summary = over_seeds(rows, paired)
    rows = [{k: v for k, v in r.items() if k != "items"} for r in rows]  # the outcomes stay in the reports
    result = {
        "benchmark": "quality at equal stage-2 budget", "machine": machine(), "run": str(paths["run"]),
        "steps": args.steps, "ranks": args.ranks, "seeds": seeds, "stories": args.stories,
        "questions_per_subject": args.questions, "asr_utts": args.asr_utts, "limits_note": "0 = the whole set",
        "reports": {n: {k: str(p) for k, p in rep.items()} for n, rep in reports.items()},
        "wall_s": time.perf_counter() - t0, "rows": rows,
        "paired_vs_ssr": paired, "over_seeds": summary,
    }
    write_json(work / "bench_quality.json", result)
    plot(rows, work / "bench_quality.png")
    print(table(rows))
    print("\nMinus SSR of the same seed on the same items (paired bootstrap 95% CI, McNemar p):\n")
    print(paired_table(paired, LABELS))
    print(f"\nOver seeds {','.join(map(str, seeds))}:\n")
    print(seeds_table(summary))
    print(f"\nwrote {work / 'bench_quality.json'} and {work / 'bench_quality.png'}")
    return result
