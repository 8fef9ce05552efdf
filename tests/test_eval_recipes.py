"""The evaluation recipes end to end (text-only) on a tiny saved LLM: reports and summary keys."""

import importlib.util
import json
import sys
from pathlib import Path

from tests.eval_helpers import unigram_llm, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def recipe(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def saved_llm(tmp_path, prefer):
    tok = word_tokenizer()
    folder = tmp_path / "llm"
    unigram_llm(tok, prefer).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_storycloze_recipe_text_only(tmp_path):
    llm = saved_llm(tmp_path, {"sad": 4.0})
    data = tmp_path / "s.jsonl"
    ctx = ["tom was late .", "he ran to the bus .", "the bus had left .", "tom walked home ."]
    rows = [{"id": "a", "context": ctx, "right_ending": "tom was sad .", "wrong_ending": "tom was happy ."},
            {"id": "b", "context": ctx, "right_ending": "he was sad .", "wrong_ending": "he was very happy ."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"asr": {"wer": 0.5}}))
    out = recipe("eval_storycloze").main([f"llm={llm}", f"data={data}", "text_only=true", "wrong_styles=[adversarial]",
                                          f"out_dir={tmp_path / 'out'}", f"summary={summary}"])
    assert out["summary"] == {"text_acc": 1.0}
    assert json.loads(summary.read_text()) == {"asr": {"wer": 0.5}, "storycloze": {"text_acc": 1.0}}
    report = json.loads((tmp_path / "out" / "storycloze.json").read_text())
    assert {r["scoring"] for r in report["results"]} == {"summed", "length_norm"}
    assert all(r["accuracy"]["n"] == 2 for r in report["results"])
    assert (tmp_path / "out" / "storycloze.md").read_text().count("| storycloze/adversarial |") == 2


def test_speech_mmlu_recipe_text_only(tmp_path):
    llm = saved_llm(tmp_path, {"six": 3.0, "blue": 3.0})
    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        (tmp_path / "mmlu" / split / f"maths_{split}.csv").write_text(
            "what is two plus four ?,five,six,three,seven,B\nwhat color is the sky ?,red,green,blue,x,C\n")
    out = recipe("eval_speech_mmlu").main([f"llm={llm}", f"data={tmp_path / 'mmlu'}", "text_only=true", "shots=[0,1]",
                                           f"out_dir={tmp_path / 'out'}", f"summary={tmp_path / 's.json'}"])
    assert out["summary"] == {"text_acc": 1.0}
    tasks = {(r["task"], r["condition"], r["scoring"]) for r in out["rows"]}
    assert ("speech_mmlu/all", "text_1shot", "letter") in tasks and ("speech_mmlu/maths", "text_0shot", "cloze") in tasks


def test_storycloze_cascade_transcribes_each_waveform_once(tmp_path, monkeypatch):
    import torch

    from speechlm.eval import asr
    from speechlm.eval import storycloze as sc
    from speechlm.eval.scoring import SpeechInput

    calls = []

    class FakeWhisper:  # "hears" each clip as its length in words, and counts what it is asked
        def __init__(self, folder, device):
            pass

        def transcribe(self, waves, batch_size):
            calls.append(len(waves))
            return [" ".join(["tom"] * w.numel()) for w in waves]

    monkeypatch.setattr(asr, "WhisperCascade", FakeWhisper)
    mod = recipe("eval_storycloze")
    tok = word_tokenizer()
    llm = unigram_llm(tok, {"tom": 4.0})
    cfg = mod.StoryClozeEvalConfig(whisper="unused")
    item = sc.StoryItem("a", ["tom was late ."], "tom was sad .", "he was happy .")
    story = sc.SpokenStory(item, *(SpeechInput(torch.zeros(n), None, f"w{n}") for n in (3, 2, 1)))
    text = sc.score_text_condition(llm, tok, [item], 1)
    transcripts: dict[int, str] = {}
    rows = mod.cascade_rows(cfg, llm, tok, "t", [story], text, transcripts)
    assert calls == [3] and sorted(transcripts.values()) == ["tom", "tom tom", "tom tom tom"]
    again = mod.cascade_rows(cfg, llm, tok, "t2", [story], text, transcripts)  # same audio: no new transcription
    assert calls == [3]
    assert [r.accuracy for r in rows] == [r.accuracy for r in again] and {r.condition for r in rows} == {"s2t", "s"}


def test_asr_recipe_reports_wer_and_cer_per_system(tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    from speechlm.data.manifest import Utterance, write_manifest

    texts = {"a": "the cat sat", "b": "a dog ran home"}
    heard = {16000: "the cat sad", 24000: "a dog ran home"}  # one character wrong in the first clip

    class FakeWhisper:  # "hears" a fixed transcript per clip length
        def __init__(self, folder, device):
            pass

        def transcribe(self, waves, batch_size):
            return [heard[w.numel()] for w in waves]

    rows = []
    for (uid, text), n in zip(texts.items(), heard):
        sf.write(tmp_path / f"{uid}.wav", np.zeros(n, dtype=np.float32), 16000)
        rows.append(Utterance(uid, f"{uid}.wav", 16000, n / 16000, text, "test"))
    write_manifest(tmp_path / "m.jsonl", rows)
    mod = recipe("eval_asr")
    monkeypatch.setattr(mod, "WhisperCascade", FakeWhisper)
    out = mod.main([f"manifest={tmp_path / 'm.jsonl'}", "whisper_baseline=true", f"out_dir={tmp_path / 'out'}"])
    (row,) = out["results"]
    assert row["system"] == "whisper" and row["n"] == 2
    assert row["wer"] == 1 / 7  # one word of seven
    assert row["cer"] == 1 / (len("the cat sat") + len("a dog ran home"))  # one character
    assert "| whisper | none | 2 | 14.3 | 4.0 |" in (tmp_path / "out" / "asr.md").read_text()


def test_eval_dtype_choice():
    import pytest
    import torch

    from speechlm.errors import ConfigError
    from speechlm.training.build import eval_dtype

    assert eval_dtype("auto", "cpu") == torch.float32  # CPU: fp32 unless asked
    assert eval_dtype("bf16", "cpu") == torch.bfloat16 and eval_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(ConfigError, match="float64"):
        eval_dtype("float64")


def test_storycloze_text_only_in_bf16_picks_the_same_endings(tmp_path):
    llm = saved_llm(tmp_path, {"sad": 4.0})
    data = tmp_path / "s.jsonl"
    ctx = ["tom was late .", "he ran to the bus .", "the bus had left .", "tom walked home ."]
    data.write_text(json.dumps({"id": "a", "context": ctx, "right_ending": "tom was sad .",
                                "wrong_ending": "tom was happy ."}) + "\n")
    out = recipe("eval_storycloze").main([f"llm={llm}", f"data={data}", "text_only=true", "dtype=bf16",
                                          "wrong_styles=[adversarial]", f"out_dir={tmp_path / 'out'}"])
    assert out["summary"] == {"text_acc": 1.0}
