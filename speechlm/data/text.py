"""Sentence splitting and normalisation of English text so that a transcript says exactly what is spoken.

Rules of :func:`normalize_for_speech` (applied in this order; anything it cannot make speakable
makes it return ``None`` instead of guessing):

1. Unicode NFKC; typographic quotes, dashes and ellipses become ASCII; ``&`` -> "and".
2. Unspoken marks go: double quotes, brackets (their content stays), ``*``, ``_``, ``#``, ``~``;
   a free-standing dash ("a - b", "a -- b") becomes a comma.
3. Abbreviations with a fixed reading are expanded: "Mr." -> "Mister", "Dr." -> "Doctor",
   "e.g." -> "for example", "etc." -> "et cetera", "vs." -> "versus", ...
4. Numbers become words: money ("$3.50" -> "three dollars fifty cents"), percentages ("5%" ->
   "five percent"), ordinals ("21st" -> "twenty-first"), years 1100-2099 standing alone ("1995" ->
   "nineteen ninety-five"), decimals ("2.5" -> "two point five"), other integers with or without
   thousands commas ("3,000" -> "three thousand"); a number glued to letters ("4pm", "MP3"), a
   time ("4:00"), a phone number or range ("555-1234") is not guessed: the sentence is dropped.
5. The result may only hold letters, spaces and the punctuation ``. , ? ! ' - : ;`` with every
   whitespace word containing a letter (a word with no letter has no audio of its own); otherwise
   ``None``.
6. ``min_words`` <= words <= ``max_words`` (whitespace words), else ``None``.

Case is kept (the LLM sees normal English); all-capital acronyms stay (eSpeak spells them).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator

MIN_WORDS = 3
MAX_WORDS = 30

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                  "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}

_ABBREVIATIONS = {
    "Mr.": "Mister", "Mrs.": "Missus", "Ms.": "Miz", "Dr.": "Doctor", "Prof.": "Professor",
    "St.": "Saint", "Jr.": "Junior", "Sr.": "Senior", "Gen.": "General", "Sen.": "Senator",
    "Rep.": "Representative", "Gov.": "Governor", "Lt.": "Lieutenant", "Col.": "Colonel",
    "Capt.": "Captain", "Sgt.": "Sergeant", "Mt.": "Mount", "e.g.": "for example",
    "i.e.": "that is", "etc.": "et cetera", "vs.": "versus", "approx.": "approximately",
    "No.": "number", "Jan.": "January", "Feb.": "February", "Aug.": "August", "Sept.": "September",
    "Sep.": "September", "Oct.": "October", "Nov.": "November", "Dec.": "December",
}
# Tokens ending in "." that do not end a sentence (besides the expandable ones and initials).
_NO_BREAK = {k.lower() for k in _ABBREVIATIONS} | {"u.s.", "u.k.", "a.m.", "p.m.", "inc.", "ltd.",
                                                  "co.", "corp.", "jan.", "mar.", "apr.", "jun.",
                                                  "jul.", "ave.", "fig.", "cf.", "al."}
_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
             "€": ("euro", "euros", "cent", "cents")}

_SPEAKABLE = re.compile(r"[A-Za-z .,?!'\-:;]+")
_HAS_LETTER = re.compile(r"[A-Za-z]")


def number_to_words(n: int) -> str:
    """Cardinal English words for 0 <= n < 10**12 ("twenty-one", "three hundred and five")."""
    if n < 0 or n >= 10**12:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_to_words(rest))
    for scale, name in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            tail = "" if rest == 0 else (" and " if rest < 100 else " ") + number_to_words(rest)
            return number_to_words(head) + " " + name + tail
    raise AssertionError("unreachable")


def ordinal_to_words(n: int) -> str:
    """Ordinal English words ("first", "twenty-second", "one hundredth")."""
    words = number_to_words(n)
    head, sep, last = words.rpartition(" ") if " " in words else ("", "", words)
    pre, dash, unit = last.rpartition("-")
    if unit in _ORDINAL_WORDS:
        unit = _ORDINAL_WORDS[unit]
    elif unit.endswith("y"):
        unit = unit[:-1] + "ieth"
    else:
        unit += "th"
    return head + sep + pre + dash + unit


def year_to_words(n: int) -> str:
    """A year as spoken: 1995 -> "nineteen ninety-five", 2005 -> "two thousand and five"."""
    if 2000 <= n < 2010:
        return number_to_words(n)
    hi, lo = divmod(n, 100)
    if lo == 0:
        return number_to_words(hi) + " hundred"
    return number_to_words(hi) + " " + ("oh " + _ONES[lo] if lo < 10 else number_to_words(lo))


def _money(match: re.Match) -> str:
    unit, units, sub, subs = _CURRENCY[match.group(1)]
    whole = int(match.group(2).replace(",", ""))
    scale = match.group(4)
    if match.group(3) and scale:  # "$2.5 million" -> "two point five million dollars"
        return f"{_decimal(match.group(2), match.group(3))} {scale} {units}"
    words = f"{number_to_words(whole)}{' ' + scale if scale else ''} {unit if whole == 1 and not scale else units}"
    cents = int((match.group(3) or "0").ljust(2, "0")[:2])
    if cents:
        words += f" {number_to_words(cents)} {sub if cents == 1 else subs}"
    return words


def _decimal(whole: str, frac: str) -> str:
    return number_to_words(int(whole.replace(",", ""))) + " point " + " ".join(_ONES[int(d)] for d in frac)


def _plain_number(match: re.Match) -> str:
    digits, frac = match.group(1), match.group(2)
    if frac:
        return _decimal(digits, frac)
    value = int(digits.replace(",", ""))
    if "," not in digits and 1100 <= value < 2100 and len(digits) == 4:
        return year_to_words(value)
    return number_to_words(value)


_NUM = r"(\d{1,3}(?:,\d{3})+|\d+)"
_RULES: list[tuple[re.Pattern, object]] = [
    (re.compile(r"([$£€])" + _NUM + r"(?:\.(\d+))?(?:\s+(million|billion|thousand))?\b"), _money),
    (re.compile(_NUM + r"(?:\.(\d+))?\s?%"),
     lambda m: (_decimal(m.group(1), m.group(2)) if m.group(2) else number_to_words(int(m.group(1).replace(",", ""))))
     + " percent"),
    (re.compile(r"\b(\d+)(?:st|nd|rd|th)\b"), lambda m: ordinal_to_words(int(m.group(1)))),
    # Not inside codes, phone numbers, ranges or times ("555-1234", "1990-95", "4:00").
    (re.compile(r"(?<![\w.,:])(?<!\d-)" + _NUM + r"(?:\.(\d+))?(?![\w:]|[.,]\d|-\d)"), _plain_number),
]


def _expand_abbreviations(text: str) -> str:
    for short, full in _ABBREVIATIONS.items():
        # "No." only before a number ("No. 5"), else it is the word "no" ending a sentence.
        if short == "No.":
            text = re.sub(r"\bNo\.(?=\s*\d)", full, text)
            continue
        text = re.sub(r"(?<![\w.])" + re.escape(short) + r"(?=\s|$|[,;:])", full, text)
    return text


def normalize_for_speech(text: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str | None:
    """Normalise one sentence for speech (rules in the module docstring); ``None`` if not speakable."""
    t = unicodedata.normalize("NFKC", text)
    t = (t.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
         .replace("\u2013", " - ").replace("\u2014", " - ").replace("\u2026", "..."))
    t = t.replace("&", " and ")
    t = re.sub(r'["()\[\]{}*_#~]', " ", t)
    t = re.sub(r"\s-{1,3}\s|\s-{2,3}|-{2,3}\s|-{2,3}", ", ", " " + t + " ")
    t = re.sub(r"\.{2,}", ".", t)
    t = _expand_abbreviations(t)
    for pattern, repl in _RULES:
        t = pattern.sub(repl, t)
    if re.search(r"\d", t):
        return None
    t = re.sub(r"\s+", " ", t).strip()
    t = re.sub(r"\s+([,.?!;:])", r"\1", t)  # "word ," -> "word,"
    t = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", t)  # ", ," from removed marks
    t = re.sub(r"^[,;:.\s]+", "", t)
    t = re.sub(r"[,;:]+$", ".", t)
    if not t or not _SPEAKABLE.fullmatch(t):
        return None
    words = t.split()
    if not min_words <= len(words) <= max_words:
        return None
    if not all(_HAS_LETTER.search(w) for w in words):
        return None
    return t


_BREAK = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences at . ! ? before a capital, not after abbreviations/initials."""
    text = re.sub(r"\s+", " ", text).strip()
    out, start = [], 0
    for m in _BREAK.finditer(text):
        before = text[start:m.start()].split()
        last = before[-1] if before else ""
        token = last.rstrip("\"')]").lower()
        if token in _NO_BREAK or re.fullmatch(r"[a-z]\.", token) or re.fullmatch(r"([a-z]\.){2,}", token):
            continue  # "Mr. Smith", "J. Smith", "U.S. forces"
        out.append(text[start:m.start()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


def speakable_sentences(texts: Iterable[str], min_words: int = MIN_WORDS, max_words: int = MAX_WORDS
                        ) -> Iterator[str]:
    """Split each text into sentences and yield the normalised ones that are speakable."""
    for text in texts:
        for sentence in split_sentences(text):
            norm = normalize_for_speech(sentence, min_words, max_words)
            if norm is not None:
                yield norm
