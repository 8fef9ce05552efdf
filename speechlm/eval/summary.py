"""A recipe run's results gathered into ``<run>/summary.json`` and shown as a table (tools/summarize_run.py).

:func:`summarize` reads what each step wrote: the corpus's ``summary.json`` (``--corpus``: hours, word-type coverage of the
evaluation sets, utterances per engine), ``aligner_eval.json`` (tools/eval_alignment.py), ``stage1/metrics.json``,
``mid/metrics.json`` (the optional supervised mid-training, MID=1), ``stage2/metrics.json``,
``token_analysis.json`` (tools/analyze_tokens.py: stage 1 by token class and by engine),
``times.json`` (wall seconds per step, from the recipe) and the evaluation
entries the evaluation recipes already merged into ``summary.json``. ``corpus.whisper_wer_test`` is
Whisper base's own WER on the evaluated test rows (``eval/asr.json``, the ``whisper`` system), overall and
per engine. ``llm_inputs_per_audio_second``
is measured on the aligned validation manifest: LLM tokens (= SSR vectors) per second of audio.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def corpus_entry(corpus: Path | None, asr_report: dict | None) -> dict:
    """The ``corpus`` block: size, coverage, utterances per engine and Whisper base's WER on the test rows."""
    out: dict = {}
    data = _load(corpus / "summary.json") if corpus else None
    if data:
        out["hours"] = data.get("hours")
        out["eval_type_coverage"] = data.get("coverage")
        out["coverage_general"] = data.get("coverage_general")
        out["augmented_share"] = data.get("augmented_share")
        out["by_engine"] = data.get("by_engine")
        if data.get("missing_voices"):
            out["missing_voices"] = ", ".join(data["missing_voices"])
    whisper = next((r for r in (asr_report or {}).get("results", []) if r.get("system") == "whisper"), None)
    if whisper:
        out["whisper_wer_test"] = whisper["wer"]
        out["whisper_n_test"] = whisper["n"]
        out["whisper_wer_test_by_engine"] = {e: next(r["wer"] for r in rows if r["system"] == "whisper")
                                             for e, rows in asr_report.get("by_engine", {}).items()
                                             if any(r["system"] == "whisper" for r in rows)}
    return out


def summarize(run: Path, corpus: Path | None = None) -> dict:
    summary = _load(run / "summary.json") or {}
    corpus_block = corpus_entry(corpus, _load(run / "eval" / "asr.json"))
    if corpus_block:
        summary["corpus"] = corpus_block
    align = _load(run / "aligner_eval.json")
    if align:
        res = align["results"].get(HEADLINE_ALIGNMENT) or next(iter(align["results"].values()))
        summary["aligner"] = {
            "word_boundary_mae_ms": res.get("mae_ms"), "within_20ms": res.get("within_20ms"),
            "within_50ms": res.get("within_50ms"), "cer": res.get("cer"), "rtf": res.get("rtf_aligner"),
            "all": align["results"],
        }
    for stage in ("stage1", "mid", "stage2"):  # mid: the optional supervised mid-training (MID=1)
        values = _stage(_load(run / stage / "metrics.json"))
        if values:
            summary[stage] = values
    tokens = _load(run / "token_analysis.json")
    if tokens:  # tools/analyze_tokens.py: stage-1 accuracy by token class and by engine (valid split)
        pick = ("tokens", "share", "token_acc", "cosine")
        summary.setdefault("stage1", {})["by_class"] = {
            c: {k: v.get(k) for k in pick} for c, v in tokens["classes"].items()}
        summary["stage1"]["by_engine"] = {e: {k: v.get(k) for k in pick} for e, v in tokens["by_engine"].items()}
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
        if isinstance(node, dict) and "diff_ci95" in node:  # a paired comparison (speechlm.eval.paired): one line
            ci = node["diff_ci95"] or [float("nan")] * 2
            line = (f"{100 * node['diff']:+.1f} points [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}], "
                    f"n={node['n']}, McNemar p={node['p_mcnemar']:.3g}")
            rows.append((prefix, line))
        elif isinstance(node, dict):
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


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _diff(node: dict | None) -> str:
    if not node or node.get("diff") is None:
        return "-"
    ci = node.get("diff_ci95") or [float("nan")] * 2
    return f"{100 * node['diff']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def headline(summary: dict) -> str:
    """The few numbers a reader wants first, as a markdown table: StoryCloze S->T and Speech-MMLU 0-shot (speech,
    the Whisper cascade and text on the same items, speech minus text paired, with 95% intervals), zero-shot ASR,
    stage 1. Rows whose figures the summary lacks are left out; empty string when none is there."""
    rows: list[str] = []
    tasks = (("storycloze", "StoryCloze S->T", "s2t_acc", "s2t"),
             ("speech_mmlu", "Speech-MMLU 0-shot", "speech_acc_0shot", "speech_0shot"))
    for task, label, acc_key, cond in tasks:
        s = summary.get(task) or {}
        if s.get(acc_key) is None:
            continue
        cascade = (s.get(f"{cond}_vs_cascade") or {}).get("acc_b")
        vs_text = s.get(f"{cond}_vs_text") or {}
        text = s["text_acc"] if s.get("text_acc") is not None else vs_text.get("acc_b")
        rows.append(f"| {label} (n {s.get(f'{cond}_n', '?')}) | {_pct(s[acc_key])} | {_pct(cascade)} | "
                    f"{_pct(text)} | {_diff(vs_text)} |")
    floors = (("storycloze", "StoryCloze, endings alone (no context)", "endings_acc", "s2t_vs_endings"),
              ("speech_mmlu", "Speech-MMLU, options alone (no question)", "noquestion_acc", "speech_0shot_vs_noquestion"))
    for task, label, acc_key, gain_key in floors:  # the LLM without the spoken part; speech's gain over it
        s = summary.get(task) or {}
        if s.get(acc_key) is not None:
            rows.append(f"| {label}: speech's gain over it, points | {_diff(s.get(gain_key))} | - | "
                        f"{_pct(s[acc_key])} | - |")
    asr = summary.get("asr") or {}
    if asr.get("wer") is not None:
        whisper = (summary.get("corpus") or {}).get("whisper_wer_test")
        rows.append(f"| zero-shot ASR WER (n {asr.get('n', '?')}; lower is better) | {_pct(asr['wer'])} | "
                    f"{_pct(whisper)} (Whisper alone) | - | - |")
    s1 = summary.get("stage1") or {}
    if s1.get("valid_token_acc") is not None:
        rows.append(f"| stage 1: nearest-row token accuracy / cosine (valid) | {s1['valid_token_acc']:.3f} / "
                    f"{s1.get('valid_cosine', float('nan')):.3f} | - | - | - |")
    if not rows:
        return ""
    return "\n".join(["| task | speech (SSR) | Whisper cascade | text (LLM alone) | speech minus text, paired (points) |",
                      "|---|---|---|---|---|", *rows])
