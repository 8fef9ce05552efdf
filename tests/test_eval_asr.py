"""Zero-shot ASR read-out: at most N tokens (one per SSR vector), one line, never empty, no repeated n-gram;
the text oracle; LibriVox inputs; the recipe's summary keys and per-engine WER."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.errors import ManifestError
from speechlm.eval import asr
from speechlm.eval.asr import (
    read_librivox_inputs,
    read_out,
    read_transcription,
    repeated_ngram_bans,
    token_limits,
    transcribe_speechlm,
    transcribe_text_oracle,
)
from speechlm.eval.scoring import SpeechInput, start_ids, text_ids
from speechlm.models.speechlm import TextSegment
from tests.eval_helpers import (
    OracleFrontEnd,
    bigram_llm,
    fake_whisper,
    speech_model,
    tiny_llm,
    unigram_llm,
    word_tokenizer,
)
from tests.test_eval_recipes import run_recipe

TEXTS = ["a cat", "tom was late", "he ran to the bus and the bus had left", "the dog was very happy so he walked home"]


def ngrams(ids, n=3):
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def has_word(tok, ids):
    return any(ch.isalnum() for ch in tok.decode(ids, skip_special_tokens=True))


def oracle_prefixes(model, texts, after=":"):
    """[BOS] speech(text) ":" : what transcribe_speechlm builds, with the oracle's vectors."""
    tok = model.tokenizer
    segs = OracleFrontEnd(model).embed([SpeechInput(torch.zeros(1), t) for t in texts])
    return [[TextSegment(start_ids(tok)), s, TextSegment(text_ids(tok, after))] for s in segs], segs


@pytest.mark.parametrize("seed", range(4))
def test_random_models_read_out_at_most_n_tokens_never_empty_no_repeated_trigram(seed):
    tok = word_tokenizer()
    model = speech_model(tiny_llm(len(tok), seed=seed), tok)
    prefixes, segs = oracle_prefixes(model, TEXTS)
    counts = [len(s.ids) for s in segs]
    out = read_out(model, prefixes, token_limits(counts))
    ends = set(asr.line_end_ids(tok))
    for ids, n in zip(out, counts):
        assert 1 <= len(ids) <= n
        assert has_word(tok, ids[:1])  # the first token is a word
        assert not ends & set(ids)  # one line: no newline, no EOS inside
        assert len(set(ngrams(ids))) == len(ngrams(ids))  # no 3-gram twice
    hyps = transcribe_speechlm(model, OracleFrontEnd(model), [SpeechInput(torch.zeros(1), t) for t in TEXTS],
                               batch_size=3)
    assert all(h.strip() for h in hyps)
    assert [len(tok(h)["input_ids"]) <= n for h, n in zip(hyps, counts)] == [True] * len(TEXTS)


def test_batched_read_out_equals_one_at_a_time():
    tok = word_tokenizer()
    model = speech_model(tiny_llm(len(tok), seed=7), tok)
    inputs = [SpeechInput(torch.zeros(1), t) for t in TEXTS]
    together = transcribe_speechlm(model, OracleFrontEnd(model), inputs, batch_size=4)
    alone = transcribe_speechlm(model, OracleFrontEnd(model), inputs, batch_size=1)
    assert together == alone


def test_a_looping_model_is_cut_by_no_repeat_ngram_and_by_n():
    tok = word_tokenizer()
    # greedy decoding loops "the bus of the bus of ..." (the measured "the away of the away of ...")
    model = speech_model(bigram_llm(tok, {":": "the", "the": "bus", "bus": ["of", "and"], "of": "the"}), tok)
    prefixes, _ = oracle_prefixes(model, ["tom"])
    loop = read_out(model, prefixes, [12], no_repeat_ngram=0)[0]
    assert tok.decode(loop).split() == ["the", "bus", "of"] * 4  # what the old read-out did, up to the limit
    ids = read_out(model, prefixes, [12])[0]  # default: no repeated 3-gram
    words = tok.decode(ids).split()
    assert words[:6] == ["the", "bus", "of", "the", "bus", "and"]  # "of" would repeat "the bus of": the runner-up
    assert len(ids) <= 12 and len(set(ngrams(ids))) == len(ngrams(ids))
    two = read_out(model, prefixes, [12], no_repeat_ngram=2)[0]
    assert len(set(ngrams(two, 2))) == len(ngrams(two, 2))
    # and N bounds it: a 2-token transcript gives at most 2 tokens
    hyp = transcribe_speechlm(model, OracleFrontEnd(model), [SpeechInput(torch.zeros(1), "a cat")], prompt="{speech} :")
    assert hyp == ["the bus"]


def test_read_out_stops_at_a_newline_or_eos():
    tok = word_tokenizer()
    for end in ("\n", tok.eos_token):
        model = speech_model(bigram_llm(tok, {":": "tom", "tom": "was", "was": end}), tok)
        inputs = [SpeechInput(torch.zeros(1), "he ran to the bus and the bus had left")]  # N = 10
        assert transcribe_speechlm(model, OracleFrontEnd(model), inputs, prompt="{speech} :") == ["tom was"]


def test_read_out_is_never_empty():
    tok = word_tokenizer()
    inputs = [SpeechInput(torch.zeros(10), "a cat", "u1"), SpeechInput(torch.zeros(10), "tom was late", "u2")]
    # The rigged LLM predicts the same distribution everywhere: a newline, EOS or a wordless token on top
    # would end the line at once; the first token is the best word instead ("tom"), then the line ends.
    for line_end in ("\n", tok.eos_token):
        model = speech_model(unigram_llm(tok, {line_end: 12.0, ".": 10.0, "<unk>": 9.0, "tom": 5.0}), tok)
        assert transcribe_speechlm(model, OracleFrontEnd(model), inputs) == ["tom", "tom"]
    # a bigram model whose first choice after the prompt is a newline, then a full stop
    model = speech_model(bigram_llm(tok, {":": ["\n", ".", "dog"], "dog": "\n"}), tok)
    assert transcribe_speechlm(model, OracleFrontEnd(model), inputs[:1], prompt="{speech} :") == ["dog"]
    # no speech vectors at all (the aligner decoded nothing): still one word
    prefixes = [[TextSegment(start_ids(tok) + text_ids(tok, ":"))]]
    assert read_out(model, prefixes, token_limits([0])) == [[tok.convert_tokens_to_ids("dog")]]


def test_read_out_length_follows_the_ssr_token_count():
    tok = word_tokenizer()
    inputs = [SpeechInput(torch.zeros(10), "a cat", "u1"), SpeechInput(torch.zeros(10), "tom was late", "u2")]
    model = speech_model(unigram_llm(tok, {"tom": 9.0, "cat": 8.0}), tok)
    front = OracleFrontEnd(model)
    assert transcribe_speechlm(model, front, inputs) == ["tom tom", "tom tom tom"]  # N = 2 and 3
    assert transcribe_speechlm(model, front, inputs, slack=1) == ["tom tom tom", "tom tom tom cat"]
    assert transcribe_speechlm(model, front, inputs, max_new_tokens=1, batch_size=1) == ["tom", "tom"]
    with pytest.raises(ValueError, match="placeholder"):
        transcribe_speechlm(model, front, inputs, prompt="no placeholder")


def test_token_limits_and_ngram_bans():
    assert token_limits([3, 0, None, 500], slack=0, max_new_tokens=256) == [3, 1, 256, 256]
    assert token_limits([3, 5], slack=2, max_new_tokens=0) == [5, 7]
    with pytest.raises(ValueError, match="slack"):
        token_limits([3], slack=-1)
    with pytest.raises(ValueError, match="unknown"):
        token_limits([None], max_new_tokens=0)
    assert repeated_ngram_bans([1, 2, 3, 1, 2], 3) == {3}
    assert repeated_ngram_bans([1, 2, 1, 2, 1], 3) == {2}
    assert repeated_ngram_bans([1, 2, 3], 3) == set() and repeated_ngram_bans([1, 2, 3], 0) == set()
    assert repeated_ngram_bans([5, 6, 5], 2) == {6} and repeated_ngram_bans([5, 6], 1) == {5, 6}


def test_text_oracle_reads_the_transcript_in_the_prompt_with_its_own_token_count(monkeypatch):
    tok = word_tokenizer()
    seen = []

    def fake_read_out(model, prefixes, limits, no_repeat_ngram=3):
        seen.extend(zip(prefixes, limits))
        return [[tok.convert_tokens_to_ids("tom")] for _ in prefixes]

    monkeypatch.setattr(asr, "read_out", fake_read_out)
    model = speech_model(unigram_llm(tok, {}), tok)
    hyps = transcribe_text_oracle(model, ["a cat", "tom was late"], prompt="say {speech} now", batch_size=1)
    assert hyps == ["tom", "tom"]
    assert [p[0].ids for p, _ in seen] == [start_ids(tok) + text_ids(tok, "say a cat now"),
                                           start_ids(tok) + text_ids(tok, "say tom was late now")]
    assert [n for _, n in seen] == [2, 3]


def test_text_oracle_copies_with_a_copying_model():
    tok = word_tokenizer()
    model = speech_model(bigram_llm(tok, {":": "tom", "tom": "was", "was": "late", "late": "\n"}), tok)
    assert transcribe_text_oracle(model, ["tom was late"], prompt="{speech} :") == ["tom was late"]


# ------------------------------------------------------------------------------------------ LibriVox
def write_librivox(folder, lines, n=8000):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "transcription").write_text("".join(f"<s> {t} </s> ({fid})\n" for fid, t in lines))
    for fid, _ in lines:
        sf.write(folder / f"{fid}.wav", np.zeros(n, dtype=np.float32), 16000)
    return folder


def test_librivox_transcription_and_inputs(tmp_path):
    folder = write_librivox(tmp_path / "lv", [("book_01-0870", "he was not an ill disposed young man"),
                                              ("book_01-0880", "a cat")])
    assert read_transcription(folder / "transcription") == {"book_01-0870": "he was not an ill disposed young man",
                                                            "book_01-0880": "a cat"}
    inputs = read_librivox_inputs(folder)
    assert [(x.id, x.text, x.speaker) for x in inputs][1] == ("book_01-0880", "a cat", "human:librivox/book_01")
    assert inputs[0].wave.shape == (8000,) and len(read_librivox_inputs(folder, limit=1)) == 1
    (folder / "transcription").write_text("no file id here\n")
    with pytest.raises(ManifestError, match="transcription:1"):
        read_librivox_inputs(folder)
    with pytest.raises(ManifestError, match="apt-get install pocketsphinx-testdata"):
        read_librivox_inputs(tmp_path / "missing")


@pytest.mark.skipif(not (asr.LIBRIVOX_DIR / "transcription").is_file(), reason="pocketsphinx-testdata not installed")
def test_installed_librivox_set():
    inputs = read_librivox_inputs()
    assert len(inputs) == 5 and all(x.text and "<s>" not in x.text and "(" not in x.text for x in inputs)
    assert inputs[1].text == "he was not an ill disposed young man" and inputs[1].wave.numel() > 16000


# -------------------------------------------------------------------------------------------- recipe
def test_asr_recipe_per_engine_wer_and_librivox_key(tmp_path, monkeypatch):
    from speechlm.data.manifest import Utterance, write_manifest

    utts = [("a", "the cat sat", "festival:ked_diphone/r175/p50", 16000, "the cat sad"),
            ("b", "a dog ran home", "en-us+m3/r175/p50", 24000, "a dog ran home"),
            ("c", "he was late", "piper:en_US-joe-medium/r175/p50", 20000, "he was"),
            ("d", "tom ran", "festival:ked_diphone/r160/p40", 12000, "tom ran")]
    rows, heard_as = [], {}  # clip length -> what the fake Whisper hears
    for uid, text, speaker, n, heard in utts:
        sf.write(tmp_path / f"{uid}.wav", np.zeros(n, dtype=np.float32), 16000)
        rows.append(Utterance(uid, f"{uid}.wav", 16000, n / 16000, text, "test", speaker=speaker))
        heard_as[n] = heard
    write_manifest(tmp_path / "m.jsonl", rows)
    lv = write_librivox(tmp_path / "lv", [("book-1", "a cat"), ("book-2", "tom was late")], n=4000)
    heard_as[4000] = "a cat"
    fake_whisper(monkeypatch, lambda w: heard_as[w.numel()])
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"storycloze": {"text_acc": 1.0}, "asr": {"old_key": 1}}))
    out = run_recipe("eval_asr", [f"manifest={tmp_path / 'm.jsonl'}", "whisper_baseline=true", "librivox=true",
                                  f"librivox_dir={lv}", f"out_dir={tmp_path / 'out'}", f"summary={summary}"])
    (row,) = out["results"]
    assert row["wer"] == pytest.approx(2 / 12)
    s = json.loads(summary.read_text())
    assert s["storycloze"] == {"text_acc": 1.0} and s["asr"]["old_key"] == 1  # other entries and keys stay
    assert s["asr"]["system"] == "whisper" and s["asr"]["n"] == 4
    eng = s["asr"]["by_engine"]
    assert sorted(eng) == ["espeak", "festival", "piper"]
    assert eng["festival"]["n"] == 2 and eng["festival"]["wer"] == 0.2 and 0 < eng["festival"]["cer"] < 0.2
    assert eng["espeak"]["wer"] == 0.0 and eng["piper"]["wer"] == round(1 / 3, 4) and eng["piper"]["n"] == 1
    assert s["asr_librivox"]["n"] == 2 and s["asr_librivox"]["wer"] == 0.6  # "tom was late" heard as "a cat"
    assert list(s["asr_librivox"]["by_engine"]) == ["human"]
    report = json.loads((tmp_path / "out" / "asr.json").read_text())
    assert {e: [r["n"] for r in v] for e, v in report["by_engine"].items()} == {"espeak": [1], "festival": [2], "piper": [1]}
    assert "by_engine" not in report["results"][0]
    md = (tmp_path / "out" / "asr.md").read_text()
    assert "| whisper | none | 4 |" in md and "| festival | whisper | none | 2 | 20.0 |" in md
    assert (tmp_path / "out" / "asr_librivox.json").is_file()
    # manifest=librivox: the LibriVox set alone
    out = run_recipe("eval_asr", ["manifest=librivox", "whisper_baseline=true", f"librivox_dir={lv}",
                                  f"out_dir={tmp_path / 'o2'}"])
    assert out["results"][0]["n"] == 2 and list(out["sets"]) == ["asr_librivox"]


def test_asr_recipe_needs_something_to_evaluate(tmp_path):
    from speechlm.errors import ConfigError

    with pytest.raises(ConfigError, match="librivox=true"):
        run_recipe("eval_asr", [f"out_dir={tmp_path}"])
    with pytest.raises(ManifestError, match="pocketsphinx-testdata"):
        run_recipe("eval_asr", ["librivox=true", f"librivox_dir={tmp_path / 'none'}", f"out_dir={tmp_path}"])
