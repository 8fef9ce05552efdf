"""The evaluation runs (speechlm.eval.run_*, behind recipes/eval_*.py) end to end on a tiny saved LLM: reports
and summary keys; one recipe run as a script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from speechlm.config import load_config
from speechlm.errors import ConfigError, ManifestError
from speechlm.eval import run_asr, run_speech_mmlu, run_storycloze
from speechlm.eval.report import wilson_interval
from tests.eval_helpers import fake_whisper, unigram_llm, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"eval_storycloze": (run_storycloze, run_storycloze.StoryClozeEvalConfig),
        "eval_speech_mmlu": (run_speech_mmlu, run_speech_mmlu.SpeechMMLUEvalConfig),
        "eval_asr": (run_asr, run_asr.ASREvalConfig)}


def text_entry(correct: int, n: int) -> dict:
    """The summary's text figures: accuracy, item count and its 95% Wilson interval."""
    return {"text_acc": pytest.approx(correct / n), "text_n": n, "text_ci95": list(wilson_interval(correct, n))}


def recipe(name):
    """The library module a recipe calls (monkeypatch its loaders here)."""
    return RUNS[name][0]


def run_recipe(name, overrides):
    """What ``recipes/<name>.py key=value ...`` does, in this process."""
    mod, cls = RUNS[name]
    return mod.run(load_config(cls, None, overrides))


def saved_llm(tmp_path, prefer):
    tok = word_tokenizer()
    folder = tmp_path / "llm"
    unigram_llm(tok, prefer).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


CONTEXT = ["tom was late .", "he ran to the bus .", "the bus had left .", "tom walked home ."]


def one_story(tmp_path) -> tuple[Path, Path]:
    """A saved LLM that prefers "sad" and a StoryCloze file of one story whose right ending is the sad one."""
    llm = saved_llm(tmp_path, {"sad": 4.0})
    data = tmp_path / "s.jsonl"
    data.write_text(json.dumps({"id": "a", "context": CONTEXT, "right_ending": "tom was sad .",
                                "wrong_ending": "tom was happy ."}) + "\n")
    return llm, data


def test_storycloze_recipe_text_only(tmp_path):
    llm = saved_llm(tmp_path, {"sad": 4.0})
    data = tmp_path / "s.jsonl"
    rows = [{"id": "a", "context": CONTEXT, "right_ending": "tom was sad .", "wrong_ending": "tom was happy ."},
            {"id": "b", "context": CONTEXT, "right_ending": "he was sad .", "wrong_ending": "he was very happy ."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"asr": {"wer": 0.5}}))
    out = run_recipe("eval_storycloze", [f"llm={llm}", f"data={data}", "text_only=true", "wrong_styles=[adversarial]",
                                          f"out_dir={tmp_path / 'out'}", f"summary={summary}"])
    # the text condition, and the endings alone (the unigram LLM prefers "sad" with or without the context)
    floor = {k: v for k, v in out["summary"].items() if k.startswith("endings_")}
    assert {k: v for k, v in out["summary"].items() if k not in floor} == text_entry(2, 2)
    assert (floor["endings_acc"], floor["endings_n"], floor["endings_vs_text"]["diff"]) == (1.0, 2, 0.0)
    assert json.loads(summary.read_text()) == {"asr": {"wer": 0.5}, "storycloze": out["summary"]}
    report = json.loads((tmp_path / "out" / "storycloze.json").read_text())
    assert {r["scoring"] for r in report["results"]} == {"summed", "length_norm"}
    assert {r["condition"] for r in report["results"]} == {"text", "endings"}
    assert all(r["accuracy"]["n"] == 2 for r in report["results"])
    assert (tmp_path / "out" / "storycloze.md").read_text().count("| storycloze/adversarial |") == 4


def test_storycloze_recipe_script_runs_text_only(tmp_path):
    """The recipe as the shell recipes call it: key=value overrides on the command line, report and summary."""
    llm, data = one_story(tmp_path)
    cmd = [sys.executable, str(ROOT / "recipes" / "eval_storycloze.py"), f"llm={llm}", f"data={data}", "text_only=true",
           "wrong_styles=[adversarial]", f"out_dir={tmp_path / 'out'}", f"summary={tmp_path / 'summary.json'}",
           "threads=1"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| storycloze/adversarial | text | llm |" in done.stdout
    assert "| storycloze/adversarial | endings | llm |" in done.stdout
    got = json.loads((tmp_path / "summary.json").read_text())["storycloze"]
    assert {k: v for k, v in got.items() if not k.startswith("endings_")} == text_entry(1, 1)
    assert (tmp_path / "out" / "storycloze.config.yaml").is_file()


def test_eval_configs_share_their_base_and_refuse_bad_values_on_load():
    from dataclasses import fields

    from speechlm.eval.config import EvalConfig, SpokenEvalConfig

    base = {f.name for f in fields(EvalConfig)}
    spoken = {f.name for f in fields(SpokenEvalConfig)}
    assert len(spoken) == 20 and base < spoken
    for _, cls in RUNS.values():
        assert base <= {f.name for f in fields(cls)}
    assert run_storycloze.StoryClozeEvalConfig().name == "storycloze" and run_asr.ASREvalConfig().name == "asr"
    with pytest.raises(ConfigError, match="boundaries must be one of free, forced"):
        load_config(run_storycloze.StoryClozeEvalConfig, None, ["boundaries=oracle"])
    with pytest.raises(ConfigError, match="wrong_styles"):
        load_config(run_storycloze.StoryClozeEvalConfig, None, ["wrong_styles=[silly]"])
    with pytest.raises(ConfigError, match="dtype"):
        load_config(run_asr.ASREvalConfig, None, ["dtype=float64"])


def test_speech_mmlu_recipe_text_only(tmp_path):
    llm = saved_llm(tmp_path, {"six": 3.0, "blue": 3.0})
    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        (tmp_path / "mmlu" / split / f"maths_{split}.csv").write_text(
            "what is two plus four ?,five,six,three,seven,B\nwhat color is the sky ?,red,green,blue,x,C\n")
    out = run_recipe("eval_speech_mmlu", [f"llm={llm}", f"data={tmp_path / 'mmlu'}", "text_only=true", "shots=[0,1]",
                                           f"out_dir={tmp_path / 'out'}", f"summary={tmp_path / 's.json'}"])
    floor = {k: v for k, v in out["summary"].items() if k.startswith("noquestion_")}
    assert {k: v for k, v in out["summary"].items() if k not in floor} == text_entry(2, 2)
    # the options alone: the rigged LLM prefers "six" and "blue" without the question too
    assert (floor["noquestion_acc"], floor["noquestion_n"], floor["noquestion_vs_text"]["diff"]) == (1.0, 2, 0.0)
    tasks = {(r["task"], r["condition"], r["scoring"]) for r in out["rows"]}
    assert ("speech_mmlu/all", "text_1shot", "letter") in tasks and ("speech_mmlu/maths", "text_0shot", "cloze") in tasks
    assert {("speech_mmlu/all", f"noquestion_{k}shot", m) for k in (0, 1) for m in ("cloze", "letter")} <= tasks
    out = run_recipe("eval_speech_mmlu", [f"llm={llm}", f"data={tmp_path / 'mmlu'}", "text_only=true", "shots=[0]",
                                           "no_question=false", f"out_dir={tmp_path / 'o2'}"])
    assert out["summary"] == text_entry(2, 2)


def test_storycloze_cascade_transcribes_each_waveform_once(tmp_path, monkeypatch):
    import torch

    from speechlm.eval import storycloze as sc
    from speechlm.eval.scoring import SpeechInput

    calls = fake_whisper(monkeypatch, lambda w: " ".join(["tom"] * w.numel()))  # a clip's length in words
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

    rows = []
    for (uid, text), n in zip(texts.items(), heard):
        sf.write(tmp_path / f"{uid}.wav", np.zeros(n, dtype=np.float32), 16000)
        rows.append(Utterance(uid, f"{uid}.wav", 16000, n / 16000, text, "test"))
    write_manifest(tmp_path / "m.jsonl", rows)
    fake_whisper(monkeypatch, lambda w: heard[w.numel()])  # a fixed transcript per clip length
    out = run_recipe("eval_asr", [f"manifest={tmp_path / 'm.jsonl'}", "whisper_baseline=true", f"out_dir={tmp_path / 'out'}"])
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
    llm, data = one_story(tmp_path)
    out = run_recipe("eval_storycloze", [f"llm={llm}", f"data={data}", "text_only=true", "dtype=bf16",
                                          "conditions=[text]", "wrong_styles=[adversarial]", f"out_dir={tmp_path / 'out'}"])
    assert out["summary"] == text_entry(1, 1)


# ------------------------------------------------------------------------------- per-engine breakdowns
def fake_front_end(monkeypatch, mod) -> list:
    """The recipe's connector loader replaced by the oracle front end (speech vectors = text embeddings); returns
    the front ends it makes (each lists the transcripts it embedded)."""
    from tests.eval_helpers import OracleFrontEnd, speech_model

    made = []

    def load(folder, llm, tok, *args):
        model = speech_model(llm, tok)
        made.append(OracleFrontEnd(model))
        return model, made[-1]

    monkeypatch.setattr(mod, "load_front_end", load)
    return made


def silent_wav(path, n=1600):
    import numpy as np
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(n, dtype=np.float32), 16000)
    return path.name


def test_storycloze_reports_every_spoken_figure_per_engine(tmp_path, monkeypatch):
    fake_whisper(monkeypatch, lambda w: "tom was sad .")
    llm = saved_llm(tmp_path, {"sad": 4.0})
    endings = [("tom was sad .", "tom was happy ."), ("he was sad .", "he was very happy ."),
               ("tom was happy .", "tom was sad .")]  # the third: the rigged LLM picks the wrong ending
    speakers = ["festival:ked_diphone/r175/p50", "en-us+m3/r175/p50", "festival:ked_diphone/r160/p40"]
    rows = []
    for k, ((right, wrong), spk) in enumerate(zip(endings, speakers)):
        audio = {f"{part}_audio": silent_wav(tmp_path / f"s{k}-{part}.wav", 1600 + 160 * j)
                 for j, part in enumerate(("context", "right", "wrong"))}
        rows.append({"id": f"s{k}", "context": CONTEXT, "right_ending": right, "wrong_ending": wrong, "speaker": spk, **audio})
    data = tmp_path / "spoken.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"asr": {"wer": 0.5}}))
    mod = recipe("eval_storycloze")
    fake_front_end(monkeypatch, mod)
    run_recipe("eval_storycloze", [f"llm={llm}", f"data={data}", "connectors=[x/conn]", "wrong_styles=[adversarial]",
                                   "cascade=true", "whisper=unused", f"out_dir={tmp_path / 'out'}", f"summary={summary}"])
    s = json.loads(summary.read_text())
    assert s["asr"] == {"wer": 0.5}
    sc_sum = s["storycloze"]
    assert {k: sc_sum[k] for k in ("text_acc", "s2t_acc", "s_acc")} == {"text_acc": 0.6667, "s2t_acc": 0.6667,
                                                                         "s_acc": 0.6667}
    # paired on the same 3 stories: the connector against the text and against the cascade
    assert sc_sum["s2t_n"] == 3 and sc_sum["s2t_vs_text"]["n"] == 3 and sc_sum["s2t_vs_cascade"]["n"] == 3
    assert sc_sum["s2t_vs_text"]["a_only"] + sc_sum["s2t_vs_text"]["b_only"] <= 3
    eng = sc_sum["by_engine"]
    assert sorted(eng) == ["espeak", "festival"]
    assert eng["festival"] == {"n": 2, "text_acc": 0.5, "s2t_acc": 0.5, "s_acc": 0.5, "cascade_s2t_acc": 0.5,
                               "cascade_s_acc": 0.0}  # the cascade hears both endings alike: a tie is wrong
    assert eng["espeak"]["n"] == 1 and eng["espeak"]["s2t_acc"] == 1.0
    report = json.loads((tmp_path / "out" / "storycloze.json").read_text())
    got = {(e, r["condition"], r["connector"], r["scoring"]): r["accuracy"]["n"]
           for e, rs in report["by_engine"].items() for r in rs}
    for cond, conn in [("text", "llm"), ("s2t", "x/conn"), ("s", "x/conn"), ("s2t", "cascade-whisper"),
                       ("s", "cascade-whisper")]:
        for scoring in ("summed", "length_norm"):
            assert got[("festival", cond, conn, scoring)] == 2 and got[("espeak", cond, conn, scoring)] == 1
    festival_s2t = next(r for r in report["by_engine"]["festival"] if r["condition"] == "s2t"
                        and r["connector"] == "x/conn" and r["scoring"] == "summed")
    assert festival_s2t["text_accuracy"]["n"] == 2 and festival_s2t["parity"] == 1.0
    assert "| festival | storycloze/adversarial | s2t | x/conn |" in (tmp_path / "out" / "storycloze.md").read_text()


MATHS_CSV = "what is two plus four ?,five,six,three,seven,B\nwhat color is the sky ?,red,green,blue,x,C\n"


def spoken_mmlu_set(root, subject, rows, split="test"):
    """A spoken Speech-MMLU folder in build_speech_mmlu's format: <split>/<subject>.jsonl + silent wavs."""
    lines = []
    for k, (q, opts, ans, voice) in enumerate(rows):
        qa = f"{subject}/{k}-q.wav"
        silent_wav(root / split / qa)
        oa = []
        for L in "ABCD":
            silent_wav(root / split / f"{subject}/{k}-{L}.wav")
            oa.append(f"{subject}/{k}-{L}.wav")
        lines.append(json.dumps({"id": f"{subject}-{k}", "subject": subject, "question": q, "options": opts,
                                 "answer": ans, "voice": voice, "question_audio": qa, "option_audio": oa}))
    (root / split / f"{subject}.jsonl").write_text("\n".join(lines) + "\n")
    return root


ASTRO = [("what color is the sky ?", ["red", "green", "blue", "x"], "C", "festival:ked_diphone"),
         ("what is two plus four ?", ["five", "six", "three", "seven"], "B", "en-us+m3"),
         ("what is two plus four ?", ["six", "five", "three", "seven"], "B", "festival:ked_diphone")]


def test_speech_mmlu_spoken_set_carries_its_own_texts(tmp_path, monkeypatch):
    """The defect: speech=FOLDER with a subject the CSV data lacks was dropped, speech accuracy "n/a" over 0."""
    llm = saved_llm(tmp_path, {"six": 3.0, "blue": 3.0})
    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        (tmp_path / "mmlu" / split / f"maths_{split}.csv").write_text(MATHS_CSV)
    speech = spoken_mmlu_set(tmp_path / "speech", "astro", ASTRO)
    mod = recipe("eval_speech_mmlu")
    fake_front_end(monkeypatch, mod)
    common = [f"llm={llm}", f"data={tmp_path / 'mmlu'}", f"speech={speech}", "methods=[cloze]"]
    out = run_recipe("eval_speech_mmlu", common + ["connectors=[x/conn]", "shots=[0]", f"out_dir={tmp_path / 'out'}",
                             f"summary={tmp_path / 's.json'}"])
    # right, right, wrong: the rigged LLM prefers "six" and "blue" in text and in speech alike
    assert out["summary"]["text_acc"] == pytest.approx(2 / 3) and out["summary"]["speech_acc_0shot"] == pytest.approx(2 / 3)
    tasks = {(r["task"], r["condition"]): r["accuracy"]["n"] for r in out["rows"]}
    assert tasks[("speech_mmlu/astro", "speech_0shot")] == 3 and tasks[("speech_mmlu/astro", "text_0shot")] == 3
    assert ("speech_mmlu/maths", "text_0shot") not in tasks  # the spoken set's subjects are evaluated
    s = json.loads((tmp_path / "s.json").read_text())["speech_mmlu"]
    assert s["by_engine"] == {"espeak": {"n": 1, "text_acc": 1.0, "speech_acc_0shot": 1.0},
                              "festival": {"n": 2, "text_acc": 0.5, "speech_acc_0shot": 0.5}}
    assert "n/a" not in (tmp_path / "out" / "speech_mmlu.md").read_text()
    # text only: the spoken set's texts, no audio needed
    assert s["speech_0shot_vs_noquestion"]["diff"] == 0.0  # the unigram LLM ignores the question, spoken or not
    out = run_recipe("eval_speech_mmlu", common + ["text_only=true", "shots=[0]", "no_question=false",
                                                   f"out_dir={tmp_path / 'o2'}"])
    assert out["summary"] == text_entry(2, 3)
    # a listed subject missing from both the spoken set and the CSVs: an error naming it
    with pytest.raises(ManifestError, match="subject\\(s\\) art, geo: in neither"):
        run_recipe("eval_speech_mmlu", common + ["subjects=[astro,art,geo]", "shots=[0]", "text_only=true", f"out_dir={tmp_path / 'o3'}"])
    # k-shot exemplars: none for astro in data/dev: an error naming it; the spoken set's own dev split works
    with pytest.raises(ManifestError, match="1-shot needs 1 exemplars.*astro"):
        run_recipe("eval_speech_mmlu", common + ["shots=[0,1]", "text_only=true", f"out_dir={tmp_path / 'o4'}"])
    spoken_mmlu_set(speech, "astro", ASTRO[:1], split="dev")
    out = run_recipe("eval_speech_mmlu", common + ["connectors=[x/conn]", "shots=[0,1]", f"out_dir={tmp_path / 'o5'}"])
    assert out["summary"]["speech_acc_1shot"] == pytest.approx(2 / 3)


def test_speech_mmlu_listed_csv_subject_beside_a_spoken_set(tmp_path):
    """A listed subject only the CSVs hold is evaluated from them (text here), beside the spoken one."""
    llm = saved_llm(tmp_path, {"six": 3.0, "blue": 3.0})
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "maths_test.csv").write_text(MATHS_CSV)
    speech = spoken_mmlu_set(tmp_path / "speech", "astro", ASTRO)
    out = run_recipe("eval_speech_mmlu", [f"llm={llm}", f"data={tmp_path / 'mmlu'}", f"speech={speech}", "text_only=true",
                                           "subjects=[astro,maths]", "shots=[0]", "methods=[cloze]",
                                           f"out_dir={tmp_path / 'out'}"])
    tasks = {(r["task"], r["condition"]): r["accuracy"]["n"] for r in out["rows"]}
    assert tasks[("speech_mmlu/astro", "text_0shot")] == 3 and tasks[("speech_mmlu/maths", "text_0shot")] == 2


def test_spoken_mmlu_reader_rejects_an_empty_subject(tmp_path):
    from speechlm.eval import speech_mmlu as mm

    speech = spoken_mmlu_set(tmp_path / "speech", "astro", ASTRO)
    items = mm.read_speech_mmlu(speech / "test")["astro"]
    assert [s.voice for s in items] == ["festival:ked_diphone", "en-us+m3", "festival:ked_diphone"]
    assert items[0].question.speaker == "festival:ked_diphone" and items[0].item.answer == 2
    (speech / "test" / "empty.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="empty.jsonl: no questions"):
        mm.read_speech_mmlu_items(speech / "test")


def test_storycloze_control_with_another_storys_speech_is_reported_and_paired(tmp_path, monkeypatch):
    """conditions=[..., s2t_other]: rows for the connector, and the summary's paired gain of the right story's
    speech over another story's (here the bigram LLM is right only after its own story's last word)."""
    from tests.eval_helpers import bigram_llm

    tok = word_tokenizer()
    folder = tmp_path / "llm"
    bigram_llm(tok, {"cat": "sad", "dog": "happy"}).save_pretrained(folder)
    tok.save_pretrained(folder)
    ctx = ["tom was late .", "he ran to the bus .", "the bus had left ."]
    rows = []
    for k, (animal, right, wrong) in enumerate((("cat", "sad .", "happy ."), ("dog", "happy ?", "sad ?"))):
        audio = {f"{part}_audio": silent_wav(tmp_path / f"s{k}-{part}.wav") for part in ("context", "right", "wrong")}
        rows.append({"id": animal, "context": ctx + [f"tom walked home to the {animal}"], "right_ending": right,
                     "wrong_ending": wrong, "speaker": "en-us+m3/r175/p50", **audio})
    data = tmp_path / "spoken.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = tmp_path / "summary.json"
    mod = recipe("eval_storycloze")
    fronts = fake_front_end(monkeypatch, mod)
    fake_whisper(monkeypatch, lambda w: "tom was late .")  # the cascade beside the connector: the control has no
    # cascade row to compare with
    run_recipe("eval_storycloze", [f"llm={folder}", f"data={data}", "connectors=[x/conn]", "wrong_styles=[adversarial]",
                                   "conditions=[text,endings,s2t,s2t_other]", "cascade=true", "whisper=unused",
                                   f"out_dir={tmp_path / 'out'}", f"summary={summary}"])
    s = json.loads(summary.read_text())["storycloze"]
    assert (s["s2t_acc"], s["s2t_other_acc"], s["s2t_other_n"]) == (1.0, 0.0, 2)
    assert s["s2t_vs_s2t_other"]["diff"] == 1.0 and s["s2t_vs_s2t_other"]["n"] == 2
    assert s["s2t_other_vs_endings"]["n"] == 2
    report = json.loads((tmp_path / "out" / "storycloze.json").read_text())
    assert {(r["condition"], r["connector"]) for r in report["results"]} == {
        ("text", "llm"), ("endings", "llm"), ("s2t", "x/conn"), ("s2t_other", "x/conn"), ("s2t", "cascade-whisper"),
        ("s", "cascade-whisper")}
    assert "s2t_other_vs_cascade" not in s and s["s2t_vs_cascade"]["n"] == 2
    # the control reuses the contexts' vectors: each spoken context went through the front end once
    assert sorted(t for f in fronts for t in f.embedded) == sorted(" ".join(r["context"]) for r in rows)


def test_speech_mmlu_control_with_another_questions_speech_is_reported_and_paired(tmp_path, monkeypatch):
    """other_question=true: speech_other rows for the connector, the summary's paired figures, and every question
    and option embedded once for all methods, shots and the control."""
    llm = saved_llm(tmp_path, {"six": 3.0, "blue": 3.0, "B": 3.0})
    speech = spoken_mmlu_set(tmp_path / "speech", "astro", ASTRO)
    spoken_mmlu_set(speech, "astro", ASTRO[:1], split="dev")
    fronts = fake_front_end(monkeypatch, recipe("eval_speech_mmlu"))
    out = run_recipe("eval_speech_mmlu", [f"llm={llm}", f"data={tmp_path / 'none'}", f"speech={speech}",
                                          "connectors=[x/conn]", "shots=[0,1]", "other_question=true",
                                          f"out_dir={tmp_path / 'out'}", f"summary={tmp_path / 's.json'}"])
    s = json.loads((tmp_path / "s.json").read_text())["speech_mmlu"]
    # the unigram LLM ignores the question: another question's speech scores as the right one's, item by item
    assert s["speech_other_acc_0shot"] == s["speech_acc_0shot"] == 0.6667 and s["speech_other_0shot_n"] == 3
    for k in (0, 1):
        assert s[f"speech_{k}shot_vs_speech_other"]["n"] == 3 and s[f"speech_{k}shot_vs_speech_other"]["diff"] == 0.0
        assert s[f"speech_other_{k}shot_vs_noquestion"]["n"] == 3
    assert s["by_engine"]["festival"]["speech_other_acc_0shot"] == 0.5
    # the written twin: the LLM alone after another question's text (the unigram LLM: the same answers again)
    assert s["text_other_acc"] == s["text_acc"] and s["text_other_vs_noquestion"]["n"] == 3
    assert {(r["condition"], r["scoring"]) for r in out["rows"] if r["condition"].startswith("text_other")} == {
        (f"text_other_{k}shot", m) for k in (0, 1) for m in ("cloze", "letter")}
    conds = {(r["condition"], r["scoring"]) for r in out["rows"] if r["connector"] == "x/conn"}
    assert conds == {(f"{c}_{k}shot", m) for c in ("speech", "speech_other") for k in (0, 1) for m in ("cloze", "letter")}
    (front,) = fronts
    texts = [q for q, *_ in ASTRO] + [o for _, opts, *_ in ASTRO for o in opts]
    assert sorted(front.embedded) == sorted(texts)  # 3 questions and 12 options, each once
