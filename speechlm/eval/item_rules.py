"""The rules every item of the embedded evaluation sets follows, as checks that name the item they fail.

The sets (``data/storycloze_mini.jsonl`` and ``data/mmlu_mini/``) are rendered to speech at run time,
so their text must be plain and speakable, and their items must be well formed. The bounds below were
derived from the first 210 stories and 200 test + 40 dev questions (written 2026-11-23; observed ranges
in brackets) and then applied unchanged to the items added on 2026-12-04. No old item broke them.

Text (every context sentence, ending, question and option):

* only ASCII letters, single spaces and ``. , ' ? ! -``: no digits (numbers are written as words), no
  other symbols, no leading, trailing or doubled spaces;
* begins with a capital letter.

A story (one JSONL row):

* an ``id`` of the form ``sc-NNNN`` and ``wrong_style`` ``"adversarial"``;
* exactly four context sentences, each of 3-16 words [3-13], each ending in ``.``, ``!`` or ``?``;
* a right and a wrong ending of 4-16 words each [4-14 and 5-13], ending in ``.``, ``!`` or ``?``;
* the longer ending at most 2.0 times the words of the shorter [2.0: sc-0100's 14 / 7 words is the
  only story at the bound], so that length alone rarely gives the answer away;
* the two endings differ, and neither repeats a context sentence (compared without case).

A question (one CSV row ``question, A, B, C, D, answer``):

* exactly six fields; the question has 4-20 words [4-17] and ends in ``?``;
* four options of 1-6 words each [1-6], pairwise distinct (compared without case), none ending in
  sentence punctuation;
* the answer is one of the letters A, B, C, D.

Across a set: no repeated story id, no context sentence used in two stories, and no question asked
twice in the whole MMLU folder (every subject, test and dev; compared without case).

Every check returns a list of problems, each starting with the item's id (a story's ``id``; a
question's ``<split>/<subject>-<row>``); an empty list means the item or set follows the rules.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

CONTEXT_SENTENCES = 4
CONTEXT_WORDS = (3, 16)
ENDING_WORDS = (4, 16)
ENDING_RATIO = 2.0  # longer ending / shorter ending, in words
QUESTION_WORDS = (4, 20)
OPTION_WORDS = (1, 6)
LETTERS = ("A", "B", "C", "D")
STORY_ID = re.compile(r"sc-\d{4}")
_SPEAKABLE = re.compile(r"[A-Za-z.,'?! -]+")
_SENTENCE_END = (".", "!", "?")


def words(text: str) -> int:
    return len(text.split())


def text_problems(text: Any, what: str) -> list[str]:
    """Problems with one piece of text (``what`` names it in the messages)."""
    if not isinstance(text, str) or not text.strip():
        return [f"{what} is empty or not text"]
    bad = sorted(set(_SPEAKABLE.sub("", text)))
    out = []
    if bad:
        out.append(f"{what} has characters outside letters, spaces and . , ' ? ! -: {''.join(bad)!r}")
    if text != text.strip() or "  " in text:
        out.append(f"{what} has leading, trailing or doubled spaces")
    if not text.strip()[0].isupper():
        out.append(f"{what} does not begin with a capital letter")
    return out


def _sentence_problems(text: Any, what: str, bounds: tuple[int, int]) -> list[str]:
    out = text_problems(text, what)
    if not isinstance(text, str) or not text.strip():
        return out
    n = words(text)
    if not bounds[0] <= n <= bounds[1]:
        out.append(f"{what} has {n} words, outside {bounds[0]}-{bounds[1]}")
    if not text.rstrip().endswith(_SENTENCE_END):
        out.append(f"{what} does not end in . ! or ?")
    return out


def story_problems(row: Any) -> list[str]:
    """Problems with one story row (a dict as read from the JSONL); each message starts with its id."""
    if not isinstance(row, dict):
        return [f"story {row!r}: not a JSON object"]
    sid = row.get("id")
    name = str(sid) if isinstance(sid, str) and sid else "story without id"
    out = []
    if not (isinstance(sid, str) and STORY_ID.fullmatch(sid)):
        out.append("id is not of the form sc-NNNN")
    if row.get("wrong_style", "adversarial") != "adversarial":
        out.append(f"wrong_style is {row.get('wrong_style')!r}, not 'adversarial'")
    ctx = row.get("context")
    if not isinstance(ctx, list) or len(ctx) != CONTEXT_SENTENCES:
        n = len(ctx) if isinstance(ctx, list) else "no"
        out.append(f"has {n} context sentences, not {CONTEXT_SENTENCES}")
        ctx = ctx if isinstance(ctx, list) else []
    for i, s in enumerate(ctx, 1):
        out += _sentence_problems(s, f"context sentence {i}", CONTEXT_WORDS)
    right, wrong = row.get("right_ending"), row.get("wrong_ending")
    out += _sentence_problems(right, "right ending", ENDING_WORDS)
    out += _sentence_problems(wrong, "wrong ending", ENDING_WORDS)
    if isinstance(right, str) and isinstance(wrong, str) and right.strip() and wrong.strip():
        if right.strip().lower() == wrong.strip().lower():
            out.append("right and wrong ending are the same")
        ratio = max(words(right), words(wrong)) / min(words(right), words(wrong))
        if ratio > ENDING_RATIO:
            out.append(f"endings differ in length by {ratio:.2f}x ({words(right)} / {words(wrong)} words), "
                       f"more than {ENDING_RATIO}x")
        seen = {s.strip().lower() for s in ctx if isinstance(s, str)}
        for label, end in (("right", right), ("wrong", wrong)):
            if end.strip().lower() in seen:
                out.append(f"{label} ending repeats a context sentence")
    return [f"{name}: {p}" for p in out]


def question_problems(row: Sequence[Any], qid: str) -> list[str]:
    """Problems with one MMLU CSV row (its fields as read by ``csv.reader``); messages start with ``qid``."""
    if len(row) != 6:
        return [f"{qid}: has {len(row)} fields, not 6 (question, A, B, C, D, answer)"]
    question, options, answer = row[0], list(row[1:5]), row[5]
    out = text_problems(question, "question")
    if isinstance(question, str) and question.strip():
        n = words(question)
        if not QUESTION_WORDS[0] <= n <= QUESTION_WORDS[1]:
            out.append(f"question has {n} words, outside {QUESTION_WORDS[0]}-{QUESTION_WORDS[1]}")
        if not question.endswith("?"):
            out.append("question does not end in ?")
    for letter, opt in zip(LETTERS, options, strict=True):
        probs = text_problems(opt, f"option {letter}")
        if not probs:
            n = words(opt)
            if not OPTION_WORDS[0] <= n <= OPTION_WORDS[1]:
                probs.append(f"option {letter} has {n} words, outside {OPTION_WORDS[0]}-{OPTION_WORDS[1]}")
            if opt.endswith(_SENTENCE_END + (",",)):
                probs.append(f"option {letter} ends in punctuation")
        out += probs
    texts = [o.strip().lower() for o in options if isinstance(o, str)]
    if len(set(texts)) != len(texts):
        out.append("options are not four distinct texts")
    if answer not in LETTERS:
        out.append(f"answer {answer!r} is not one of A, B, C, D")
    return [f"{qid}: {p}" for p in out]


def story_set_problems(rows: Iterable[Any]) -> list[str]:
    """Every story's problems plus repeated ids and context sentences across the set."""
    out: list[str] = []
    ids: dict[str, int] = {}
    sentences: dict[str, str] = {}
    for k, row in enumerate(rows):
        out += story_problems(row)
        if not isinstance(row, dict):
            continue
        sid = str(row.get("id", f"row {k + 1}"))
        if sid in ids:
            out.append(f"{sid}: id repeated (rows {ids[sid]} and {k + 1})")
        ids.setdefault(sid, k + 1)
        ctx = row.get("context")
        for s in ctx if isinstance(ctx, list) else []:
            key = s.strip().lower() if isinstance(s, str) else ""
            if key and key in sentences and sentences[key] != sid:
                out.append(f"{sid}: context sentence {s!r} also in {sentences[key]}")
            sentences.setdefault(key, sid)
    return out


def question_set_problems(rows: Iterable[tuple[str, Sequence[Any]]]) -> list[str]:
    """Every question's problems (``(qid, row)`` pairs) plus any question asked twice."""
    out: list[str] = []
    asked: dict[str, str] = {}
    for qid, row in rows:
        out += question_problems(row, qid)
        if row and isinstance(row[0], str):
            key = " ".join(row[0].lower().split())
            if key in asked:
                out.append(f"{qid}: question also asked as {asked[key]}")
            asked.setdefault(key, qid)
    return out


# ------------------------------------------------------------------------------------- the shipped sets
def data_dir() -> Path:
    return Path(str(resources.files("speechlm.eval") / "data"))


def read_story_rows(path: str | Path) -> list[Any]:
    """The raw rows of a StoryCloze JSONL (unstripped, so that stray spaces are seen)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_question_rows(root: str | Path) -> list[tuple[str, list[str]]]:
    """``(qid, fields)`` for every row of ``root/{test,dev}/<subject>_<split>.csv``, unstripped."""
    out = []
    for split in ("test", "dev"):
        for f in sorted((Path(root) / split).glob(f"*_{split}.csv")):
            subject = f.name[: -len(f"_{split}.csv")]
            with open(f, encoding="utf-8", newline="") as fh:
                out += [(f"{split}/{subject}-{k}", row) for k, row in enumerate(csv.reader(fh), 1)]
    return out


def embedded_set_problems(root: str | Path | None = None) -> list[str]:
    """All rule problems of the shipped sets (or of a copy of the data folder at ``root``)."""
    root = Path(root) if root is not None else data_dir()
    return (story_set_problems(read_story_rows(root / "storycloze_mini.jsonl"))
            + question_set_problems(read_question_rows(root / "mmlu_mini")))
