"""Gather a recipe run's results into ``<run>/summary.json`` and print them as a table.

    python tools/summarize_run.py --run runs/tiny [--corpus DIR]

Reads what each step wrote: ``aligner_eval.json`` (tools/eval_alignment.py), ``stage1/metrics.json``,
``stage2/metrics.json``, ``times.json`` (wall seconds per step, from the recipe) and the evaluation
entries the evaluation recipes already merged into ``summary.json``. ``llm_inputs_per_audio_second``
is measured on the aligned validation manifest: LLM tokens (= SSR vectors) per second of audio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechlm.atomic import atomic_write_text
from speechlm.data.manifest import iter_manifest

#: (decoder/mode) whose numbers stand for the aligner in the summary: the default decoder, forced mode.
HEADLINE_ALIGNMENT = "ctc_segmentation/forced"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _stage(metrics: dict | None) -> dict:
    if not metrics:
        return {}
    out = {}
    for k, v in metrics.get("final_valid", {}).items():
        out[k if k.startswith(("leakage", "valid_")) else f"valid_{k}"] = v
    out["step_time_s"] = metrics.get("step_time_s_median")
    out["steps"] = metrics.get("steps") or metrics.get("step")
    return out


def inputs_per_audio_second(manifest: Path) -> float | None:
    """LLM input vectors per second of audio for SSR: one per transcript token of each aligned row."""
    if not manifest.is_file():
        return None
    tokens = seconds = 0.0
    for utt in iter_manifest(manifest):
        if utt.token_boundaries is not None:
            tokens += len(utt.token_boundaries)
            seconds += utt.duration_s
    return tokens / seconds if seconds else None


def summarize(run: Path) -> dict:
    summary = _load(run / "summary.json") or {}
    align = _load(run / "aligner_eval.json")
    if align:
        res = align["results"].get(HEADLINE_ALIGNMENT) or next(iter(align["results"].values()))
        summary["aligner"] = {
            "word_boundary_mae_ms": res.get("mae_ms"), "within_20ms": res.get("within_20ms"),
            "within_50ms": res.get("within_50ms"), "cer": res.get("cer"), "rtf": res.get("rtf_aligner"),
            "all": align["results"],
        }
    for stage in ("stage1", "stage2"):
        values = _stage(_load(run / stage / "metrics.json"))
        if values:
            summary[stage] = values
    rate = inputs_per_audio_second(run / "aligned" / "valid.jsonl")
    if rate is not None:
        summary["llm_inputs_per_audio_second"] = round(rate, 3)
    times = _load(run / "times.json")
    if times:
        summary["wall_time_s"] = {**times, "total": round(sum(times.values()), 1)}
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def table(summary: dict) -> str:
    """A two-column markdown table of every scalar in the summary (nested keys joined by dots)."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k != "all":
                    walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, float):
            rows.append((prefix, f"{node:.4g}"))
        elif isinstance(node, (int, str)) or node is None:
            rows.append((prefix, str(node)))

    walk("", summary)
    width = max((len(k) for k, _ in rows), default=10)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder, e.g. runs/tiny")
    args = ap.parse_args(argv)
    summary = summarize(Path(args.run))
    print(table(summary))
    print(f"\nwritten: {Path(args.run) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
