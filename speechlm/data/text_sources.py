"""Where the corpus's sentences come from: offline text sources (WordNet's usage examples, generated everyday
narrative sentences, gensim's test data: news, a Wikipedia dump, movie reviews) or any text files, each read
into speakable English sentences."""

from __future__ import annotations

import bz2
import html
import importlib.util
import logging
import random
import re
from collections.abc import Iterable
from pathlib import Path

from speechlm.data.text import normalize_for_speech, speakable_sentences
from speechlm.errors import SpeechLMError

log = logging.getLogger(__name__)


class CorpusError(SpeechLMError):
    """A text source is missing or yields no speakable sentence."""



def gensim_test_data() -> Path:
    """gensim's test_data folder (gensim is installed only for these files; it is not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise CorpusError("gensim is not installed: its test_data holds the default corpus text "
                          "(pip install --no-deps gensim), or pass --text FILE")
    folder = Path(spec.origin).parent / "test" / "test_data"
    if not folder.is_dir():
        raise CorpusError(f"{folder}: gensim test_data folder not found")
    return folder


def read_text(path: Path) -> str:
    """A text file as str: UTF-8, else Latin-1 (gensim's Lee corpus is Latin-1: "\xa3" is a pound sign)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_WIKI_TEXT = re.compile(r"<text[^>]*>(.*?)</text>", re.DOTALL)


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove innermost ``open_ ... close`` spans until none is left (templates nest)."""
    pattern = re.compile(re.escape(open_) + r"(?:(?!" + re.escape(open_) + r")(?!" + re.escape(close)
                         + r").)*" + re.escape(close), re.DOTALL)
    while True:
        new = pattern.sub(" ", text)
        if new == text:
            return new
        text = new


def wiki_to_paragraphs(wikitext: str) -> list[str]:
    """Plain prose paragraphs of one article's wiki markup (templates, refs, tables, lists dropped)."""
    t = html.unescape(wikitext)
    t = re.sub(r"<!--.*?-->", " ", t, flags=re.DOTALL)
    t = re.sub(r"<ref[^>/]*/>", " ", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", " ", t, flags=re.DOTALL)
    t = _strip_nested(t, "{{", "}}")
    t = _strip_nested(t, "{|", "|}")
    t = re.sub(r"<[^>]+>", " ", t)
    # [[File:...]] / [[Category:...]] may hold nested links: drop innermost links of those kinds first.
    t = re.sub(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
               " ", t)
    t = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://\S+\s*([^\]]*)\]", r"\1", t)
    t = t.replace("'''", "").replace("''", "")
    paragraphs = []
    for line in t.splitlines():
        line = line.strip()
        if not line or line[0] in "=*#:;|!{}" or line.startswith("__"):
            continue  # headings, lists, tables, magic words: not running prose
        if len(line.split()) >= 8:
            paragraphs.append(line)
    return paragraphs


def read_wiki_dump(path: Path) -> list[str]:
    """Prose paragraphs of every article in a (bz2) MediaWiki XML dump."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        xml = f.read()
    return [p for m in _WIKI_TEXT.finditer(xml) if not m.group(1).lstrip().lower().startswith("#redirect")
            for p in wiki_to_paragraphs(m.group(1))]


def detokenize(line: str) -> str:
    """Lower-cased tokenised review text back to a sentence: "it 's good , ok ." -> "It's good, ok."."""
    t = re.sub(r"^(__label__\w+|_\*\d+)\s+", "", line.strip())
    t = re.sub(r"\s+([,.!?;:])", r"\1", t)
    t = re.sub(r"\s+('s|'re|'ve|'ll|'d|'m|n't)\b", r"\1", t)
    t = re.sub(r"\bi\b", "I", t)
    t = re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), t)
    return t


# Common US first names, alternating male, female (the index parity gives the pronoun).
_NAMES = ["Tom", "Anna", "Jake", "Maria", "Sam", "Lucy", "Ben", "Emma", "Jack", "Sara", "Mike",
          "Kate", "Dan", "Amy", "Joe", "Nina", "Paul", "Lily", "Mark", "Jenny",
          "James", "Mary", "John", "Linda", "Robert", "Susan", "David", "Karen", "William", "Lisa",
          "Richard", "Nancy", "Thomas", "Betty", "Chris", "Sandra", "Daniel", "Ashley", "Matthew",
          "Emily", "Anthony", "Donna", "Steven", "Michelle", "Andrew", "Laura", "Kevin", "Rachel",
          "Brian", "Megan", "Eric", "Hannah", "Adam", "Olivia", "Kyle", "Sophia", "Ryan", "Chloe",
          "Noah", "Mia", "Liam", "Ella", "Ethan", "Grace", "Owen", "Julia", "Nathan", "Diane",
          "Simon", "Paula", "Carl", "Angela", "Peter", "Jessica", "Henry", "Molly", "Luke", "Zoe"]
_RELATIVES = ["mom", "dad", "sister", "brother", "friend", "grandmother", "grandfather", "aunt",
              "uncle", "neighbor", "teacher", "boss", "wife", "husband", "cousin", "son", "daughter"]
_PLACES = ["store", "park", "beach", "library", "school", "office", "mall", "zoo", "gym", "bakery",
           "market", "hospital", "museum", "restaurant", "airport", "station", "lake", "farm"]
_THINGS = ["a new bike", "some bread", "a red dress", "a puppy", "a cake", "new shoes", "a book",
           "a pizza", "some flowers", "a phone", "a guitar", "a coat", "a birthday card", "a toy car",
           "a bag of apples", "a cup of coffee", "a ticket", "a blanket", "a lamp", "a kite"]
_ACTIVITIES = ["play soccer", "bake cookies", "go fishing", "clean the house", "watch a movie",
               "go swimming", "learn to cook", "paint the fence", "visit the zoo", "ride a horse",
               "plant a garden", "go camping", "study for the test", "walk the dog", "fix the car",
               "build a tree house", "go shopping", "write a letter", "take a nap", "run a race"]
_FEELINGS = ["happy", "sad", "nervous", "excited", "tired", "angry", "scared", "proud", "bored",
             "surprised", "hungry", "lonely", "worried", "glad", "upset"]
_TIMES = ["One morning", "Last summer", "On Saturday", "After school", "Yesterday", "That night",
          "The next day", "Every weekend", "On a sunny day", "Last week", "In the evening",
          "One rainy day", "Before dinner", "During the holidays"]
_EVENTS = ["it started to rain", "the bus was late", "the power went out", "the dog ran away",
           "the car broke down", "the phone rang", "the cake burned", "the store was closed",
           "the game was over", "the snow began to fall", "the baby woke up", "the lights went off"]
_TEMPLATES = [
    "{time}, {name} went to the {place} to buy {thing}.",
    "{name} wanted to {activity} with {pos} {rel}.",
    "{name} was {feeling} because {event}.",
    "{time}, {name} decided to {activity}.",
    "{name}'s {rel} gave {obj} {thing} for {pos} birthday.",
    "When {event}, {name} felt very {feeling}.",
    "{name} asked {pos} {rel} if they could {activity}.",
    "{time}, {event}, so {name} stayed home.",
    "{name} saved money for months to buy {thing}.",
    "{name} forgot {pos} keys at the {place}.",
    "{name} and {name2} met at the {place} and talked for hours.",
    "{name} tried to {activity}, but it was harder than {sub} expected.",
    "{name} found {thing} on the way to the {place}.",
    "{sub_cap} was so {feeling} that {sub} could not sleep.",
    "{name} promised {pos} {rel} to {activity} soon.",
    "{time}, {name} and {pos} {rel} drove to the {place}.",
    "{name} practiced every day and finally learned to {activity}.",
    "At the {place}, {name} saw an old friend.",
    "{name} was late for work because {event}.",
    "{name} thanked {pos} {rel} and went back home.",
    "{sub_cap} went to bed early because {sub} was {feeling}.",
    "{name} did not want to {activity}, but {pos} {rel} insisted.",
    "After a long day at the {place}, {name} was very {feeling}.",
    "{name} called {pos} {rel} to say that {event}.",
]


def everyday_sentences(n: int, seed: int) -> list[str]:
    """``n`` distinct generated short narrative sentences (StoryCloze-like everyday English)."""
    rng = random.Random(seed)
    out: set[str] = set()
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        name, name2 = rng.sample(_NAMES, 2)
        she = _NAMES.index(name) % 2 == 1  # alternate names are female in the list
        sub, obj, pos = ("she", "her", "her") if she else ("he", "him", "his")
        s = rng.choice(_TEMPLATES).format(
            time=rng.choice(_TIMES), name=name, name2=name2, place=rng.choice(_PLACES),
            thing=rng.choice(_THINGS), activity=rng.choice(_ACTIVITIES), pos=pos, obj=obj, sub=sub,
            sub_cap=sub.capitalize(), rel=rng.choice(_RELATIVES), feeling=rng.choice(_FEELINGS),
            event=rng.choice(_EVENTS))
        out.add(s[0].upper() + s[1:])
    return sorted(out)


#: Debian package ``wordnet-base``: its glosses hold ~40k short example sentences of everyday English.
WORDNET_DIR = Path("/usr/share/wordnet")


def read_wordnet_examples(folder: Path = WORDNET_DIR) -> list[str]:
    """The quoted usage examples of WordNet's data files, as sentences ("Pepper makes me sneeze.")."""
    out = []
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        path = folder / name
        if not path.is_file():
            continue
        for line in read_text(path).splitlines():
            if line.startswith("  "):  # licence header
                continue
            for ex in re.findall(r'"([^"]+)"', line.partition("|")[2]):
                ex = ex.strip().rstrip(";,")
                if len(ex.split()) >= 3:
                    out.append(ex[0].upper() + ex[1:] + ("" if ex[-1] in ".!?" else "."))
    return out


def default_sources(seed: int = 0) -> dict[str, list[str]]:
    """Speakable sentences of each default source: news, wiki, reviews, everyday (generated) and,
    where the Debian package wordnet-base is installed, WordNet's usage examples."""
    data = gensim_test_data()
    news = [line for name in ("lee_background.cor", "lee.cor")
            for line in read_text(data / name).splitlines()]
    wiki_path = next(iter(sorted(data.glob("enwiki-latest-pages-articles1*shortened.bz2"))), None)
    if wiki_path is None:
        raise CorpusError(f"{data}: the shortened English Wikipedia dump is missing")
    reviews = [detokenize(line) for name in ("pang_lee_polarity.cor", "alldata-id-10.txt")
               for line in read_text(data / name).splitlines()]
    sources = {
        "news": list(speakable_sentences(news)),
        "wiki": list(speakable_sentences(read_wiki_dump(wiki_path))),
        "reviews": list(speakable_sentences(reviews)),
        "everyday": [s for s in (normalize_for_speech(x) for x in everyday_sentences(4000, seed)) if s],
    }
    if WORDNET_DIR.is_dir():
        sources["wordnet"] = [s for s in map(normalize_for_speech, read_wordnet_examples()) if s]
    else:
        log.warning("%s not found (Debian package wordnet-base): no WordNet example sentences", WORDNET_DIR)
    return sources


def file_sources(paths: Iterable[str | Path]) -> dict[str, list[str]]:
    """Speakable sentences of plain-text files (one source per file, named after it)."""
    sources = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise CorpusError(f"{path}: text file not found")
        sentences = list(speakable_sentences(read_text(path).split("\n\n")))
        if not sentences:
            raise CorpusError(f"{path}: no speakable English sentence found")
        sources[path.stem] = sentences
    return sources
