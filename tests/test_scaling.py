"""The scaling curve (speechlm/eval/scaling.py, tools/scaling_curve.py): points from run summaries, the fit in
log hours and the hours it predicts, the table and the PNG."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speechlm.errors import SpeechLMError
from speechlm.eval.scaling import (
    fit,
    fits,
    hours_text,
    load_points,
    markdown,
    point_from_summary,
    recorded_points,
)

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "scaling_curve.py"), *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=False)


def _summary(hours: float, acc: float, parity: float, wer: float) -> dict:
    return {"corpus": {"hours": {"train": hours, "valid": 0.1}},
            "stage1": {"valid_token_acc": acc, "valid_cosine": 0.5 + acc / 4},
            "storycloze": {"s2t_vs_text": {"ratio": parity, "ratio_ci95": [parity - 0.1, parity + 0.1]}},
            "asr": {"wer": wer}}


def _runs(tmp_path, rows) -> list[str]:
    out = []
    for hours, acc, parity, wer in rows:
        run = tmp_path / f"run-{hours}h"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(_summary(hours, acc, parity, wer)))
        out.append(str(run))
    return out


def test_points_fit_and_predicted_hours(tmp_path):
    # token accuracy 0.40 + 0.10 per tenfold hours: 2 h -> 0.430, 20 h -> 0.530, 200 h -> 0.630
    acc = lambda h: 0.40 + 0.10 * math.log10(h)
    runs = _runs(tmp_path, [(20, acc(20), 0.8, 0.9), (2, acc(2), 0.7, 0.95), (200, acc(200), 0.9, 0.6)])
    points = load_points(runs)
    assert [p.hours for p in points] == [2, 20, 200]  # sorted by hours
    assert points[0].ci95["storycloze_parity"] == pytest.approx((0.6, 0.8))
    f = fit(points, "token_acc")
    assert f.slope == pytest.approx(0.10) and f.intercept == pytest.approx(0.40)
    assert f.hours_for_target == pytest.approx(10 ** 2, rel=1e-6)  # 0.60 = 0.40 + 0.10 * 2 -> 100 h
    assert f.reached_at == 200 and "reached the target at 200 h" in f.note
    # parity: +0.1 per decade from 0.7 at 2 h -> 1.0 at 2,000 h (10x the largest run: an extrapolation)
    p = fit(points, "storycloze_parity")
    assert p.hours_for_target == pytest.approx(2000, rel=1e-6) and "extrapolation" not in p.note
    assert "extrapolation beyond 10x" in fit(points, "storycloze_parity", target=1.1).note  # 20,000 h
    p9 = fit(points, "storycloze_parity", target=0.9)
    assert p9.hours_for_target == pytest.approx(200) and p9.reached_at == 200
    w = fit(points, "asr_wer")  # lower is better: 0.5 beyond the 200 h run
    assert w.slope < 0 and w.hours_for_target > 200
    table = markdown(points, fits(points))
    assert "| 2.0 |" in table and "100 h" in table and "0.700 [0.60, 0.80]" in table
    assert "mmlu" not in table.lower()  # no run has it: no column
    assert hours_text(168762.4) == "168,762 h" and hours_text(4.1e17) == "4.1e+17 h"  # a nearly flat line's hours


def test_no_prediction_without_a_trend_towards_the_target(tmp_path):
    points = load_points(_runs(tmp_path, [(2, 0.5, 0.8, 0.9), (5, 0.4, 0.7, 0.95)]))
    f = fit(points, "token_acc")
    assert f.hours_for_target is None and "away from the target" in f.note and "two points" in f.note
    one = load_points([points[0].run])
    assert fit(one, "token_acc").slope is None and "no trend" in fit(one, "token_acc").note


def test_bad_runs_are_named(tmp_path):
    with pytest.raises(SpeechLMError, match="no summary.json"):
        load_points([str(tmp_path)])
    with pytest.raises(SpeechLMError, match="corpus.hours.train"):
        point_from_summary({"stage1": {"valid_token_acc": 0.4}}, "runs/x")
    (tmp_path / "summary.json").write_text("{oops")
    with pytest.raises(SpeechLMError, match="not JSON"):
        load_points([str(tmp_path)])


def test_command_line_writes_the_png_and_the_json(tmp_path):
    runs = _runs(tmp_path, [(2, 0.43, 0.7, 0.95), (5, 0.47, 0.75, 0.9), (12.5, 0.51, 0.8, 0.8)])
    png, out = tmp_path / "curve.png", tmp_path / "curve.json"
    proc = _cli("--runs", *runs, "--png", str(png), "--out", str(out), "--target", "storycloze_parity=0.9")
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.read_text())
    assert [p["hours"] for p in data["points"]] == [2, 5, 12.5]
    assert data["fits"]["storycloze_parity"]["target"] == 0.9 and data["fits"]["token_acc"]["slope_per_decade"] > 0
    assert "StoryCloze S->T / text" in proc.stdout
    missing = _cli("--runs", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no summary.json" in missing.stderr
    assert _cli("--runs", *runs, "--target", "nonsense=1").returncode == 2


def test_points_recorded_in_an_earlier_report_join_the_runs(tmp_path):
    """Amounts measured before (their run folders gone) come back from the report the curve wrote; a run measured
    again replaces its recorded point."""
    runs = _runs(tmp_path, [(2, 0.43, 0.7, 0.95), (20, 0.53, 0.8, 0.9)])
    report = tmp_path / "curve.json"
    assert _cli("--runs", *runs, "--out", str(report)).returncode == 0
    back = recorded_points(report)
    assert [(p.run, p.hours) for p in back] == [(runs[0], 2), (runs[1], 20)]
    assert back[0].values["token_acc"] == 0.43 and back[0].ci95["storycloze_parity"] == pytest.approx((0.6, 0.8))
    (tmp_path / "run-200h").mkdir()
    (tmp_path / "run-200h" / "summary.json").write_text(json.dumps(_summary(200, 0.63, 0.9, 0.6)))
    (tmp_path / "run-20h" / "summary.json").write_text(json.dumps(_summary(20, 0.55, 0.8, 0.9)))  # measured again
    points = load_points([str(tmp_path / "run-200h"), runs[1]], recorded=report)
    assert [(p.hours, p.values["token_acc"]) for p in points] == [(2, 0.43), (20, 0.55), (200, 0.63)]
    # the command line with the report alone redraws the curve; the report may be its own --out
    proc = _cli("--recorded", str(report), "--runs", str(tmp_path / "run-200h"), "--out", str(report))
    assert proc.returncode == 0, proc.stderr
    assert [p["hours"] for p in json.loads(report.read_text())["points"]] == [2, 20, 200]
    assert _cli("--png", str(tmp_path / "x.png")).returncode == 2  # neither runs nor a report
    (tmp_path / "bad.json").write_text(json.dumps({"fits": {}}))
    with pytest.raises(SpeechLMError, match="bad.json: not a scaling report with points"):
        recorded_points(tmp_path / "bad.json")


def test_share_of_the_context_from_the_summary_and_from_reports(tmp_path):
    """(speech - floor) / (text - floor): 0 for a connector at the no-context floor, whatever its parity."""
    from speechlm.eval.report import Accuracy, ResultRow, write_report

    at_floor = {"corpus": {"hours": {"train": 2.0}},
                "storycloze": {"text_acc": 0.70, "endings_acc": 0.60, "s2t_vs_text": {"ratio": 0.857},
                               "s2t_vs_endings": {"diff": 0.0, "diff_ci95": [-0.04, 0.04]}},
                "speech_mmlu": {"text_acc": 0.65, "noquestion_acc": 0.25,
                                "speech_0shot_vs_noquestion": {"diff": 0.10, "diff_ci95": [0.04, 0.16]}}}
    p = point_from_summary(at_floor, "a")
    from speechlm.eval.scaling import shares_from_summary

    shares_from_summary(p, at_floor)
    assert p.values["storycloze_parity"] == pytest.approx(0.857) and p.values["storycloze_context"] == pytest.approx(0)
    assert p.ci95["storycloze_context"] == pytest.approx((-0.4, 0.4))
    assert p.values["mmlu_question"] == pytest.approx(0.25) and p.ci95["mmlu_question"] == pytest.approx((0.1, 0.4))
    # the same figure from an older run's reports and a floors report (text-only evaluation of the same items)
    ids = [f"s{i}" for i in range(100)]
    text = {k: i < 70 for i, k in enumerate(ids)}
    floor = {k: i < 60 for i, k in enumerate(ids)}
    speech = {k: i < 55 or 60 <= i < 65 for i, k in enumerate(ids)}  # 60 right, 5 of them where the floor is wrong
    row = lambda cond, conn, items: ResultRow("storycloze/adversarial", cond, conn, "none", "summed",
                                              Accuracy.of(list(items.values())), None, items, None)
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"corpus": {"hours": {"train": 3.0}}}))
    write_report([row("text", "llm", text), row("s2t", "cascade-whisper", text), row("s2t", "stage2/connector", speech)],
                 run / "eval", "storycloze")
    write_report([row("text", "llm", text), row("endings", "llm", floor)], tmp_path / "floors", "storycloze")
    assert "storycloze_context" not in load_points([run])[0].values  # no floors, no share
    [q] = load_points([run], tmp_path / "floors")
    assert q.values["storycloze_context"] == pytest.approx(0.0)  # 60 vs 60, the connector's row, not the cascade's
    lo, hi = q.ci95["storycloze_context"]
    assert lo < 0 < hi
