"""Speech-MMLU: CSV loader errors, prompts, letter and cloze scoring with a rigged LLM (text and speech)."""

import pytest
import torch

from speechlm.errors import ManifestError
from speechlm.eval import speech_mmlu as mm
from speechlm.eval.scoring import SpeechInput
from tests.eval_helpers import OracleFrontEnd, speech_model, unigram_llm, word_tokenizer

ROWS = ["what is two plus four ?,five,six,three,seven,B", "what color is the sky ?,red,green,blue,x,C"]


def write(tmp_path, split, subject, lines):
    (tmp_path / split).mkdir(parents=True, exist_ok=True)
    p = tmp_path / split / f"{subject}_{split}.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_read_folder_and_answers(tmp_path):
    write(tmp_path, "test", "maths", ROWS)
    items = mm.read_mmlu_folder(tmp_path, "test")["maths"]
    assert [it.answer for it in items] == [1, 2]
    assert items[0].options == ["five", "six", "three", "seven"] and items[0].subject == "maths"


@pytest.mark.parametrize("line, message", [
    ("q,a,b,c,A", "expected 6 fields"),
    ("q,a,b,c,d,E", "answer must be one of"),
    ("q,a,,c,d,A", "empty question or option"),
    ('"q,a,b,c,d,A', "expected 6 fields"),
])
def test_csv_loader_rejects_malformed_rows(tmp_path, line, message):
    p = write(tmp_path, "test", "maths", [ROWS[0], line])
    with pytest.raises(ManifestError, match=message) as e:
        mm.read_mmlu_csv(p)
    assert f"{p}:2" in str(e.value)


def test_missing_files_and_shots(tmp_path):
    with pytest.raises(ManifestError, match="no \\*_test.csv"):
        mm.read_mmlu_folder(tmp_path, "test")
    write(tmp_path, "test", "maths", ROWS)
    with pytest.raises(ManifestError, match="subject\\(s\\) art"):
        mm.read_mmlu_folder(tmp_path, "test", subjects=["art"])
    with pytest.raises(ManifestError, match="5-shot needs 5 dev items"):
        mm._shots({"maths": mm.read_mmlu_csv(tmp_path / "test" / "maths_test.csv")}, "maths", 5)


def test_prompts_follow_mmlu_convention():
    it = mm.MCItem("q1", "maths", "what is two plus four ?", ["five", "six", "three", "seven"], 1)
    assert mm.letter_block(it) == "what is two plus four ?\nA. five\nB. six\nC. three\nD. seven\nAnswer:"
    assert mm.exemplars([it], "letter").endswith("Answer: B\n\n")
    assert mm.exemplars([it], "cloze") == "Question: what is two plus four ?\nAnswer: six\n\n"


def rigged_items():
    # Right options: "six" (B) and "blue" (C); the rigged LLM prefers the word "six"/"blue" and letter B/C.
    return [mm.MCItem("q1", "maths", "what is two plus four ?", ["five", "six", "three", "seven"], 1),
            mm.MCItem("q2", "maths", "what color is the sky ?", ["red", "green", "blue", "x"], 2)]


@pytest.mark.parametrize("shots", [0, 1])
def test_rigged_llm_is_scored_right_in_text_and_speech(shots):
    tok = word_tokenizer()
    test = {"maths": rigged_items()}
    dev = {"maths": rigged_items()[:1]}
    for prefer, want in ([{"six": 3.0, "blue": 3.0, "B": 3.0, "C": 2.0}, [True, False]],  # letter: B beats C
                         [{"five": 3.0, "red": 3.0, "A": 3.0}, [False, False]]):
        llm = unigram_llm(tok, prefer)
        model = speech_model(llm, tok)
        front = OracleFrontEnd(model)
        spoken = {"maths": [mm.SpokenMCItem(it, SpeechInput(torch.zeros(10), it.question),
                                            [SpeechInput(torch.zeros(10), o) for o in it.options]) for it in test["maths"]]}
        cloze_want = [True, True] if "six" in prefer else [False, False]
        assert mm.eval_text(llm, tok, test, dev, "cloze", shots)["maths"] == cloze_want
        assert mm.eval_speech(model, front, spoken, dev, "cloze", shots)["maths"] == cloze_want
        assert mm.eval_text(llm, tok, test, dev, "letter", shots)["maths"] == want
        assert mm.eval_speech(model, front, spoken, dev, "letter", shots)["maths"] == want


def test_embedded_mmlu_set_shape():
    root = mm.embedded_set_path()
    test, dev = mm.read_mmlu_folder(root, "test"), mm.read_mmlu_folder(root, "dev")
    assert set(test) == set(dev) and len(test) >= 5
    assert len(test) == 8 and all(len(v) == 40 for v in test.values())  # 25 + 15 appended 2026-12-04
    assert all(len(v) >= 5 for v in dev.values())
    text = " ".join(it.question + " " + " ".join(it.options) for v in test.values() for it in v)
    assert not any(ch.isdigit() for ch in text)


def test_next_token_logprobs_equal_one_token_scores():
    from speechlm.eval.scoring import next_token_logprobs, start_ids, text_ids
    from speechlm.models.speechlm import TextSegment
    from tests.eval_helpers import tiny_llm

    tok = word_tokenizer()
    model = speech_model(tiny_llm(len(tok), seed=5), tok)
    front = OracleFrontEnd(model)
    speech = front.embed([SpeechInput(torch.zeros(1), "what is two plus four ?"), SpeechInput(torch.zeros(1), "a cat")])
    prefixes = [[TextSegment(start_ids(tok)), speech[0], TextSegment(text_ids(tok, "\nAnswer:"))],
                [TextSegment(start_ids(tok) + text_ids(tok, "tom was late")), speech[1]]]  # different lengths
    dist = next_token_logprobs(model, prefixes)
    letters = [text_ids(tok, " " + L) for L in mm.LETTERS]
    for b, p in enumerate(prefixes):
        want = torch.stack([x[0] for x in model.score([p] * 4, letters)])
        torch.testing.assert_close(dist[b, [c[0] for c in letters]], want, atol=1e-5, rtol=1e-5)


def spoken_item(subject: str, k: int, question: str) -> mm.SpokenMCItem:
    it = mm.MCItem(f"{subject}{k}", subject, question, ["five", "six", "three", "seven"], k % 4)
    return mm.SpokenMCItem(it, SpeechInput(torch.zeros(1), question, f"{subject}{k}-q"),
                           [SpeechInput(torch.zeros(1), o) for o in it.options])


def test_another_questions_speech_is_the_control_for_what_the_question_adds():
    spoken = {"maths": [spoken_item("maths", k, f"what is {w} ?") for k, w in enumerate(("two", "four", "six"))],
              "sky": [spoken_item("sky", 0, "what color is the sky ?")]}
    others = mm.other_questions(spoken)
    assert list(others) == ["maths", "sky"] and [len(v) for v in others.values()] == [3, 1]
    flat, got = [s for v in spoken.values() for s in v], [s for v in others.values() for s in v]
    # each item keeps its own text, options and answer; its question is the one half the set (two) further on
    assert [o.item for o in got] == [s.item for s in flat]
    assert all(o.options is s.options for o, s in zip(got, flat))
    assert [o.question for o in got] == [flat[2].question, flat[3].question, flat[0].question, flat[1].question]
    # the written twin: the same partners, the question text swapped, the rest of the item kept
    texts = mm.other_question_texts({s: [x.item for x in v] for s, v in spoken.items()})
    assert [t.question for v in texts.values() for t in v] == [o.question.text for o in got]
    assert [(t.id, t.options, t.answer) for v in texts.values() for t in v] == [
        (s.item.id, s.item.options, s.item.answer) for s in flat]
    # a partner asking the same question (word for word) is passed over for the next one
    same = {"maths": [spoken_item("maths", 0, "what is two ?"), spoken_item("maths", 1, "what is four ?"),
                      spoken_item("maths", 2, "what is two ?")]}
    assert [o.question.id for o in mm.other_questions(same)["maths"]] == ["maths1-q", "maths2-q", "maths1-q"]
    with pytest.raises(ValueError, match="at least two questions"):
        mm.other_questions({"maths": same["maths"][:1]})
    with pytest.raises(ValueError, match=r"question 0 \('what is two \?'\): every other question is the same text"):
        mm.other_questions({"maths": [same["maths"][0], same["maths"][2]]})
