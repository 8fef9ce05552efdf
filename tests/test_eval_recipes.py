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
