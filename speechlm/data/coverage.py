"""Lexical coverage: which words a text holds, how much of an evaluation set's vocabulary the training text
covers, and the greedy choice of training sentences that cover the most frequent English words."""

from __future__ import annotations

import csv
import heapq
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from speechlm.data.text_sources import CorpusError, read_text

#: The general-English words that coverage selection aims at (wordfreq's most frequent, lower case),
#: and how many training sentences each should occur in.
COVERAGE_TOP_WORDS = 8000
COVERAGE_DEPTH = 2

# Rough speech duration per character at 175 wpm, used only to plan how many sentences fill H hours.
_S_PER_CHAR_175 = 0.0535  # measured on the default corpus
_MARGINS_S = 0.25

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def word_types(texts: Iterable[str]) -> set[str]:
    """Lower-cased word types (letters and inner apostrophes) of some texts."""
    return {w for t in texts for w in _WORD.findall(t.lower())}


def vocabulary_coverage(train_texts: Iterable[str], eval_texts: Iterable[str]) -> float:
    """Share of the evaluation texts' word types that occur in the training texts."""
    eval_types = word_types(eval_texts)
    if not eval_types:
        raise CorpusError("vocabulary_coverage: the evaluation texts have no words")
    return len(eval_types & word_types(train_texts)) / len(eval_types)


#: Everyday words to measure coverage against while no evaluation set exists (not used to build text).
EVERYDAY_WORDS = """
about after again all always am and angry animal another answer apple asked ate away baby back bad
bag ball bank bathroom beach beautiful bed bedroom before began behind best better bicycle big bird
birthday black blue boat body book bored bottle bought box boy bread breakfast bring brother brought
brown bus busy buy cake called came can car card careful carried cat caught chair change cheap cheese
chicken child children chocolate church city class clean clock close clothes coat coffee cold come
computer cook cookie cool couch could country cried cup cut dad dance dark daughter day dear decided
delicious dinner doctor dog door down dream dress drink drive dropped dry early eat egg empty end
enjoyed evening every excited eyes face family far farm fast father favorite felt few field finally
find fine finished fire first fish floor flower fly food foot forgot found friend friends fruit full
fun funny game garden gave girl glad glass go good got grandma grass great green grew hair half hand
happy hard hat head heard help her here him his holiday home homework horse hospital hot hour house
hungry hurt ice idea inside job juice just keep key kid kitchen knew lake large last late laughed
learn left leg letter library life light liked listen little live long looked lost loud love lunch
mad made mail make man many market meal meet milk minute mom money month morning mother movie much
music name need neighbor nervous never new next nice night noise nothing now office old once open
orange outside paid paint paper parents park party pay pen people person phone picture pie pizza
place plan plant play played please pocket police poor pretty problem proud puppy put quickly quiet
rain ran read ready red remember rest restaurant rich ride river road room ruined run sad said salad
sandwich sat saw school sea second see sell sent shirt shoes shop short sick sister sit sky sleep
slept slowly small smile snow soccer son song soon sorry soup spent sport spring started stayed
store story street strong student studied summer sun surprised sweet swim table talk tall taught tea
teacher team test thanked tired today together told tomorrow tonight took town toy train tree tried
trip truck turned ugly umbrella uncle understand upset used vacation visit wait walked wall wanted
warm wash watched water weather week weekend went wet white wife win window winter wished woke
woman won wore work worried write wrong yard year yellow yesterday young
""".split()  # noqa: SIM905 (a word list reads better as text)


_NON_TEXT_KEYS = {"id", "label", "answer", "split", "subject", "wrong_style", "source"}


def _json_strings(obj: object) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for x in obj:
            yield from _json_strings(x)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in _NON_TEXT_KEYS:
                yield from _json_strings(v)


def read_eval_texts(eval_dir: Path) -> list[str]:
    """The question/story strings of the evaluation sets in ``eval_dir``: string fields of .jsonl/.json
    rows (ids and labels left out) and .csv cells (the final answer-letter column left out)."""
    texts: list[str] = []
    for path in sorted(eval_dir.rglob("*")):
        if path.suffix == ".jsonl":
            texts += [s for line in read_text(path).splitlines() if line.strip()
                      for s in _json_strings(json.loads(line))]
        elif path.suffix == ".json":
            texts += list(_json_strings(json.loads(read_text(path))))
        elif path.suffix == ".csv":
            for row in csv.reader(read_text(path).splitlines()):
                if row and re.fullmatch(r"[A-Z]", row[-1].strip()):
                    row = row[:-1]
                texts += row
        elif path.suffix == ".txt":
            texts += read_text(path).splitlines()
    return [t for t in texts if t.strip()]


def eval_texts_or_everyday(eval_dir: Path | None = None) -> tuple[list[str], str]:
    """Texts of the evaluation sets under ``speechlm/eval/data``, or the built-in
    :data:`EVERYDAY_WORDS` list when there are none; returns (texts, what they are)."""
    eval_dir = eval_dir or Path(__file__).resolve().parents[1] / "eval" / "data"
    texts = read_eval_texts(eval_dir) if eval_dir.is_dir() else []
    if texts:
        return texts, f"evaluation sets under {eval_dir} ({len(word_types(texts))} word types)"
    return [" ".join(EVERYDAY_WORDS)], f"built-in everyday word list ({len(EVERYDAY_WORDS)} words; no eval data yet)"



def estimate_speech_s(text: str, rate_wpm: int) -> float:
    """Rough seconds of speech ``text`` takes at ``rate_wpm`` (with the clip's margins): for planning only."""
    return len(text) * _S_PER_CHAR_175 * 175 / rate_wpm + _MARGINS_S


def coverage_targets(top_n: int = COVERAGE_TOP_WORDS) -> set[str]:
    """The ``top_n`` most frequent English words (wordfreq), letters and inner apostrophes only."""
    try:
        import wordfreq
    except ImportError:
        raise CorpusError("the wordfreq package is missing (pip install wordfreq): it chooses training "
                          "sentences for lexical coverage") from None
    return {w for w in wordfreq.top_n_list("en", top_n) if _WORD.fullmatch(w)}


def select_for_coverage(pool: list[str], targets: set[str], budget_s: float, depth: int = COVERAGE_DEPTH,
                        rate_wpm: int = 175) -> list[int]:
    """Indices of ``pool`` sentences chosen greedily to cover ``targets``, each word ``depth`` times.

    A sentence's gain is how many still-needed target-word occurrences it adds, per estimated second
    of speech; lazy greedy (a max-heap of stale gains, re-scored on pop) keeps it fast. Stops when
    ``budget_s`` is filled or nothing is gained. Deterministic (ties go to the lower index).
    """
    need = dict.fromkeys(targets, depth)
    words = [Counter(w for w in _WORD.findall(t.lower()) if w in need) for t in pool]
    cost = [estimate_speech_s(t, rate_wpm) for t in pool]

    def gain(i: int) -> float:
        return sum(min(need[w], c) for w, c in words[i].items()) / cost[i]

    heap = [(-gain(i), i) for i in range(len(pool)) if words[i]]
    heapq.heapify(heap)
    chosen, used_s = [], 0.0
    while heap and used_s < budget_s:
        _, i = heapq.heappop(heap)
        g = gain(i)
        if g <= 0:
            continue
        if heap and g < -heap[0][0] - 1e-12:  # stale: re-insert with its current gain
            heapq.heappush(heap, (-g, i))
            continue
        chosen.append(i)
        used_s += cost[i]
        for w, c in words[i].items():
            need[w] = max(0, need[w] - c)
    return chosen
