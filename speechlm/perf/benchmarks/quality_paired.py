"""bench_quality across seeds: every connector against SSR of the same seed on the same items, and each connector's
accuracy over the seeds (speechlm.perf.benchmarks.quality trains and evaluates them; this reads its rows).

* :func:`paired_vs_ssr`: for each (connector, seed) other than ``ssr`` and each metric of :data:`METRICS`, the paired
  comparison (speechlm.eval.paired.compare) of its per-item outcomes with those of ``ssr`` of the same seed:
  difference ``connector - ssr`` in points with its 95% bootstrap interval, McNemar's exact p and
  ``inside_noise`` (the interval contains 0);
* :func:`over_seeds`: per connector and metric, the mean accuracy over the seeds and the seed-to-seed spread
  (sample standard deviation, None with one seed, and the range), and the mean of its paired differences;
* :func:`paired_table`, :func:`seeds_table`: both as markdown.

A row (``quality.collect``) names its ``connector`` and ``seed``, holds each metric's accuracy as ``{"acc": ...}``
(None when the reports lack it) and the per-item outcomes under ``items`` (``{metric: {item id: right?}}``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from speechlm.eval.paired import compare

#: (row key, label): the accuracies compared pairwise and over seeds
METRICS: tuple[tuple[str, str], ...] = (
    ("storycloze_adversarial", "StoryCloze S->T adv."),
    ("storycloze_random", "StoryCloze S->T random"),
    ("mmlu_0shot", "Speech-MMLU cloze 0-shot"),
    ("mmlu_5shot", "Speech-MMLU cloze 5-shot"),
)
REFERENCE = "ssr"


def paired_vs_ssr(rows: Sequence[dict], resamples: int = 10000) -> list[dict]:
    """Every (connector, seed) row other than ``ssr``'s against the ``ssr`` row of the same seed, per metric:
    ``{"connector", "seed", <metric>: PairedComparison JSON + inside_noise, or None}``. A metric is None when either
    row has no per-item outcomes for it or there is no ``ssr`` row of that seed (nothing is made up)."""
    ref = {r["seed"]: r for r in rows if r["connector"] == REFERENCE}
    out = []
    for r in rows:
        if r["connector"] == REFERENCE:
            continue
        entry: dict = {"connector": r["connector"], "seed": r["seed"], "vs": REFERENCE}
        base = ref.get(r["seed"])
        for key, _ in METRICS:
            mine = (r.get("items") or {}).get(key)
            theirs = (base.get("items") or {}).get(key) if base is not None else None
            if not mine or not theirs:
                entry[key] = None
                continue
            pair = compare(mine, theirs, resamples)
            # p to 3 significant digits (to_json rounds it to 4 decimals, which reads a small p as 0 or 1e-4)
            entry[key] = {**pair.to_json(), "p_mcnemar": float(f"{pair.p_mcnemar:.3g}"),
                          "inside_noise": not pair.significant}
        out.append(entry)
    return out


def _spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            "range": round(max(values) - min(values), 4), "seeds": len(values), "per_seed": values}


def over_seeds(rows: Sequence[dict], paired: Sequence[dict]) -> list[dict]:
    """Per connector (in the rows' order): each metric's accuracy over its seeds (``mean``, ``sd``, ``range``,
    ``per_seed``; None when no seed has it) and ``minus_ssr``: its paired differences over the seeds (``mean``,
    ``per_seed``, ``outside_noise``: how many of them exclude 0)."""
    names = list(dict.fromkeys(r["connector"] for r in rows))
    out = []
    for n in names:
        mine = sorted((r for r in rows if r["connector"] == n), key=lambda r: r["seed"])
        entry: dict = {"connector": n, "label": mine[0]["label"], "seeds": [r["seed"] for r in mine]}
        for key, _ in METRICS:
            accs = [r[key]["acc"] for r in mine if r.get(key) and r[key].get("acc") is not None]
            entry[key] = _spread(accs) if accs else None
        if n != REFERENCE:
            diffs = {}
            for key, _ in METRICS:
                got = [p[key] for p in paired if p["connector"] == n and p[key] is not None]
                diffs[key] = None if not got else {
                    "mean": round(statistics.fmean(g["diff"] for g in got), 4), "per_seed": [g["diff"] for g in got],
                    "outside_noise": sum(g["significant"] for g in got), "seeds": len(got)}
            entry["minus_ssr"] = diffs
        out.append(entry)
    return out


def _pair_cell(p: dict | None) -> str:
    if p is None:
        return "-"
    ci = p["diff_ci95"]
    ci_s = f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "[n/a]"
    return (f"{100 * p['diff']:+.1f} {ci_s} p={p['p_mcnemar']:.2g}, n={p['n']}"
            + (" (inside the noise)" if p["inside_noise"] else ""))


def paired_table(paired: Sequence[dict], labels: dict[str, str]) -> str:
    """One line per (connector, seed): its accuracy minus SSR's (same seed, same items) in points, 95% interval,
    McNemar p, item count."""
    head = ("| connector | seed | " + " | ".join(f"{t} minus SSR, points [95% CI]" for _, t in METRICS) + " |")
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for p in paired:
        lines.append(f"| {labels.get(p['connector'], p['connector'])} | {p['seed']} | "
                     + " | ".join(_pair_cell(p[k]) for k, _ in METRICS) + " |")
    return "\n".join(lines)


def _seed_cell(s: dict | None, diff: dict | None) -> str:
    if s is None:
        return "-"
    text = f"{100 * s['mean']:.1f}" + (f" ± {100 * s['sd']:.1f}" if s["sd"] is not None else "")
    if diff is not None:
        text += f" ({100 * diff['mean']:+.1f} vs SSR, {diff['outside_noise']}/{diff['seeds']} outside the noise)"
    return text


def seeds_table(summary: Sequence[dict]) -> str:
    """One line per connector: each metric's mean accuracy over the seeds ± their standard deviation, and the mean
    paired difference from SSR with how many seeds' intervals exclude 0."""
    head = "| connector | seeds | " + " | ".join(f"{t} % mean ± sd" for _, t in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for s in summary:
        diffs = s.get("minus_ssr") or {}
        lines.append(f"| {s['label']} | {','.join(map(str, s['seeds']))} | "
                     + " | ".join(_seed_cell(s[k], diffs.get(k)) for k, _ in METRICS) + " |")
    return "\n".join(lines)
