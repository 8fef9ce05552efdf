"""Speech-MMLU: MMLU-format CSV loaders, a TTS builder, and 0/5-shot scoring by answer letter and by cloze.

CSV rows (no header, as in MMLU): ``question, A, B, C, D, answer`` with ``answer`` one of A-D; a folder
holds ``test/<subject>_test.csv`` and ``dev/<subject>_dev.csv`` (the dev split gives the 5-shot
exemplars). Prompts follow the MMLU convention::

    letter: "<header>[exemplars]<question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer:"  -> " A" / " B" / ...
    cloze:  "<header>[exemplars]Question: <question>\\nAnswer:"                       -> " <option text>"

Letter scoring compares the four letters' log-probs; cloze compares each option's length-normalised
log-likelihood. In the speech condition the exemplars stay text and the question (and, for letter
scoring, each option) is speech, between the same text labels ("A.", "Answer:").
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from speechlm.atomic import atomic_write_text
from speechlm.errors import ManifestError
from speechlm.eval.scoring import (
    SpeechFrontEnd,
    SpeechInput,
    aggregate,
    next_token_logprobs,
    rotation_partner,
    score_text,
    start_ids,
    text_ids,
)

LETTERS = ("A", "B", "C", "D")
METHODS = ("letter", "cloze")


@dataclass
class MCItem:
    id: str
    subject: str
    question: str
    options: list[str]  # four option texts, in letter order
    answer: int  # index of the right option


@dataclass
class SpokenMCItem:
    item: MCItem
    question: SpeechInput
    options: list[SpeechInput]
    voice: str = ""


def embedded_set_path() -> Path:
    """The MMLU-format mini set shipped with the package (8 subjects; see ``data/README.md``)."""
    return Path(str(resources.files("speechlm.eval") / "data" / "mmlu_mini"))


# ---------------------------------------------------------------------------------------- loaders
def read_mmlu_csv(path: str | Path, subject: str | None = None) -> list[MCItem]:
    """One MMLU CSV; a malformed row raises :class:`ManifestError` naming ``file:row``."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: MMLU CSV not found")
    subject = subject or path.stem.rsplit("_", 1)[0]
    items = []
    with open(path, encoding="utf-8", newline="") as f:
        for rowno, row in enumerate(csv.reader(f), 1):
            where = f"{path}:{rowno}"
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 6:
                raise ManifestError(f"{where}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
            fields = [c.strip() for c in row]
            if not all(fields[:5]):
                raise ManifestError(f"{where}: empty question or option")
            if fields[5].upper() not in LETTERS:
                raise ManifestError(f"{where}: answer must be one of A, B, C, D, got {fields[5]!r}")
            items.append(MCItem(f"{subject}-{rowno}", subject, fields[0], fields[1:5], LETTERS.index(fields[5].upper())))
    if not items:
        raise ManifestError(f"{path}: no questions")
    return items


def read_mmlu_folder(root: str | Path, split: str = "test", subjects: Sequence[str] | None = None
                     ) -> dict[str, list[MCItem]]:
    """``{subject: items}`` from ``root/<split>/<subject>_<split>.csv`` files."""
    folder = Path(root) / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise ManifestError(f"{folder}: no *_{split}.csv files")
    out = {}
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        if subjects is None or subject in subjects:
            out[subject] = read_mmlu_csv(f, subject)
    if subjects is not None and set(subjects) - set(out):
        raise ManifestError(f"{folder}: no CSV for subject(s) {', '.join(sorted(set(subjects) - set(out)))}")
    return out


# ---------------------------------------------------------------------------------------- prompts
def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def letter_block(item: MCItem) -> str:
    opts = "".join(f"\n{L}. {o}" for L, o in zip(LETTERS, item.options))
    return f"{item.question}{opts}\nAnswer:"


def cloze_block(item: MCItem) -> str:
    return f"Question: {item.question}\nAnswer:"


def exemplars(shots: Sequence[MCItem], method: str) -> str:
    if method == "letter":
        return "".join(f"{letter_block(x)} {LETTERS[x.answer]}\n\n" for x in shots)
    return "".join(f"{cloze_block(x)} {x.options[x.answer]}\n\n" for x in shots)


def continuations(tokenizer: Any, item: MCItem, method: str) -> list[list[int]]:
    """Token ids of the four options: the letters (`` A``) or the option texts (`` <text>``)."""
    if method == "letter":
        return [text_ids(tokenizer, " " + L) for L in LETTERS]
    return [text_ids(tokenizer, " " + o) for o in item.options]


def predict(option_logprobs: Sequence[torch.Tensor], method: str) -> int:
    """Letter: highest letter log-prob (summed); cloze: highest length-normalised option likelihood."""
    scoring = "summed" if method == "letter" else "length_norm"
    scores = [aggregate(lp, scoring) for lp in option_logprobs]
    return max(range(4), key=lambda k: (scores[k], -k))


# --------------------------------------------------------------------------------------- text eval
def eval_text(llm: torch.nn.Module, tokenizer: Any, test: dict[str, list[MCItem]], dev: dict[str, list[MCItem]] | None,
              method: str, shots: int = 0, batch_size: int = 8) -> dict[str, list[bool]]:
    """Text MMLU of the LLM alone: ``{subject: [correct per item]}``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    start = start_ids(tokenizer)
    out = {}
    for subject, items in test.items():
        ex = exemplars(_shots(dev, subject, shots), method)
        block = letter_block if method == "letter" else cloze_block
        prefixes, conts = [], []
        for it in items:
            pre = start + text_ids(tokenizer, header(subject) + ex + block(it))
            for c in continuations(tokenizer, it, method):
                prefixes.append(pre)
                conts.append(c)
        lp = score_text(llm, prefixes, conts, batch_size)
        out[subject] = [predict(lp[4 * k:4 * k + 4], method) == it.answer for k, it in enumerate(items)]
    return out


def _shots(dev: dict[str, list[MCItem]] | None, subject: str, shots: int) -> list[MCItem]:
    if shots == 0:
        return []
    pool = (dev or {}).get(subject, [])
    if len(pool) < shots:
        raise ManifestError(f"subject {subject!r}: {shots}-shot needs {shots} dev items, found {len(pool)}")
    return pool[:shots]


# ------------------------------------------------------------------------------------ speech build
def speak_items(items: Sequence[MCItem], voices: Sequence[str], rate_wpm: int = 175, sample_rate: int = 16000
                ) -> list[SpokenMCItem]:
    """Render each question and its four options with TTS (voice ``voices[i % n]``: an eSpeak name or
    ``"engine:name"``)."""
    from speechlm.data.tts import synthesize

    def say(text: str, uid: str, voice: str) -> SpeechInput:
        return SpeechInput(synthesize(text, voice=voice, rate_wpm=rate_wpm, sample_rate=sample_rate).wave, text, uid,
                           voice)

    out = []
    for i, it in enumerate(items):
        v = voices[i % len(voices)]
        out.append(SpokenMCItem(it, say(it.question, f"{it.id}-q", v),
                                [say(o, f"{it.id}-{L}", v) for o, L in zip(it.options, LETTERS)], v))
    return out


def build_speech_mmlu(csv_root: str | Path, out_dir: str | Path, voices: Sequence[str], split: str = "test",
                      rate_wpm: int = 175, sample_rate: int = 16000) -> Path:
    """Render ``csv_root/<split>/*.csv`` to ``out_dir/<split>/<subject>/*.wav`` + ``<subject>.jsonl``.

    Returns the split folder. Rows of the JSONL: the item, its voice and its five audio paths
    (relative to the JSONL), read back by :func:`read_speech_mmlu`.
    """
    from speechlm.data.audio import save_audio

    split_dir = Path(out_dir) / split
    for subject, items in read_mmlu_folder(csv_root, split).items():
        spoken = speak_items(items, voices, rate_wpm, sample_rate)
        rows = []
        for s in spoken:
            paths = []
            for part, inp in [("q", s.question)] + list(zip(LETTERS, s.options)):
                rel = f"{subject}/{s.item.id}-{part}.wav"
                save_audio(split_dir / rel, inp.wave, sample_rate)
                paths.append(rel)
            rows.append({"id": s.item.id, "subject": subject, "question": s.item.question,
                         "options": s.item.options, "answer": LETTERS[s.item.answer], "voice": s.voice,
                         "question_audio": paths[0], "option_audio": paths[1:]})
        atomic_write_text(split_dir / f"{subject}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return split_dir


def _speech_rows(split_dir: str | Path, subjects: Sequence[str] | None = None
                 ) -> dict[str, list[tuple[MCItem, str, dict, str]]]:
    """``{subject: [(item, voice, row, where)]}`` of a folder written by :func:`build_speech_mmlu` (one JSONL
    per subject; ``subjects``: only these files). A malformed row or an empty file raises naming it."""
    split_dir = Path(split_dir)
    files = sorted(split_dir.glob("*.jsonl"))
    if not files:
        raise ManifestError(f"{split_dir}: no <subject>.jsonl files")
    out: dict[str, list[tuple[MCItem, str, dict, str]]] = {}
    for f in files:
        if subjects is not None and f.stem not in subjects:
            continue
        rows = []
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{f}:{lineno}"
            try:
                r = json.loads(line)
                opts, ans, audio = r["options"], str(r["answer"]).upper(), r["option_audio"]
                if len(opts) != 4 or len(audio) != 4 or ans not in LETTERS:
                    raise ValueError("need 4 options, 4 option_audio and an answer letter")
                it = MCItem(str(r["id"]), str(r.get("subject", f.stem)), str(r["question"]), [str(o) for o in opts],
                            LETTERS.index(ans))
                if not it.question.strip() or not all(o.strip() for o in it.options):
                    raise ValueError("empty question or option")
                if not all(isinstance(a, str) and a for a in [r["question_audio"], *audio]):
                    raise ValueError("audio paths must be non-empty strings")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise ManifestError(f"{where}: malformed Speech-MMLU row ({e})") from None
            rows.append((it, str(r.get("voice", "")), r, where))
        if not rows:
            raise ManifestError(f"{f}: no questions")
        out[f.stem] = rows
    return out


def read_speech_mmlu_items(split_dir: str | Path, subjects: Sequence[str] | None = None) -> dict[str, list[MCItem]]:
    """The texts of a spoken set (question, options, answer of each row) without loading its audio: a
    spoken set carries its own texts, so it needs no MMLU CSV."""
    return {s: [it for it, *_ in rows] for s, rows in _speech_rows(split_dir, subjects).items()}


def read_speech_mmlu(split_dir: str | Path, sample_rate: int = 16000, subjects: Sequence[str] | None = None
                     ) -> dict[str, list[SpokenMCItem]]:
    """Read a folder written by :func:`build_speech_mmlu` (one JSONL per subject; ``subjects``: only these)."""
    from speechlm.data.audio import load_audio

    split_dir = Path(split_dir)
    out: dict[str, list[SpokenMCItem]] = {}
    for subject, rows in _speech_rows(split_dir, subjects).items():
        items = []
        for it, voice, r, where in rows:
            try:
                q = SpeechInput(load_audio(split_dir / r["question_audio"], sample_rate), it.question, f"{it.id}-q",
                                voice or None)
                o = [SpeechInput(load_audio(split_dir / a, sample_rate), t, f"{it.id}-{L}", voice or None)
                     for a, t, L in zip(r["option_audio"], it.options, LETTERS)]
            except (TypeError, ValueError) as e:
                raise ManifestError(f"{where}: malformed Speech-MMLU row ({e})") from None
            items.append(SpokenMCItem(it, q, o, voice))
        out[subject] = items
    return out


# ------------------------------------------------------------------------------------- speech eval
def other_question_partners(questions: Sequence[str]) -> list[int]:
    """For each question (the set in order, over all subjects), the index of the one whose question replaces it in
    the control (:func:`~speechlm.eval.scoring.rotation_partner`: half the set further on, mostly another subject's)
    or the next one after it whose text differs (word for word, ignoring outer spaces)."""
    n = len(questions)
    if n < 2:
        raise ValueError(f"another question needs at least two questions, got {n}")
    out = []
    for k, q in enumerate(questions):
        j = rotation_partner(n, k, lambda j, q=q: questions[j].strip() != q.strip())
        if j is None:
            raise ValueError(f"question {k} ({q!r}): every other question is the same text")
        out.append(j)
    return out


def _swap_questions(sets: dict[str, list[Any]], text_of: Callable[[Any], str]) -> dict[str, list[Any]]:
    """Each item (``question`` replaced) with its partner's question, the partners from ``text_of`` each item."""
    flat = [it for items in sets.values() for it in items]
    partners = iter(other_question_partners([text_of(it) for it in flat]))
    return {subject: [replace(it, question=flat[next(partners)].question) for it in items]
            for subject, items in sets.items()}


def other_questions(spoken: dict[str, list[SpokenMCItem]]) -> dict[str, list[SpokenMCItem]]:
    """Each item with another item's spoken question (:func:`other_question_partners`), its own options and
    answer kept.

    The ``speech_other`` control of Speech-MMLU: speech of the same kind (voices, lengths, the connector's own
    vectors) that asks something else. ``speech`` minus ``speech_other`` on the same items is what the *right*
    question's speech adds; a gain over no question that survives another question is not the question's content.
    """
    return _swap_questions(spoken, lambda it: it.item.question)


def other_question_texts(test: dict[str, list[MCItem]]) -> dict[str, list[MCItem]]:
    """The written twin of :func:`other_questions` (the same partners): each item's options after another item's
    question text, for the LLM alone. It says how much any question, not this one, lifts the options."""
    return _swap_questions(test, lambda it: it.question)


def eval_speech(model: Any, front: SpeechFrontEnd, test: dict[str, list[SpokenMCItem]],
                dev: dict[str, list[MCItem]] | None, method: str, shots: int = 0, batch_size: int = 4
                ) -> dict[str, list[bool]]:
    """Spoken question (and spoken options for letter scoring) after text exemplars."""
    from speechlm.models.speechlm import TextSegment

    tok = model.tokenizer
    start = start_ids(tok)
    out: dict[str, list[bool]] = {}
    for subject, items in test.items():
        ex = exemplars(_shots(dev, subject, shots), method)
        res: list[bool] = []
        for k in range(0, len(items), batch_size):
            chunk = items[k:k + batch_size]
            q = front.embed([s.question for s in chunk])
            prefixes = []
            if method == "letter":
                opts = front.embed([o for s in chunk for o in s.options])
                for j, s in enumerate(chunk):
                    segs: list[Any] = [TextSegment(start + text_ids(tok, header(subject) + ex)), q[j]]
                    for n, L in enumerate(LETTERS):
                        segs += [TextSegment(text_ids(tok, f"\n{L}.")), opts[4 * j + n]]
                    segs.append(TextSegment(text_ids(tok, "\nAnswer:")))
                    prefixes.append(segs)
            else:
                for j, s in enumerate(chunk):
                    prefixes.append([TextSegment(start + text_ids(tok, header(subject) + ex + "Question:")), q[j],
                                     TextSegment(text_ids(tok, "\nAnswer:"))])
            conts = [c for s in chunk for c in continuations(tok, s.item, method)]
            if all(len(c) == 1 for c in conts):  # answer letters: one pass, four candidates
                dist = next_token_logprobs(model, prefixes)  # (B, V)
                lp = [dist[j, conts[4 * j + n]] for j in range(len(chunk)) for n in range(4)]
            else:
                lp = model.score([p for p in prefixes for _ in range(4)], conts)
            res += [predict(lp[4 * j:4 * j + 4], method) == s.item.answer for j, s in enumerate(chunk)]
        out[subject] = res
    return out
