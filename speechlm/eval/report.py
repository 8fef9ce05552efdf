"""Evaluation reports: accuracy with item counts and a 95% Wilson interval, parity speech/text, JSON + markdown."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from speechlm.atomic import atomic_write_text

Z95 = 1.959963984540054  # two-sided 95% normal quantile


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

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("accuracy", "text")}
        d["accuracy"] = self.accuracy.to_json()
        d["text_accuracy"] = self.text.to_json() if self.text is not None else None
        ratio = parity(self.accuracy, self.text) if self.text is not None else None
        d["parity"] = round(ratio, 4) if ratio is not None else None
        return d


def markdown_table(rows: Sequence[ResultRow]) -> str:
    """Accuracy in % with 95% Wilson intervals; parity = speech / text."""
    head = ("| task | condition | connector | boundaries | scoring | n | accuracy % [95% CI] | text % [95% CI] "
            "| parity |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        ratio = parity(r.accuracy, r.text) if r.text is not None else None
        lines.append(f"| {r.task} | {r.condition} | {r.connector} | {r.boundaries} | {r.scoring} | {r.accuracy.total} "
                     f"| {r.accuracy.fmt()} | {r.text.fmt() if r.text is not None else '-'} "
                     f"| {f'{ratio:.3f}' if ratio is not None else '-'} |")
    return head + "\n".join(lines) + "\n"


def write_report(rows: Sequence[ResultRow], out_dir: str | Path, name: str, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md`` atomically; returns both paths."""
    out = Path(out_dir)
    js, md = out / f"{name}.json", out / f"{name}.md"
    atomic_write_text(js, json.dumps({"meta": meta or {}, "results": [r.to_json() for r in rows]}, indent=2) + "\n")
    title = f"# {name}\n\n" + "".join(f"- {k}: {v}\n" for k, v in (meta or {}).items()) + "\n"
    atomic_write_text(md, title + markdown_table(rows))
    return js, md


def merge_summary(path: str | Path, key: str, values: dict) -> None:
    """Merge ``{key: values}`` into a run's JSON summary (e.g. ``runs/tiny/summary.json``), atomically."""
    p = Path(path)
    data = json.loads(p.read_text()) if p.is_file() else {}
    rounded = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}
    data[key] = {**data.get(key, {}), **rounded}
    atomic_write_text(p, json.dumps(data, indent=2) + "\n")
