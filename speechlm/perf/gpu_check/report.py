"""The GPU check's report: where it goes, one line of numbers per part, and the table printed at the end."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from speechlm.perf import ROOT
from speechlm.perf.gpu_check.context import dump_json


def report_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_report.json"
    return ROOT / "runs" / "gpu_check" / "report.json"


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dump_json(path, report)


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def summarize(name: str, part: dict) -> str:
    """One line of numbers for the table."""
    r = part.get("result") or {}
    try:
        if name == "env":
            e, m = r.get("env", {}), r.get("matmul", {})
            pk = e.get("packages", {})
            return (f"{e.get('gpu', 'CPU')}, torch {e.get('torch')}, transformers {pk.get('transformers')}, "
                    f"deepspeed {pk.get('deepspeed')}, {m.get('dtype')} matmul {_fmt(m.get('tflops'), '.3g')} TFLOP/s")
        if name.startswith(("stage1_zero", "stage2_zero")):
            s, st = r.get("steps", {}), r.get("setup", {})
            mem = f", peak {_fmt(s.get('peak_mem_gib'), '.1f')} GiB" if "peak_mem_gib" in s else ""
            mfu = f", MFU {100 * s['mfu']:.1f}% (HFU {100 * s['hfu']:.1f}%)" if "mfu" in s else ""
            return (f"{st.get('llm')} LLM, step {_fmt(s.get('step_s_median'), '.3f')} s, "
                    f"{_fmt(s.get('tokens_per_s'), ',.0f')} tok/s, {_fmt(s.get('audio_s_per_s'), ',.0f')} audio s/s"
                    f"{mem}{mfu}, frozen unchanged {part.get('checks', {}).get('frozen_unchanged')}")
        if name == "encoders":
            bits = []
            for kind in ("w2v-bert", "whisper"):
                k = r.get(kind, {})
                bits.append(f"{kind} {_fmt(k.get('audio_s_per_s'), ',.0f')} audio s/s "
                            f"(cache e2e {_fmt(k.get('cache_e2e_audio_s_per_s'), ',.0f')}, "
                            f"fbank/mel {_fmt(k.get('feature_extractor_s'), '.2f')} s a batch)")
            return "; ".join(bits)
        if name == "stage1_run":
            run = r.get("run", {})
            src = str(r.get("audio_source", "?")).split(" ")[0]
            return (f"{src}, {run.get('steps')} steps, loss {_fmt(run.get('loss_first_mean'), '.3f')} -> "
                    f"{_fmt(run.get('loss_last_mean'), '.3f')}, valid cosine "
                    f"{_fmt((run.get('final_valid') or {}).get('cosine'), '.3f')}")
        if name == "tests":
            p = r.get("pytest", {})
            return (f"{p.get('tests', '?')} tests: {p.get('failures', '?')} failed, {p.get('errors', '?')} errors, "
                    f"{p.get('skipped', '?')} skipped")
    except (TypeError, KeyError, ValueError) as e:
        return f"(summary failed: {e})"
    return ""


def print_table(report: dict) -> str:
    rows = [("part", "status", "wall s", "numbers")]
    for name in report["parts"]:
        p = report["parts"][name]
        numbers = summarize(name, p)
        if p.get("status") not in ("ok", "skipped") and p.get("error"):
            numbers = (numbers + " | " if numbers else "") + str(p["error"]).splitlines()[0][:160]
        elif p.get("status") == "fail":
            bad = [k for k, v in p.get("checks", {}).items() if not v]
            numbers += f" | failed checks: {', '.join(bad)}"
        rows.append((name, str(p.get("status")), _fmt(p.get("wall_s"), ".1f"), numbers))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.insert(1, "-" * (sum(widths) + 6 + 40))
    text = "\n".join(lines)
    print(text, flush=True)
    return text
