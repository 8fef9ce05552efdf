"""Reports: Wilson intervals on known values, parity, JSON + markdown output, per-engine breakdowns; WER.

The ASR read-out's tests are in test_eval_asr.py."""

import json
import math

import pytest

from speechlm.data.tts import engine_of
from speechlm.eval.asr import normalize_text, word_error_rate
from speechlm.eval.report import (
    Accuracy,
    ResultRow,
    add_engine_rows,
    engine_rows,
    group_by_engine,
    markdown_table,
    merge_summary,
    parity,
    wilson_interval,
    write_report,
)


@pytest.mark.parametrize("k, n, lo, hi", [
    (50, 100, 0.40383, 0.59617),   # textbook values of the Wilson score interval
    (0, 10, 0.0, 0.27753),
    (10, 10, 0.72247, 1.0),
])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=2e-5) and got[1] == pytest.approx(hi, abs=2e-5)


@pytest.mark.parametrize("k, n", [(81, 263), (3, 7), (199, 200)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """Each bound p0 satisfies (k/n - p0)^2 = z^2 p0 (1 - p0) / n (the interval's definition)."""
    z = 1.959963984540054
    for p0 in wilson_interval(k, n):
        assert (k / n - p0) ** 2 == pytest.approx(z * z * p0 * (1 - p0) / n, rel=1e-9, abs=1e-12)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    lo, hi = wilson_interval(30, 40)
    assert lo < 0.75 < hi


def test_parity_and_report_files(tmp_path):
    text, speech = Accuracy(80, 100), Accuracy(60, 100)
    assert parity(speech, text) == pytest.approx(0.75)
    assert parity(speech, Accuracy(0, 100)) is None
    rows = [ResultRow("storycloze/adversarial", "s2t", "ssr", "free", "summed", speech, text),
            ResultRow("storycloze/adversarial", "text", "llm", "none", "summed", text)]
    js, md = write_report(rows, tmp_path, "storycloze", {"voices": "en-029"})
    data = json.loads(js.read_text())
    first = data["results"][0]
    assert first["accuracy"]["n"] == 100 and first["accuracy"]["acc"] == 0.6 and first["parity"] == 0.75
    assert first["accuracy"]["ci95"][0] < 0.6 < first["accuracy"]["ci95"][1]
    table = md.read_text()
    assert "| storycloze/adversarial | s2t | ssr | free | summed | 100 | 60.0 [" in table and "| 0.750 |" in table
    assert markdown_table(rows).count("\n") == 4
    assert Accuracy.of([True, False, True]) + Accuracy(1, 1) == Accuracy(3, 4)
    assert math.isnan(Accuracy(0, 0).value)


def test_wer_normalises_case_and_punctuation():
    assert word_error_rate(["Tom was late."], ["tom was late"]) == 0.0
    assert word_error_rate(["tom was late", "a cat"], ["tom was", "a dog"]) == pytest.approx(2 / 5)
    assert normalize_text("It\u2019s  FIVE, o'clock!") == "it's five o'clock"
    assert normalize_text("The 26-year-old paid 1,200.") == "the twenty six year old paid one thousand two hundred"
    with pytest.raises(ValueError, match="empty"):
        word_error_rate(["..."], ["x"])


@pytest.mark.parametrize("voice, engine", [
    ("piper:en_US-joe-medium", "piper"),
    ("festival:ked_diphone", "festival"),
    ("festival:ked_diphone/r175/p50", "festival"),
    ("flite:kal16/r160/p40", "flite"),
    ("Piper:x", "piper"),
    ("en-gb-scotland+f4", "espeak-hard"),  # a held-out eSpeak voice of the corpus: the hard condition
    ("en-gb-scotland+f4/r175/p50", "espeak-hard"),
    ("en-us+m3/r175/p50", "espeak"),
    ("en-us", "espeak"),
    ("human:librivox/sense_and_sensibility_01", "human"),
    ("103", "human"),  # a LibriSpeech / MLS speaker id
    ("", "unknown"),
    (None, "unknown"),
    ("manifest", "unknown"),
])
def test_engine_of(voice, engine):
    assert engine_of(voice) == engine


def test_one_engine_of_for_reports_corpus_and_token_analysis():
    """The evaluation runs and the token analysis use the TTS index's engine_of; label_hard=False gives the plain
    synthesis engine."""
    from speechlm.data import tts
    from speechlm.eval import run_asr, run_storycloze, token_analysis

    assert run_asr.engine_of is run_storycloze.engine_of is token_analysis.engine_of is tts.engine_of
    assert tts.engine_of("en-gb-scotland+f4", label_hard=False) == "espeak"
    assert tts.engine_of("flite:kal16", label_hard=False) == "flite"
    assert all(tts.is_hard(v) for voices in tts.HARD_VOICES.values() for v in voices)
    assert not tts.is_hard("en-us+m3")


def test_engine_summary_names_each_tasks_figures():
    from speechlm.eval.report import CASCADE, LLM_ALONE, engine_summary

    def row(cond, connector, scoring="summed", correct=1, total=2):
        return ResultRow("t", cond, connector, "free", scoring, Accuracy(correct, total))

    by_engine = {"piper": [row("text", LLM_ALONE), row("s2t", "conn", correct=2), row("s", CASCADE, correct=0),
                           row("s2t", "conn", scoring="length_norm", correct=0), row("s2t", "other", correct=0)],
                 "flite": [row("s2t", "conn", scoring="length_norm")]}
    out = engine_summary(by_engine, "text", "conn", key=lambda r, cascade: ("cascade_" if cascade else "") + r.condition,
                         keep=lambda r: r.scoring == "summed")
    assert out == {"piper": {"n": 2, "text_acc": 0.5, "s2t": 1.0, "cascade_s": 0.0}}  # flite: no summed row


def test_engine_rows_split_accuracy_and_text_per_engine(tmp_path):
    engines = ["espeak", "piper", "espeak", "piper", "festival"]
    speech = [True, False, True, True, False]
    text = [True, True, False, True, True]
    assert group_by_engine(engines, speech) == {"espeak": [True, True], "festival": [False], "piper": [False, True]}
    with pytest.raises(ValueError, match="one engine per item"):
        group_by_engine(engines[:2], speech)
    template = ResultRow("storycloze/adversarial", "s2t", "ssr", "free", "summed", Accuracy(0, 0))
    split = engine_rows(template, speech, engines, text)
    assert list(split) == ["espeak", "festival", "piper"]
    assert split["espeak"].accuracy == Accuracy(2, 2) and split["espeak"].text == Accuracy(1, 2)
    assert split["piper"].accuracy == Accuracy(1, 2) and split["festival"].accuracy == Accuracy(0, 1)
    assert split["piper"].condition == "s2t" and split["piper"].connector == "ssr"
    assert sum(r.accuracy.total for r in split.values()) == len(speech)
    by_engine: dict = {}
    add_engine_rows(by_engine, split)
    add_engine_rows(by_engine, engine_rows(template, speech, engines))  # no text: no parity
    js, md = write_report([template], tmp_path, "r", {}, by_engine)
    data = json.loads(js.read_text())
    assert [r["accuracy"]["n"] for r in data["by_engine"]["espeak"]] == [2, 2]
    assert data["by_engine"]["espeak"][0]["parity"] == 2.0 and data["by_engine"]["espeak"][1]["parity"] is None
    table = md.read_text().split("## By TTS engine")[1]
    assert "| festival | storycloze/adversarial | s2t | ssr | free | summed | 1 | 0.0 [" in table
    # without a breakdown the report is as before
    js, md = write_report([template], tmp_path, "plain")
    assert "by_engine" not in json.loads(js.read_text()) and "By TTS engine" not in md.read_text()


def test_merge_summary_keeps_other_keys_and_rounds_nested_values(tmp_path):
    p = tmp_path / "summary.json"
    merge_summary(p, "asr", {"wer": 0.5, "by_engine": {"old": {"wer": 1.0}}})
    merge_summary(p, "storycloze", {"text_acc": 1.0})
    merge_summary(p, "asr", {"cer": 0.123456789, "by_engine": {"piper": {"wer": 0.333333333, "n": 3}}})
    assert json.loads(p.read_text()) == {"asr": {"wer": 0.5, "cer": 0.1235, "by_engine": {"piper": {"wer": 0.3333, "n": 3}}},
                                         "storycloze": {"text_acc": 1.0}}
