"""A scaling curve: how the method's figures move with hours of training speech (the command line:
tools/scaling_curve.py; the runs: recipes/run_scaling.sh).

Each point is one run's ``summary.json`` (``tools/summarize_run.py``) with its train hours (``corpus.hours.train``).
The figures, each with its 95% interval where the run has one:

* ``token_acc`` / ``cosine``: stage 1 on the valid split (the run's own voices, unseen sentences);
* ``storycloze_parity`` / ``mmlu_parity``: speech accuracy over text accuracy on the same items (StoryCloze S->T,
  Speech-MMLU 0-shot), the interval from the paired bootstrap of that ratio (``speechlm.eval.paired``);
* ``asr_wer``: zero-shot ASR word error rate on the test split;
* ``storycloze_context`` / ``mmlu_question``: the share of what the written context (the question) adds over none
  that the spoken one adds: (speech - floor) / (text - floor) on the same items, the floor being the LLM on the
  endings alone (the options alone). A parity can look high when the floor is (StoryCloze's endings alone get most
  of the text's accuracy); the share starts at 0 for a connector that carries nothing. Its interval is the paired
  interval of speech minus floor over the (fixed) text gain. Read from the run's summary when it holds the floor
  (``endings_acc`` / ``noquestion_acc`` and the paired gain), else from its evaluation reports and a floors
  report (``floors``: a folder with ``storycloze.json`` / ``speech_mmlu.json`` of a text-only evaluation of the
  same items).

Every figure is fitted by least squares as a straight line in log10(hours) (the usual shape of a learning curve
over a few decades of data); the fit says how many hours it predicts for a target (parity 1.0, or the figure
the caller gives) and the fewest hours of a run that met it, or why it predicts none (fewer than two points; a
trend away from the target). A prediction
far beyond the hours measured is an extrapolation and is marked as such (more than 10x the largest run).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechlm.errors import SpeechLMError

#: figure -> (label, higher is better, default target)
FIGURES: dict[str, tuple[str, bool, float]] = {
    "token_acc": ("stage-1 token accuracy (valid)", True, 0.60),
    "cosine": ("stage-1 cosine (valid)", True, 0.80),
    "storycloze_parity": ("StoryCloze S->T / text", True, 1.0),
    "mmlu_parity": ("Speech-MMLU 0-shot / text", True, 1.0),
    "asr_wer": ("zero-shot ASR WER", False, 0.5),
    "storycloze_context": ("StoryCloze: share of the context's gain", True, 1.0),
    "mmlu_question": ("Speech-MMLU: share of the question's gain", True, 1.0),
}
#: share figure -> (summary key and report stem, its floor's and its gain's summary keys; in the reports: task,
#: speech condition, floor condition, text condition, scoring)
SHARES: dict[str, tuple[str, str, str, str, str, str, str, str]] = {
    "storycloze_context": ("storycloze", "endings_acc", "s2t_vs_endings",
                           "storycloze/adversarial", "s2t", "endings", "text", "summed"),
    "mmlu_question": ("speech_mmlu", "noquestion_acc", "speech_0shot_vs_noquestion",
                      "speech_mmlu/all", "speech_0shot", "noquestion_0shot", "text_0shot", "cloze"),
}
EXTRAPOLATION = 10.0  # a predicted hours figure beyond this many times the largest run is marked


@dataclass
class Point:
    run: str
    hours: float
    values: dict[str, float] = field(default_factory=dict)
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class Fit:
    figure: str
    n: int
    slope: float | None = None       # per decade of hours
    intercept: float | None = None   # at 1 hour
    target: float | None = None
    hours_for_target: float | None = None  # where the fitted line crosses the target
    reached_at: float | None = None        # the fewest hours of a run that met the target
    note: str = ""

    def predict(self, hours: float) -> float | None:
        if self.slope is None or self.intercept is None:
            return None
        return self.intercept + self.slope * math.log10(hours)


def _ratio(node: dict | None) -> tuple[float | None, tuple[float, float] | None]:
    if not node or node.get("ratio") is None:
        return None, None
    ci = node.get("ratio_ci95")
    return float(node["ratio"]), (float(ci[0]), float(ci[1])) if ci else None


def point_from_summary(summary: dict, run: str) -> Point:
    """The figures of one run's summary; refuses (SpeechLMError) a summary without train hours."""
    hours = ((summary.get("corpus") or {}).get("hours") or {}).get("train")
    if not hours or hours <= 0:
        raise SpeechLMError(f"{run}: the summary has no corpus.hours.train (run tools/summarize_run.py with "
                            "--corpus)")
    p = Point(run=run, hours=float(hours))
    s1 = summary.get("stage1") or {}
    for key, name in (("valid_token_acc", "token_acc"), ("valid_cosine", "cosine")):
        if s1.get(key) is not None:
            p.values[name] = float(s1[key])
    for task, node, name in (("storycloze", "s2t_vs_text", "storycloze_parity"),
                             ("speech_mmlu", "speech_0shot_vs_text", "mmlu_parity")):
        ratio, ci = _ratio((summary.get(task) or {}).get(node))
        if ratio is not None:
            p.values[name] = ratio
            if ci:
                p.ci95[name] = ci
    asr = summary.get("asr") or {}
    if asr.get("wer") is not None:
        p.values["asr_wer"] = float(asr["wer"])
    return p


def _share(p: Point, name: str, gain: float | None, ci: list[float] | None, text_gain: float) -> None:
    if gain is None or text_gain <= 0:
        return
    p.values[name] = gain / text_gain
    if ci:
        p.ci95[name] = (ci[0] / text_gain, ci[1] / text_gain)


def shares_from_summary(p: Point, summary: dict) -> None:
    """The share figures of a summary that holds the floors (evaluations since the floors were added)."""
    for name, (key, floor_key, gain_key, *_) in SHARES.items():
        s = summary.get(key) or {}
        floor_acc, text_acc = s.get(floor_key), s.get("text_acc")
        node = s.get(gain_key) or {}
        if floor_acc is not None and text_acc is not None and node.get("diff") is not None:
            _share(p, name, float(node["diff"]), node.get("diff_ci95"), float(text_acc) - float(floor_acc))


def _report_row(rows: list[dict], task: str, cond: str, scoring: str, connector: bool) -> dict | None:
    from speechlm.eval.report import CASCADE, LLM_ALONE

    for r in rows:
        if (r["task"], r["condition"], r["scoring"]) == (task, cond, scoring) and r.get("items") is not None and \
                (r["connector"] not in (LLM_ALONE, CASCADE)) == connector:
            return r
    return None


def shares_from_reports(p: Point, eval_dir: Path, floors: Path) -> None:
    """The share figures from the run's evaluation reports (its first connector) and a floors report."""
    from speechlm.eval.paired import compare

    for name, (stem, _, _, task, cond, floor, text, scoring) in SHARES.items():
        if name in p.values or not (eval_dir / f"{stem}.json").is_file() or not (floors / f"{stem}.json").is_file():
            continue
        run_rows = json.loads((eval_dir / f"{stem}.json").read_text(encoding="utf-8"))["results"]
        floor_rows = json.loads((floors / f"{stem}.json").read_text(encoding="utf-8"))["results"]
        speech = _report_row(run_rows, task, cond, scoring, connector=True)
        alone = _report_row(floor_rows, task, floor, scoring, connector=False)
        written = _report_row(floor_rows, task, text, scoring, connector=False)
        if speech is None or alone is None or written is None:
            continue
        pair = compare({k: bool(v) for k, v in speech["items"].items()}, {k: bool(v) for k, v in alone["items"].items()})
        acc = lambda r: r["accuracy"]["correct"] / r["accuracy"]["n"]
        _share(p, name, pair.diff, list(pair.diff_ci95), acc(written) - acc(alone))


def recorded_points(path: str | Path) -> list[Point]:
    """The points of an earlier curve's report (:func:`report`, the JSON ``tools/scaling_curve.py --out`` writes):
    amounts measured before, whose run folders are gone, join a curve as they were measured. A file that is not
    such a report is named."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["points"]
        return [Point(run=str(r["run"]), hours=float(r["hours"]),
                      values={k: float(v) for k, v in r.get("values", {}).items() if k in FIGURES},
                      ci95={k: (float(v[0]), float(v[1])) for k, v in r.get("ci95", {}).items() if k in FIGURES})
                for r in rows]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise SpeechLMError(f"{path}: not a scaling report with points ({type(e).__name__}: {e})") from e


def load_points(runs: list[str | Path], floors: str | Path | None = None,
                recorded: str | Path | None = None) -> list[Point]:
    """One point per run folder (its summary.json), sorted by hours; a missing or unreadable summary is named.
    ``floors``: a text-only evaluation's folder for the share figures of runs whose summaries lack the floors.
    ``recorded``: an earlier report (:func:`recorded_points`) whose points join these; a run given in ``runs``
    replaces the recorded point of the same name (it was measured again)."""
    points = []
    for run in runs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise SpeechLMError(f"{run}: no summary.json (the run has not finished, or tools/summarize_run.py "
                                "was not run)")
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SpeechLMError(f"{path}: not JSON ({e})") from e
        point = point_from_summary(summary, str(run))
        shares_from_summary(point, summary)
        if floors:
            shares_from_reports(point, Path(run) / "eval", Path(floors))
        points.append(point)
    if recorded:
        given = {str(Path(p.run)) for p in points}
        points += [p for p in recorded_points(recorded) if str(Path(p.run)) not in given]
    return sorted(points, key=lambda p: p.hours)


def fit(points: list[Point], figure: str, target: float | None = None) -> Fit:
    """Least squares of ``figure`` on log10(hours) over the points that have it; hours predicted for ``target``
    (default: the figure's own, :data:`FIGURES`)."""
    _, higher, default = FIGURES[figure]
    target = default if target is None else target
    xs = [math.log10(p.hours) for p in points if figure in p.values]
    ys = [p.values[figure] for p in points if figure in p.values]
    out = Fit(figure, len(xs), target=target)
    if len(set(xs)) < 2:
        out.note = "fewer than two amounts of data: no trend"
        return out
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    out.slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    out.intercept = my - out.slope * mx
    if len(xs) == 2:
        out.note = "two points: the line passes through both"
    reached = [p.hours for p in points if figure in p.values and
               (p.values[figure] >= target if higher else p.values[figure] <= target)]
    if reached:
        out.reached_at = min(reached)
        out.note = (out.note + "; " if out.note else "") + f"a run reached the target at {out.reached_at:.3g} h"
    if out.slope == 0 or (out.slope > 0) != higher:
        out.note = (out.note + "; " if out.note else "") + "the trend moves away from the target: no prediction"
        return out
    out.hours_for_target = 10 ** ((target - out.intercept) / out.slope)
    if out.hours_for_target > EXTRAPOLATION * max(p.hours for p in points) * (1 + 1e-9):
        out.note = (out.note + "; " if out.note else "") + (
            f"an extrapolation beyond {EXTRAPOLATION:g}x the largest run")
    return out


def fits(points: list[Point], targets: dict[str, float] | None = None) -> dict[str, Fit]:
    targets = targets or {}
    return {f: fit(points, f, targets.get(f)) for f in FIGURES if any(f in p.values for p in points)}


def report(points: list[Point], fitted: dict[str, Fit]) -> dict[str, Any]:
    return {"points": [{"run": p.run, "hours": p.hours, "values": p.values,
                        "ci95": {k: list(v) for k, v in p.ci95.items()}} for p in points],
            "fits": {k: {"n": f.n, "slope_per_decade": f.slope, "value_at_1h": f.intercept, "target": f.target,
                         "hours_for_target": f.hours_for_target, "reached_at": f.reached_at,
                         "note": f.note} for k, f in fitted.items()}}


def hours_text(hours: float) -> str:
    """Hours as people read them: 640 h, 168,762 h; beyond a million in powers of ten (4.1e+17 h)."""
    return f"{hours:,.0f} h" if hours < 1e6 else f"{hours:.1e} h"


def markdown(points: list[Point], fitted: dict[str, Fit]) -> str:
    """A table of the figures per run, then one line per fit."""
    figs = list(fitted)
    head = "| train hours | run | " + " | ".join(FIGURES[f][0] for f in figs) + " |"
    lines = [head, "|" + "---|" * (len(figs) + 2)]
    for p in points:
        cells = []
        for f in figs:
            v = p.values.get(f)
            ci = p.ci95.get(f)
            cells.append("-" if v is None else f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        lines.append(f"| {p.hours:.1f} | `{p.run}` | " + " | ".join(cells) + " |")
    lines.append("")
    for f, ft in fitted.items():
        if ft.slope is None:
            lines.append(f"- {FIGURES[f][0]}: {ft.note}")
            continue
        pred = "no prediction" if ft.hours_for_target is None else hours_text(ft.hours_for_target)
        lines.append(f"- {FIGURES[f][0]}: {ft.slope:+.3f} per tenfold hours; target {ft.target:g} -> {pred}"
                     + (f" ({ft.note})" if ft.note else ""))
    return "\n".join(lines)


def plot(points: list[Point], fitted: dict[str, Fit], out: str | Path) -> Path:
    """One panel per figure: the runs (with their intervals), the fitted line, the target and its predicted hours;
    written atomically as a PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from speechlm.atomic import atomic_path

    figs = list(fitted)
    cols = min(4, len(figs))  # at most four panels a row
    rows = math.ceil(len(figs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(figs):]:
        ax.set_visible(False)
    hours = [p.hours for p in points]
    for ax, f in zip(axes.flat, figs):
        label, _, _ = FIGURES[f]
        xs = [p.hours for p in points if f in p.values]
        ys = [p.values[f] for p in points if f in p.values]
        err = [[y - p.ci95[f][0] if f in p.ci95 else 0 for p, y in zip([q for q in points if f in q.values], ys)],
               [p.ci95[f][1] - y if f in p.ci95 else 0 for p, y in zip([q for q in points if f in q.values], ys)]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, color="C0", label="runs")
        ft = fitted[f]
        # the axis runs to 3x the largest run, or to the predicted hours when they are within 1000x of it
        hi = max(hours) * 3
        pred = ft.hours_for_target
        on_chart = pred is not None and pred <= max(hours) * 1000
        if on_chart and pred * 1.5 > hi:
            hi = pred * 1.5
        if ft.slope is not None:
            grid = [min(hours) * (hi / min(hours)) ** (i / 50) for i in range(51)]
            ax.plot(grid, [ft.predict(h) for h in grid], "--", color="C1", label="fit (log hours)")
        if ft.target is not None:
            ax.axhline(ft.target, color="grey", lw=0.8)
            if on_chart:
                ax.axvline(pred, color="C2", lw=0.8)
                ax.annotate(hours_text(pred), (pred, ft.target), fontsize=8, textcoords="offset points",
                            xytext=(4, 4), color="C2")
            elif pred is not None:
                ax.text(0.98, 0.03, f"target at {hours_text(pred)}\n(off the chart)", transform=ax.transAxes,
                        fontsize=7, ha="right", va="bottom", color="C2")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("train hours of speech")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
