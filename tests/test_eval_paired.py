"""Paired comparisons (speechlm.eval.paired) and the per-item outcomes evaluation reports carry for them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speechlm.errors import ConfigError
from speechlm.eval.paired import compare, compare_reports, mcnemar_p, paired_bootstrap
from speechlm.eval.report import Accuracy, ResultRow, headline_entry, markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]


def test_mcnemar_exact_values():
    # 10 discordant items all one way: 2 * (1/2)^10.
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_p(0, 10) == pytest.approx(2 / 1024)
    # b = c: no evidence at all.
    assert mcnemar_p(7, 7) == 1.0
    assert mcnemar_p(0, 0) == 1.0
    # 3 vs 12 of 15, by hand: 2 * sum_{i<=3} C(15, i) / 2^15 = 2 * 576 / 32768.
    assert mcnemar_p(3, 12) == pytest.approx(2 * (1 + 15 + 105 + 455) / 2**15)
    # thousands of discordant tokens (token-level comparisons): no float overflow, the p computed in log space
    b, c = 1480, 2530
    log_tail = [math.lgamma(b + c + 1) - math.lgamma(i + 1) - math.lgamma(b + c - i + 1) for i in range(b + 1)]
    top = max(log_tail)
    expected = 2 * math.exp(top + math.log(sum(math.exp(x - top) for x in log_tail)) - (b + c) * math.log(2))
    assert mcnemar_p(b, c) == pytest.approx(expected, rel=1e-9) and 0 < mcnemar_p(b, c) < 1e-50
    assert mcnemar_p(20000, 20000) == 1.0 and mcnemar_p(1, 5000) == 0.0  # below the smallest float: 0, not an error
    with pytest.raises(ValueError):
        mcnemar_p(-1, 2)


def test_bootstrap_degenerate_and_seeded():
    same = np.array([1, 0, 1, 1, 0] * 20)
    boot = paired_bootstrap(same, same, resamples=500)
    assert boot["diff"] == (0.0, 0.0) and boot["ratio"] == (1.0, 1.0)
    assert paired_bootstrap(np.ones(50), np.zeros(50), resamples=200)["diff"] == (1.0, 1.0)
    assert paired_bootstrap(np.ones(50), np.zeros(50), resamples=200)["ratio"] is None  # B's mean is 0
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, 120), rng.integers(0, 2, 120)
    assert paired_bootstrap(a, b, seed=1) == paired_bootstrap(a, b, seed=1)
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:-1])


def test_pairing_sees_a_gap_that_two_separate_intervals_miss():
    # 300 items; both systems agree on 290 (200 right, 90 wrong); A alone is right on 10 others.
    a = {f"q{i}": i < 210 for i in range(300)}
    b = {f"q{i}": i < 200 for i in range(300)}
    pair = compare(a, b)
    assert (pair.n, pair.a_only, pair.b_only) == (300, 10, 0)
    assert pair.diff == pytest.approx(10 / 300)
    assert pair.p_mcnemar == pytest.approx(2 / 1024)
    assert pair.significant and pair.diff_ci95[0] > 0
    # The unpaired view: the two Wilson intervals overlap, so it would call this noise.
    lo_a, _ = Accuracy(210, 300).ci95
    _, hi_b = Accuracy(200, 300).ci95
    assert lo_a < hi_b
    # A true tie stays inside the noise.
    tie = compare({f"q{i}": i % 2 == 0 for i in range(100)}, {f"q{i}": i % 4 < 2 for i in range(100)})
    assert not tie.significant and "inside the noise" in tie.fmt()


def test_compare_drops_unshared_items_and_refuses_disjoint_sets():
    pair = compare({"a": True, "b": False, "c": True}, {"b": True, "c": True, "d": False})
    assert pair.n == 2 and pair.dropped == 2 and (pair.a_only, pair.b_only) == (0, 1)
    with pytest.raises(ConfigError, match="no item in common"):
        compare({"a": True}, {"b": True})


def _row(items: dict[str, bool], text_items: dict[str, bool] | None, cond: str = "s2t", connector: str = "ssr"):
    return ResultRow("storycloze/adversarial", cond, connector, "free", "summed", Accuracy.of(list(items.values())),
                     Accuracy.of(list(text_items.values())) if text_items else None, items, text_items)


def test_report_rows_carry_items_and_the_paired_gap(tmp_path):
    text = {f"sc-{i}": i % 4 != 0 for i in range(40)}  # 30 / 40
    speech = {f"sc-{i}": i % 4 in (1, 2) for i in range(40)}  # 20 / 40, all among the text-right ones
    row = _row(speech, text)
    js = row.to_json()
    assert js["items"]["sc-1"] == 1 and js["items"]["sc-0"] == 0 and len(js["items"]) == 40
    pair = js["paired_vs_text"]
    assert pair["n"] == 40 and pair["diff"] == pytest.approx(-0.25) and pair["diff_ci95"][1] < 0
    assert pair["a_only"] == 0 and pair["b_only"] == 10
    table = markdown_table([row])
    assert "minus text, paired" in table and "-25.0 [" in table
    entry = headline_entry(row, "s2t")
    assert entry["s2t_acc"] == 0.5 and entry["s2t_n"] == 40 and entry["s2t_vs_text"]["b_only"] == 10
    assert entry["s2t_ci95"][0] < 0.5 < entry["s2t_ci95"][1]
    # A text row (no reference) has items but no paired column.
    assert _row(text, None, "text", "llm").to_json()["paired_vs_text"] is None


def test_compare_reports_and_the_command_line(tmp_path):
    text = {f"sc-{i}": i % 4 != 0 for i in range(200)}
    run_a = [_row(text, None, "text", "llm"), _row({k: i < 120 for i, k in enumerate(text)}, text)]
    run_b = [_row(text, None, "text", "llm"), _row({k: i < 100 for i, k in enumerate(text)}, text, connector="stack8")]
    ja, _ = write_report(run_a, tmp_path / "a", "storycloze")
    jb, _ = write_report(run_b, tmp_path / "b", "storycloze")
    found = compare_reports(json.loads(ja.read_text()), json.loads(jb.read_text()), condition="s2t")
    assert len(found) == 1
    label, pair = found[0]
    assert "ssr vs stack8" in label and (pair.a_only, pair.b_only) == (20, 0) and pair.significant
    # Text rows pair with text rows only; with --same-connector the differently named connectors do not match.
    both = compare_reports(json.loads(ja.read_text()), json.loads(jb.read_text()))
    by_cond = {label.split()[1]: pair for label, pair in both}
    assert set(by_cond) == {"text", "s2t"} and by_cond["text"].n == 200
    assert math.isclose(by_cond["text"].diff, 0.0) and by_cond["text"].a_only == by_cond["text"].b_only == 0
    assert compare_reports(json.loads(ja.read_text()), json.loads(jb.read_text()), condition="s2t",
                           same_connector=True) == []
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_evals.py"), str(ja), str(jb),
                          "--condition", "s2t"], capture_output=True, text=True, check=True).stdout
    assert "ssr vs stack8" in out and "+10.0 points" in out and "20 vs 0 discordant" in out
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_evals.py"), str(ja), str(jb),
                          "--condition", "nope"], check=False, capture_output=True, text=True)
    assert bad.returncode == 1 and "no matching rows" in bad.stderr


def test_compare_reports_across_two_conditions(tmp_path):
    """A connector's s2t against the LLM's endings alone (another condition, another connector, no boundaries)."""
    text = {f"sc-{i}": i % 4 != 0 for i in range(200)}
    floor = {k: i < 110 for i, k in enumerate(text)}
    rows = [_row(text, None, "text", "llm"), _row(floor, text, "endings", "llm"),
            _row({k: i < 120 for i, k in enumerate(text)}, text)]
    ja, _ = write_report(rows, tmp_path / "a", "storycloze")
    rep = json.loads(ja.read_text())
    [(label, pair)] = compare_reports(rep, rep, condition="s2t", condition_b="endings")
    assert label == "storycloze/adversarial summed: ssr s2t vs llm endings"
    assert (pair.n, pair.a_only, pair.b_only) == (200, 10, 0) and pair.diff == pytest.approx(0.05)
    assert compare_reports(rep, rep, condition="s2t", condition_b="endings", same_connector=True) == []
    with pytest.raises(ConfigError, match="needs A's condition"):
        compare_reports(rep, rep, condition_b="endings")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_evals.py"), str(ja), str(ja), "--condition",
                          "s2t", "--b-condition", "endings"], capture_output=True, text=True, check=True).stdout
    assert "ssr s2t vs llm endings" in out and "+5.0 points" in out


def test_summary_table_shows_a_paired_comparison_on_one_line():
    from speechlm.eval.summary import table

    text = {f"sc-{i}": i % 4 != 0 for i in range(40)}
    entry = headline_entry(_row({k: i % 4 in (1, 2) for i, k in enumerate(text)}, text), "s2t")
    lines = [line for line in table({"storycloze": entry}).splitlines() if "s2t_vs_text" in line]
    assert len(lines) == 1 and "-25.0 points [" in lines[0] and "n=40" in lines[0] and "McNemar p=0.002 " in lines[0]


def test_headline_puts_speech_cascade_and_text_side_by_side():
    from speechlm.eval.summary import headline

    text = {f"sc-{i}": i % 4 != 0 for i in range(40)}
    entry = headline_entry(_row({k: i % 4 in (1, 2) for i, k in enumerate(text)}, text), "s2t")
    entry["s2t_vs_cascade"] = {"acc_b": 0.7, "diff": -0.2}
    top = headline({"storycloze": entry, "asr": {"wer": 0.5, "n": 9}, "corpus": {"whisper_wer_test": 0.125},
                    "stage1": {"valid_token_acc": 0.4031, "valid_cosine": 0.612}})
    rows = top.splitlines()
    assert rows[0].startswith("| task | speech (SSR) | Whisper cascade | text (LLM alone)")
    story = next(r for r in rows if r.startswith("| StoryCloze S->T (n 40)"))
    # speech 50% (items 1, 2 of every 4), cascade 70%, text 75%, speech minus text -25 points, paired
    assert "| 50.0% | 70.0% | 75.0% | -25.0 [" in story
    assert any("50.0% | 12.5% (Whisper alone)" in r for r in rows)
    assert any("0.403 / 0.612" in r for r in rows)
    assert not any("Speech-MMLU" in r for r in rows)  # no figures, no row
    assert not any("endings alone" in r for r in rows)
    entry |= {"endings_acc": 0.55, "s2t_vs_endings": {"diff": -0.05, "diff_ci95": [-0.15, 0.05]}}
    [floor] = [r for r in headline({"storycloze": entry}).splitlines() if "endings alone" in r]
    assert "| -5.0 [-15.0, +5.0] | - | 55.0% |" in floor
    mmlu = {"speech_acc_0shot": 0.3, "noquestion_acc": 0.28, "speech_0shot_vs_noquestion": {"diff": 0.02,
                                                                                            "diff_ci95": [-0.01, 0.05]}}
    [floor] = [r for r in headline({"speech_mmlu": mmlu}).splitlines() if "options alone" in r]
    assert "| +2.0 [-1.0, +5.0] | - | 28.0% |" in floor
    assert headline({}) == ""


def test_two_token_analyses_compare_token_by_token():
    a = {"connector": "runs/a/stage1/connector", "items": {f"u{i // 10}/{i % 10}": int(i < 60) for i in range(100)}}
    b = {"connector": "runs/b/stage1/connector", "items": {f"u{i // 10}/{i % 10}": int(i < 50) for i in range(100)}}
    [(label, pair)] = compare_reports(a, b)
    assert "runs/a/stage1/connector vs runs/b/stage1/connector" in label
    assert (pair.n, pair.a_only, pair.b_only) == (100, 10, 0) and pair.diff == pytest.approx(0.1)


def test_cluster_bootstrap_widens_the_interval_of_correlated_items():
    # 20 utterances of 10 tokens; the two systems differ only on whole utterances (all 10 tokens at once).
    rng = np.random.default_rng(0)
    flip = rng.random(20) < 0.3
    a = {f"u{u}/{j}": bool(flip[u]) or j < 5 for u in range(20) for j in range(10)}
    b = {f"u{u}/{j}": j < 5 for u in range(20) for j in range(10)}
    plain, clustered = compare(a, b), compare(a, b, cluster=True)
    assert plain.diff == clustered.diff and plain.p_mcnemar == clustered.p_mcnemar
    width = lambda p: p.diff_ci95[1] - p.diff_ci95[0]
    assert width(clustered) > 1.5 * width(plain)
    # With singleton clusters the cluster bootstrap is the plain one.
    x, y = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    single, plain_boot = paired_bootstrap(x, y, 2000, 1, groups=np.arange(50)), paired_bootstrap(x, y, 2000, 1)
    for key in ("diff", "ratio"):
        assert single[key] == pytest.approx(plain_boot[key])


def test_connector_labels_tell_runs_apart():
    from speechlm.eval.scoring import connector_label

    runs = ["runs/tiny/stage2/connector", "runs/ab_kl/stage2/connector", "runs/ab_kl/stage1/connector"]
    assert connector_label(runs[0]) == "stage2/connector"  # alone: the last two parts, as before
    assert [connector_label(r, runs) for r in runs] == ["tiny/stage2/connector", "ab_kl/stage2/connector",
                                                       "stage1/connector"]
