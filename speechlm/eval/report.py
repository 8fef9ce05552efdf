"""Evaluation reports: accuracy with item counts and a 95% Wilson interval, parity speech/text, JSON + markdown,
and per-TTS-engine breakdowns (``by_engine``).

The evaluation audio is rendered with several voices, possibly of several TTS engines (voice strings
``"engine:name"``, e.g. ``"piper:en_US-joe-medium"``, ``"festival:ked_diphone"``; a bare name such as
``"en-gb-scotland+f4"`` is an eSpeak voice), or read from a manifest whose ``speaker`` is the voice
plus rate and pitch (``"festival:ked_diphone/r175/p50"``). :func:`engine_of` (``speechlm.data.tts``) names
the engine of either, and every quality figure is also reported per engine, with its item count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

from speechlm.atomic import atomic_write_text
from speechlm.eval.paired import PairedComparison, compare

Z95 = 1.959963984540054  # two-sided 95% normal quantile
#: The ``connector`` of a row of the LLM alone (text conditions) and of the Whisper cascade.
LLM_ALONE = "llm"
CASCADE = "cascade-whisper"


def group_by_engine(engines: Sequence[str], values: Sequence) -> dict[str, list]:
    """``{engine: [values of that engine's items]}`` (item order kept, engines sorted)."""
    if len(engines) != len(values):
        raise ValueError(f"one engine per item: {len(engines)} engines for {len(values)} items")
    out: dict[str, list] = {}
    for e, v in zip(engines, values):
        out.setdefault(e, []).append(v)
    return dict(sorted(out.items()))


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; ``(0, 1)`` when ``total`` is 0."""
    if total < 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total, got {correct}/{total}")
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    z2 = z * z
    denom = 1 + z2 / total
    center = (p + z2 / (2 * total)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    @classmethod
    def of(cls, outcomes: Sequence[bool]) -> Accuracy:
        return cls(sum(bool(x) for x in outcomes), len(outcomes))

    def __add__(self, other: Accuracy) -> Accuracy:
        return Accuracy(self.correct + other.correct, self.total + other.total)

    def to_json(self) -> dict:
        lo, hi = self.ci95
        return {"acc": round(self.value, 4) if self.total else None, "correct": self.correct, "n": self.total,
                "ci95": [round(lo, 4), round(hi, 4)]}

    def fmt(self) -> str:
        if not self.total:
            return "n/a"
        lo, hi = self.ci95
        return f"{100 * self.value:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def parity(speech: Accuracy, text: Accuracy) -> float | None:
    """speech accuracy / text accuracy (None when either is undefined or text is 0)."""
    if not speech.total or not text.total or text.correct == 0:
        return None
    return speech.value / text.value


@dataclass
class ResultRow:
    """One figure of a run: a task and condition for one connector, boundary mode and scoring."""

    task: str  # e.g. "storycloze/adversarial", "speech_mmlu/all", "speech_mmlu/geography"
    condition: str  # "text", "s2t", "s", "speech_0shot", "cascade", ...
    connector: str  # connector name or folder; "llm" for the LLM alone
    boundaries: str  # "free", "forced", "none" (baselines / text)
    scoring: str  # "summed", "length_norm", "letter", "cloze"
    accuracy: Accuracy
    text: Accuracy | None = None  # the matching text-only accuracy, for the parity ratio
    # Per-item outcomes {item id: right?} of this row and of its text reference (same items): what paired
    # comparisons need (speech against text here; one run against another in speechlm.eval.paired).
    items: dict[str, bool] | None = None
    text_items: dict[str, bool] | None = None

    @cached_property
    def paired(self) -> PairedComparison | None:
        """This row against its text reference on the same items (None without per-item outcomes); computed once
        (the JSON, the markdown table and the summary all show it)."""
        if not self.items or not self.text_items:
            return None
        return compare(self.items, self.text_items)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("accuracy", "text", "items", "text_items")}
        d["accuracy"] = self.accuracy.to_json()
        d["text_accuracy"] = self.text.to_json() if self.text is not None else None
        ratio = parity(self.accuracy, self.text) if self.text is not None else None
        d["parity"] = round(ratio, 4) if ratio is not None else None
        pair = self.paired
        d["paired_vs_text"] = pair.to_json() if pair is not None else None
        d["items"] = {k: int(v) for k, v in self.items.items()} if self.items else None
        return d


def markdown_table(rows: Sequence[ResultRow]) -> str:
    """Accuracy in % with 95% Wilson intervals; parity = speech / text."""
    head = ("| task | condition | connector | boundaries | scoring | n | accuracy % [95% CI] | text % [95% CI] "
            "| parity | minus text, paired [95% CI] |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        ratio = parity(r.accuracy, r.text) if r.text is not None else None
        pair = r.paired
        gap = "-"
        if pair is not None and pair.diff_ci95 is not None:
            lo, hi = pair.diff_ci95
            gap = f"{100 * pair.diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        lines.append(f"| {r.task} | {r.condition} | {r.connector} | {r.boundaries} | {r.scoring} | {r.accuracy.total} "
                     f"| {r.accuracy.fmt()} | {r.text.fmt() if r.text is not None else '-'} "
                     f"| {f'{ratio:.3f}' if ratio is not None else '-'} | {gap} |")
    return head + "\n".join(lines) + "\n"


def engine_rows(row: ResultRow, outcomes: Sequence[bool], engines: Sequence[str],
                text_outcomes: Sequence[bool] | None = None) -> dict[str, ResultRow]:
    """``row`` split by engine: ``{engine: a copy of row over that engine's items}``.

    ``outcomes[i]`` (right or wrong) and ``engines[i]`` belong to item i; ``text_outcomes`` (the text
    condition on the same items, same order) gives each engine's own text accuracy and parity.
    """
    acc = group_by_engine(engines, list(outcomes))
    text = group_by_engine(engines, list(text_outcomes)) if text_outcomes is not None else None
    return {e: replace(row, accuracy=Accuracy.of(v), text=Accuracy.of(text[e]) if text is not None else None)
            for e, v in acc.items()}


def add_engine_rows(by_engine: dict[str, list[ResultRow]], split: Mapping[str, ResultRow]) -> None:
    """Append the rows of :func:`engine_rows` to ``{engine: rows}``."""
    for e, r in split.items():
        by_engine.setdefault(e, []).append(r)


def engine_table(by_engine: Mapping[str, Sequence[ResultRow]]) -> str:
    """:func:`markdown_table` with an engine column in front, engines in sorted order."""
    lines = []
    for e in sorted(by_engine):
        lines += [f"| {e} " + line for line in markdown_table(by_engine[e]).splitlines()[2:]]
    head = markdown_table([]).splitlines()
    return "\n".join(["| engine " + head[0], "|---" + head[1]] + lines) + "\n"


def write_report(rows: Sequence[ResultRow], out_dir: str | Path, name: str, meta: dict | None = None,
                 by_engine: Mapping[str, Sequence[ResultRow]] | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md`` atomically; returns both paths.

    ``by_engine`` (``{engine: rows over that engine's items}``) goes into the JSON under ``by_engine``
    (each row with its own item count ``accuracy.n``) and into a second markdown table.
    """
    out = Path(out_dir)
    js, md = out / f"{name}.json", out / f"{name}.md"
    data: dict = {"meta": meta or {}, "results": [r.to_json() for r in rows]}
    if by_engine:
        data["by_engine"] = {e: [r.to_json() for r in by_engine[e]] for e in sorted(by_engine)}
    atomic_write_text(js, json.dumps(data, indent=2) + "\n")
    title = f"# {name}\n\n" + "".join(f"- {k}: {v}\n" for k, v in (meta or {}).items()) + "\n"
    text = title + markdown_table(rows)
    if by_engine:
        text += "\n## By TTS engine\n\n" + engine_table(by_engine)
    atomic_write_text(md, text)
    return js, md


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def merge_summary(path: str | Path, key: str, values: dict) -> None:
    """Merge ``{key: values}`` into a run's JSON summary (e.g. ``runs/tiny/summary.json``), atomically.

    The keys of ``values`` replace those already under ``key`` (a nested value such as ``by_engine``
    is replaced whole, never mixed with an older run's); other keys stay. Floats are rounded to 4 places.
    """
    p = Path(path)
    data = json.loads(p.read_text()) if p.is_file() else {}
    data[key] = {**data.get(key, {}), **_rounded(dict(values))}
    atomic_write_text(p, json.dumps(data, indent=2) + "\n")


def headline_entry(row: ResultRow, prefix: str, acc_key: str = "") -> dict:
    """Summary figures of one headline row: ``<prefix>_acc``, ``<prefix>_n``, ``<prefix>_ci95`` (Wilson) and, when
    the row has per-item outcomes for itself and its text reference, ``<prefix>_vs_text``: the paired difference
    from the text condition with its bootstrap interval and McNemar p (:class:`~speechlm.eval.paired.PairedComparison`).
    ``acc_key`` names the accuracy otherwise (a summary key older than this scheme, e.g. ``speech_acc_0shot``)."""
    out: dict = {acc_key or f"{prefix}_acc": row.accuracy.value, f"{prefix}_n": row.accuracy.total,
                 f"{prefix}_ci95": list(row.accuracy.ci95)}
    pair = row.paired
    if pair is not None:
        out[f"{prefix}_vs_text"] = pair.to_json()
    return out


def engine_summary(by_engine: Mapping[str, Sequence[ResultRow]], text_condition: str, connector: str | None,
                   key: Callable[[ResultRow, bool], str], keep: Callable[[ResultRow], bool] = lambda r: True) -> dict:
    """The summary's per-engine block: ``{engine: {n, text_acc, <key(row, False)>, <key(row, True)>}}``.

    Of the rows ``keep`` accepts: the LLM alone in ``text_condition`` gives ``n`` and ``text_acc``; a row of
    ``connector`` gives ``key(row, False)``, a cascade row ``key(row, True)`` (each task names its figures,
    e.g. ``s2t_acc`` / ``cascade_s2t_acc``). Engines without any such row are left out.
    """
    out: dict[str, dict] = {}
    for e, rows in sorted(by_engine.items()):
        entry: dict[str, float | int | None] = {}
        for r in rows:
            if not keep(r):
                continue
            if r.connector == LLM_ALONE and r.condition == text_condition:
                entry["n"], entry["text_acc"] = r.accuracy.total, r.accuracy.value
            elif r.connector == connector:
                entry[key(r, False)] = r.accuracy.value
            elif r.connector == CASCADE:
                entry[key(r, True)] = r.accuracy.value
        if entry:
            out[e] = entry
    return out


def publish(rows: Sequence[ResultRow], by_engine: Mapping[str, Sequence[ResultRow]], meta: dict, summary: dict,
            out_dir: str | Path, name: str, summary_file: str = "") -> dict:
    """Write the report (:func:`write_report`), print its markdown, merge ``summary`` into ``summary_file``
    under ``name`` (when given); returns what an evaluation recipe returns: rows, summary, the report's
    paths and the per-engine rows."""
    js, md = write_report(rows, out_dir, name, meta, by_engine)
    print(md.read_text())
    if summary_file:
        merge_summary(summary_file, name, summary)
    return {"rows": [r.to_json() for r in rows], "summary": summary, "json": str(js), "markdown": str(md),
            "by_engine": {e: [r.to_json() for r in v] for e, v in sorted(by_engine.items())}}
