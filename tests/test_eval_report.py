"""Reports: Wilson intervals on known values, parity, JSON + markdown output; WER and the ASR read-out."""

import json
import math

import pytest
import torch

from speechlm.eval.asr import normalize_text, transcribe_speechlm, transcribe_text_oracle, word_error_rate
from speechlm.eval.report import Accuracy, ResultRow, markdown_table, parity, wilson_interval, write_report
from speechlm.eval.scoring import SpeechInput, start_ids, text_ids
from tests.eval_helpers import OracleFrontEnd, speech_model, unigram_llm, word_tokenizer


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


def test_asr_read_out_generates_one_line_of_at_least_one_token():
    tok = word_tokenizer()
    # The rigged LLM predicts the same distribution everywhere. With a newline or EOS on top the read-out
    # stops at once, but not before its first token (the runner-up, "tom"): a read-out is never empty.
    inputs = [SpeechInput(torch.zeros(10), "a cat", "u1"), SpeechInput(torch.zeros(10), "tom was late", "u2")]
    for line_end in ("\n", tok.eos_token):
        model = speech_model(unigram_llm(tok, {line_end: 9.0, "tom": 5.0}), tok)
        assert transcribe_speechlm(model, OracleFrontEnd(model), inputs) == ["tom", "tom"]
    # with "tom" on top it runs to max_new_tokens
    run = unigram_llm(tok, {"tom": 9.0})
    model = speech_model(run, tok)
    hyps = transcribe_speechlm(model, OracleFrontEnd(model), inputs, max_new_tokens=3, batch_size=1)
    assert [h.split() for h in hyps] == [["tom"] * 3] * 2
    with pytest.raises(ValueError, match="placeholder"):
        transcribe_speechlm(model, OracleFrontEnd(model), inputs, prompt="no placeholder")


def test_asr_text_oracle_reads_the_transcript_in_the_prompt():
    tok = word_tokenizer()
    seen = []

    class Recorder:  # stands in for a SpeechLM: records what generate() is given, answers one token
        tokenizer = tok

        def generate(self, prefixes, max_new_tokens, eos, min_new_tokens):
            seen.extend((p, min_new_tokens) for p in prefixes)
            return [[tok.convert_tokens_to_ids("tom")] for _ in prefixes]

    hyps = transcribe_text_oracle(Recorder(), ["a cat", "tom was late"], prompt="say {speech} now", batch_size=1)
    assert hyps == ["tom", "tom"]
    assert [p[0].ids for p, _ in seen] == [start_ids(tok) + text_ids(tok, "say a cat now"),
                                           start_ids(tok) + text_ids(tok, "say tom was late now")]
    assert [tok.decode(p[0].ids, skip_special_tokens=True).split() for p, _ in seen] == [
        ["a", "cat"], ["tom", "was", "late"]]  # (the test tokenizer knows no "say" or "now")
    assert all(m == 1 for _, m in seen)
