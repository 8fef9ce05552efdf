"""The quality benchmark's evaluations, each (connector, seed) evaluated once and its reports reused.

:func:`evaluate` runs the evaluation recipes (spoken StoryCloze S->T, Speech-MMLU cloze, zero-shot ASR) for the runs
that have no usable reports yet, all of them in one go (the same rendered audio and text rows), into
``<work>/eval/<run>+<run>.../``, and records in ``<work>/eval/index.json`` which reports hold each run and with which
settings. A run's reports are reused when the index records them with the same settings (``--stories``,
``--questions``, ``--asr-utts``, ``--asr-max-tokens``, the LLM) and every report is newer than the run's connector (a
retrained connector is evaluated again); ``--reevaluate`` evaluates every run again. So adding a seed evaluates only
that seed's connectors.

A folder whose ``bench_quality.json`` predates the index (one report set for all its runs, in ``<work>/eval/``)
is adopted: its rows' runs, with its recorded limits and the ASR cap of that time (96 tokens, the default it did not
record).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from speechlm.perf import ROOT
from speechlm.perf.bench import recipe_env, write_json

KEYS = ("storycloze", "speech_mmlu", "asr")
INDEX = "index.json"
LEGACY_ASR_MAX_TOKENS = 96  # the cap a pre-index bench used without recording it (the CLI default then and now)


def settings(args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, object]:
    """What an evaluation's numbers depend on besides the connector: the item limits, the ASR cap and the LLM."""
    return {"stories": args.stories, "questions": args.questions, "asr_utts": args.asr_utts,
            "asr_max_tokens": args.asr_max_tokens, "llm": str(paths["llm"])}


def _legacy(work: Path) -> dict[str, dict]:
    """The index entries of a ``bench_quality.json`` written before the index (``{}`` without one)."""
    saved = work / "bench_quality.json"
    if not saved.is_file():
        return {}
    data = json.loads(saved.read_text())
    reports = data.get("reports")
    if not isinstance(reports, dict) or set(reports) != set(KEYS) or not all(isinstance(v, str) for v in
                                                                            reports.values()):
        return {}
    storycloze = Path(reports["storycloze"])
    meta = json.loads(storycloze.read_text()).get("meta", {}) if storycloze.is_file() else {}
    stamp = {"stories": data.get("stories"), "questions": data.get("questions_per_subject"),
             "asr_utts": data.get("asr_utts"), "asr_max_tokens": LEGACY_ASR_MAX_TOKENS, "llm": meta.get("llm")}
    root = work.resolve()
    rel = {}
    for key, value in reports.items():  # relative to the folder where they lie in it, as the index keeps them
        path = Path(value).resolve()
        rel[key] = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    return {f"{r['connector']}-s{r['seed']}": {"reports": rel, "settings": stamp} for r in data.get("rows", [])}


def load_index(work: Path) -> dict[str, dict]:
    """``{run: {"reports": {key: path relative to work}, "settings": {...}}}`` from ``<work>/eval/index.json``, or
    adopted from a pre-index ``bench_quality.json``."""
    path = work / "eval" / INDEX
    if path.is_file():
        return json.loads(path.read_text())["runs"]
    return _legacy(work)


def _newest(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0)


def reusable(entry: dict | None, stamp: dict, work: Path, connector: Path) -> dict[str, Path] | None:
    """The run's reports when ``entry`` records all of them with ``stamp`` and each is newer than ``connector``."""
    if entry is None or entry.get("settings") != stamp or set(entry.get("reports", {})) != set(KEYS):
        return None
    reports = {k: work / v for k, v in entry["reports"].items()}
    if not all(p.is_file() for p in reports.values()):
        return None
    trained = _newest(connector)
    return reports if all(p.stat().st_mtime > trained for p in reports.values()) else None


def _commands(names: list[str], args: argparse.Namespace, paths: dict[str, Path], work: Path,
              out: Path) -> dict[str, list]:
    conns = "[" + ",".join(str(work / n / "connector") for n in names) + "]"
    common = [f"llm={paths['llm']}", f"aligner={paths['aligner']}", f"out_dir={out}", f"threads={args.threads}"]
    py = sys.executable
    return {
        "storycloze": [py, "recipes/eval_storycloze.py", *common, f"connectors={conns}", "cascade=false",
                       f"limit={args.stories}", "conditions=[text,endings,s2t]", "voices=[natural]"],
        "speech_mmlu": [py, "recipes/eval_speech_mmlu.py", *common, f"connectors={conns}", "methods=[cloze]",
                        "cascade=false", f"limit={args.questions}", "voices=[natural]"],
        "asr": [py, "recipes/eval_asr.py", *common, f"connectors={conns}", f"manifest={paths['test']}",
                f"limit={args.asr_utts}", f"max_new_tokens={args.asr_max_tokens}", "text_oracle=false"],
    }


def evaluate(names: list[str], args: argparse.Namespace, paths: dict[str, Path], work: Path) -> dict[str, dict]:
    """StoryCloze S->T, Speech-MMLU cloze and zero-shot ASR for the connectors of the trained runs ``names``
    (folders under ``work``): ``{run: {key: report path}}``. Runs with usable reports (see the module) are not
    evaluated again; the rest are evaluated together. ``--stories``, ``--questions`` (per subject) and
    ``--asr-utts`` are the recipes' ``limit``: the first N items, 0 = the whole set."""
    stamp = settings(args, paths)
    index = load_index(work)
    found: dict[str, dict] = {}
    for n in names:
        reports = None if getattr(args, "reevaluate", False) else reusable(index.get(n), stamp, work,
                                                                            work / n / "connector")
        if reports is not None:
            print(f"[eval] {n}: reusing its reports ({reports['storycloze'].parent})", flush=True)
            found[n] = reports
    missing = [n for n in names if n not in found]
    if missing:
        out = work / "eval" / "+".join(missing)
        for key, cmd in _commands(missing, args, paths, work, out).items():
            print(f"[eval] {key}: {', '.join(missing)}", flush=True)
            log = out.parent / f"{out.name}.{key}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:
                rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=recipe_env())
            if rc != 0:
                raise RuntimeError(f"bench_quality: {key} evaluation failed (exit {rc}); see {log}")
        for n in missing:
            found[n] = {k: out / f"{k}.json" for k in KEYS}
            index[n] = {"reports": {k: f"eval/{out.name}/{k}.json" for k in KEYS}, "settings": stamp}
        write_json(work / "eval" / INDEX, {"runs": index})
    return {n: found[n] for n in names}
