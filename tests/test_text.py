"""Text normalisation for speech: numbers, symbols, abbreviations, filtering, sentence splitting."""

import pytest

from speechlm.data.text import (
    normalize_for_speech,
    number_to_words,
    ordinal_to_words,
    speakable_sentences,
    split_sentences,
    year_to_words,
)


@pytest.mark.parametrize("raw,expected", [
    ("He paid $3.50 for 2 apples in 1995.",
     "He paid three dollars fifty cents for two apples in nineteen ninety-five."),
    ("About 5% of the 3,000 people came on the 21st of May.",
     "About five percent of the three thousand people came on the twenty-first of May."),
    ("The cost was $2.5 million -- a lot of money!", "The cost was two point five million dollars, a lot of money!"),
    ("He said \u201cyes\u201d (twice) and left\u2026", "He said yes twice and left."),
    ("Mr. Smith and Dr. Jones met, e.g. at lunch.", "Mister Smith and Doctor Jones met, for example at lunch."),
    ("Salt & pepper are on the table.", "Salt and pepper are on the table."),
    ("It was 2005 and I had 101 dogs.", "It was two thousand and five and I had one hundred and one dogs."),
    ("We walked along the river .", "We walked along the river."),
])
def test_normalize_expands(raw, expected):
    assert normalize_for_speech(raw) == expected


@pytest.mark.parametrize("raw", [
    "The meeting is at 4:00 today.",  # time: not guessed
    "We met at 4pm in the park.",  # number glued to letters
    "Hi.",  # too short
    "See the file at C:/temp/data now.",  # unspeakable symbols
    "Das ist schön und gut.",  # non-English letters
    " ".join(["word"] * 40) + ".",  # too long
    "",
])
def test_normalize_rejects(raw):
    assert normalize_for_speech(raw) is None


def test_normalized_text_is_a_fixed_point():
    once = normalize_for_speech("In 1066, about 1,200 men (and 3 horses) came & stayed.")
    assert once is not None and normalize_for_speech(once) == once


def test_number_words():
    assert number_to_words(0) == "zero" and number_to_words(21) == "twenty-one"
    assert number_to_words(1_000_001) == "one million and one"
    assert number_to_words(2305) == "two thousand three hundred and five"
    assert ordinal_to_words(1) == "first" and ordinal_to_words(22) == "twenty-second"
    assert ordinal_to_words(40) == "fortieth" and ordinal_to_words(100) == "one hundredth"
    assert year_to_words(1905) == "nineteen oh five" and year_to_words(2015) == "twenty fifteen"


def test_split_sentences_keeps_abbreviations_and_initials():
    text = ('Mr. Smith went to Washington. He met J. Edgar Hoover at 5 p.m. on Tuesday! '
            'Did the U.S. Army agree? "Yes," he said. It was done.')
    assert split_sentences(text) == [
        "Mr. Smith went to Washington.", "He met J. Edgar Hoover at 5 p.m. on Tuesday!",
        "Did the U.S. Army agree?", '"Yes," he said.', "It was done."]


def test_speakable_sentences_filters():
    out = list(speakable_sentences(["The cat sat on the mat. It cost $5. Call 555-1234 now! Fine."]))
    assert out == ["The cat sat on the mat.", "It cost five dollars."]
