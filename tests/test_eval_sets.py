"""The embedded evaluation sets: every shipped item follows the rules of speechlm.eval.item_rules, the old
items are unchanged (the sets only grow by appending), and the checker names a bad item of each kind."""

import hashlib
import shutil

import pytest

from speechlm.eval import item_rules as rules
from speechlm.eval import speech_mmlu as mm
from speechlm.eval import storycloze as sc

STORY = {"id": "sc-0001", "context": ["Tom woke up late on Monday.", "He ran to the bus stop.",
                                      "The bus had already left.", "He had to walk to work."],
         "right_ending": "Tom arrived at work an hour late.", "wrong_ending": "Tom was early for once that day.",
         "wrong_style": "adversarial"}
QUESTION = ["What is two plus two?", "Five", "Four", "Six", "Three", "B"]

# sha256 of the first 210 lines of storycloze_mini.jsonl and of the first 25 rows of each test CSV
# (sorted by file name), as committed before the 2026-12-04 additions: the old items must never change.
OLD_STORIES_SHA = "b880af16ffabfab96810e1d31776a6799b90c2180af50361ec53434cf92d6773"
OLD_TEST_QUESTIONS_SHA = "e78c5518ad09ed0dea342c952c88e052297a8196f7d03cd7f49c9b3dda4eedb7"


def test_every_shipped_item_follows_the_rules():
    assert rules.embedded_set_problems() == []


def test_shipped_counts_through_the_loaders():
    stories = sc.read_story_items(sc.embedded_set_path())
    assert len(stories) == 310 and [s.id for s in stories] == [f"sc-{k:04d}" for k in range(1, 311)]
    test = mm.read_mmlu_folder(mm.embedded_set_path(), "test")
    dev = mm.read_mmlu_folder(mm.embedded_set_path(), "dev")
    assert len(test) == 8 and {len(v) for v in test.values()} == {40}
    assert set(dev) == set(test) and {len(v) for v in dev.values()} == {5}


def test_old_items_are_unchanged():
    root = rules.data_dir()
    lines = (root / "storycloze_mini.jsonl").read_bytes().splitlines(keepends=True)[:210]
    assert hashlib.sha256(b"".join(lines)).hexdigest() == OLD_STORIES_SHA
    digest = hashlib.sha256()
    for f in sorted((root / "mmlu_mini" / "test").glob("*_test.csv")):
        digest.update(b"".join(f.read_bytes().splitlines(keepends=True)[:25]))
    assert digest.hexdigest() == OLD_TEST_QUESTIONS_SHA


def test_good_items_and_items_at_the_bounds_pass():
    assert rules.story_problems(STORY) == []
    at_bounds = {**STORY, "context": ["He ran fast.", " ".join(["Word"] * 15) + ".", *STORY["context"][2:]],
                 "right_ending": "One two three four five six seven eight.", "wrong_ending": "Tom was very late."}
    assert rules.story_problems(at_bounds) == []  # 3 and 16 words; endings 8 / 4 words: ratio 2.0
    assert rules.question_problems(QUESTION, "q") == []
    assert rules.question_problems(["Is it, or isn't it - really?", "Yes it is", "No", "Maybe so", "Not at all",
                                    "A"], "q") == []


def story(**change):
    return {**STORY, **change}


def ctx(i, text):
    c = list(STORY["context"])
    c[i] = text
    return c


@pytest.mark.parametrize("row, message", [
    (story(context=ctx(0, "Tom woke up at 7 on Monday.")), "context sentence 1 has characters outside"),
    (story(right_ending="Tom arrived at work & was late."), "right ending has characters outside"),
    (story(wrong_ending="Tom was early for once; really."), "wrong ending has characters outside"),
    (story(context=ctx(1, "He ran to the  bus stop.")), "context sentence 2 has leading, trailing or doubled"),
    (story(context=ctx(2, "the bus had already left.")), "context sentence 3 does not begin with a capital"),
    (story(context=ctx(3, "He walked.")), "context sentence 4 has 2 words, outside 3-16"),
    (story(context=ctx(0, " ".join(["Word"] * 17) + ".")), "context sentence 1 has 17 words, outside 3-16"),
    (story(context=ctx(0, "Tom woke up late on Monday")), "context sentence 1 does not end in"),
    (story(context=STORY["context"][:3]), "has 3 context sentences, not 4"),
    (story(context=STORY["context"] + ["He sighed."]), "has 5 context sentences, not 4"),
    (story(context="Tom woke up late."), "has no context sentences, not 4"),
    (story(right_ending="Tom was late."), "right ending has 3 words, outside 4-16"),
    (story(wrong_ending=" ".join(["Word"] * 17) + "."), "wrong ending has 17 words, outside 4-16"),
    (story(right_ending="Tom arrived at work more than an hour late and his boss was not at all pleased."),
     "endings differ in length"),
    (story(wrong_ending="Tom arrived at work an hour late."), "right and wrong ending are the same"),
    (story(wrong_ending="He had to walk to work."), "wrong ending repeats a context sentence"),
    (story(right_ending=""), "right ending is empty or not text"),
    (story(id="story-1"), "id is not of the form sc-NNNN"),
    (story(wrong_style="random"), "wrong_style is 'random'"),
])
def test_a_bad_story_is_named(row, message):
    problems = rules.story_problems(row)
    assert any(p.startswith(f"{row['id']}: ") and message in p for p in problems), problems


@pytest.mark.parametrize("row, message", [
    (["What is two plus two?", "Five", "Four", "Six", "B"], "has 5 fields, not 6"),
    (["What is 2 plus 2?", "Five", "Four", "Six", "Three", "B"], "question has characters outside"),
    (["What is two plus two", "Five", "Four", "Six", "Three", "B"], "question does not end in ?"),
    (["Two plus two?", "Five", "Four", "Six", "Three", "B"], "question has 3 words, outside 4-20"),
    ([" ".join(["Word"] * 20) + " now?", "Five", "Four", "Six", "Three", "B"], "question has 21 words"),
    (["What is two plus two?", "Five", "4", "Six", "Three", "B"], "option B has characters outside"),
    (["What is two plus two?", "Five", "Four", "six", "Three", "B"], "option C does not begin with a capital"),
    (["What is two plus two?", "Five", "Four", "Six", "Three.", "B"], "option D ends in punctuation"),
    (["What is two plus two?", "It is five or so I think", "Four", "Six", "Three", "B"], "option A has 7 words"),
    (["What is two plus two?", "Five", "Four", "Six", "four", "B"], "options are not four distinct texts"),
    (["What is two plus two?", "Five", "Four", "Six", "Three", "E"], "answer 'E' is not one of A, B, C, D"),
    (["What is two plus two?", "Five", "Four", "Six", "Three", "b"], "answer 'b' is not one of"),
])
def test_a_bad_question_is_named(row, message):
    problems = rules.question_problems(row, "test/maths-7")
    assert any(p.startswith("test/maths-7: ") and message in p for p in problems), problems


def test_repeats_across_a_set_are_named():
    again = story(id="sc-0002", right_ending="Tom took a taxi to work.", wrong_ending="Tom stayed in bed.")
    other = story(id="sc-0001", context=["Ann baked a cake.", "It rose well.", "She iced it.", "It looked fine."])
    problems = rules.story_set_problems([STORY, again, other])
    assert any(p.startswith("sc-0002: context sentence") and "also in sc-0001" in p for p in problems)
    assert any(p.startswith("sc-0001: id repeated") for p in problems)
    asked = rules.question_set_problems([("test/maths-1", QUESTION), ("dev/sums-3", ["What is two plus  two?"] +
                                                                     QUESTION[1:])])
    assert any(p.startswith("dev/sums-3: question also asked as test/maths-1") for p in asked)


def test_a_broken_copy_of_the_shipped_sets_is_caught(tmp_path):
    shutil.copytree(rules.data_dir(), tmp_path / "data")
    with open(tmp_path / "data" / "mmlu_mini" / "test" / "science_test.csv", "a", encoding="utf-8") as f:
        f.write("What planet is this?,Mars,Mars,Venus,Earth,A\r\n")
    with open(tmp_path / "data" / "storycloze_mini.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "sc-0311", "context": ["A.", "B.", "C.", "D."], "right_ending": "x", "wrong_ending": "x"}\n')
    problems = rules.embedded_set_problems(tmp_path / "data")
    assert any(p.startswith("test/science-41: options are not four distinct") for p in problems)
    assert any(p.startswith("sc-0311: context sentence 1 has 1 words") for p in problems)
