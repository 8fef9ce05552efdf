"""Spoken corpus: text sources (wiki markup stripping ...), coverage, voices, planning (disjoint sentences and
voices), a tiny real build."""

import json
from pathlib import Path

from speechlm.data.audio import audio_info
from speechlm.data.corpus import build_corpus
from speechlm.data.corpus_plan import plan_corpus
from speechlm.data.corpus_voices import train_voices
from speechlm.data.coverage import read_eval_texts, vocabulary_coverage
from speechlm.data.manifest import read_manifest
from speechlm.data.text_sources import (
    detokenize,
    everyday_sentences,
    read_wordnet_examples,
    wiki_to_paragraphs,
)


def test_wiki_markup_stripped():
    wiki = ("{{Infobox|name=X|{{nested|a}}}}\n== History ==\n'''Paris''' is the [[capital city|capital]] of "
            "[[France]], on the river Seine.<ref>{{cite web|url=x}}</ref> It has [[File:P.jpg|thumb|a "
            "[[tower]]]] many museums and parks for everyone.\n* a list item that is long enough to pass\n"
            "{| class=wikitable\n| cell || cell\n|}")
    assert wiki_to_paragraphs(wiki) == [
        "Paris is the capital of France, on the river Seine.  It has   many museums and parks for everyone."]


def test_detokenize_reviews():
    assert detokenize("__label__neg it 's so silly , i laughed . and then ?") == "It's so silly, I laughed. And then?"


def test_vocabulary_coverage():
    assert vocabulary_coverage(["The cat sat."], ["the dog sat", "a CAT"]) == 3 / 5
    assert vocabulary_coverage(["x"], ["y"]) == 0.0


def test_everyday_sentences_deterministic_and_distinct():
    a, b = everyday_sentences(200, seed=1), everyday_sentences(200, seed=1)
    assert a == b and len(set(a)) == 200 and everyday_sentences(200, seed=2) != a


def _voice_plan():
    from speechlm.data.corpus_voices import VoicePlan
    from speechlm.data.tts import HARD_VOICES

    return VoicePlan(train={"espeak": train_voices(), "flite": ["flite:kal16"]},
                     train_share={"espeak": 0.5, "flite": 0.5},
                     held_out={"valid": ["festival:ked_diphone", *HARD_VOICES["valid"]],
                               "test": ["festival:ked_diphone", "piper:en_US-joe-medium", *HARD_VOICES["test"]]})


def test_plan_disjoint_sentences_and_held_out_voices():
    from speechlm.data.augment import Augmentation

    sources = {"a": [f"Sentence number {i} is here." for i in range(300)],
               "b": [f"Another line {i} to say." for i in range(300)] + ["Sentence number 0 is here."]}
    vp = _voice_plan()
    plan = plan_corpus(sources, hours=0.2, seed=3, voices=vp)
    assert plan == plan_corpus(sources, hours=0.2, seed=3, voices=vp)
    texts = {s: {p.text.lower() for p in plan if p.split == s} for s in ("train", "valid", "test")}
    assert all(texts.values())
    assert not texts["train"] & texts["valid"] and not texts["train"] & texts["test"]
    assert not texts["valid"] & texts["test"]
    assert len([p for p in plan if p.text == "Sentence number 0 is here."]) <= 1  # deduplicated
    voices = {s: {p.voice for p in plan if p.split == s} for s in ("train", "valid", "test")}
    assert voices["train"] <= set(train_voices()) | {"flite:kal16"} and "flite:kal16" in voices["train"]
    assert voices["valid"] == set(vp.held_out["valid"]) and voices["test"] == set(vp.held_out["test"])
    assert not voices["train"] & (voices["valid"] | voices["test"])
    accents = {s: {v.split("+")[0] for v in vs if ":" not in v} for s, vs in voices.items()}
    assert not accents["train"] & (accents["valid"] | accents["test"])
    # Training clips carry a seeded augmentation (most are changed); held-out clips are clean.
    train_augs = [Augmentation.from_str(p.augment) for p in plan if p.split == "train"]
    assert sum(not a.is_identity for a in train_augs) > len(train_augs) / 2
    assert all(p.augment == "none" for p in plan if p.split != "train")
    # Only eSpeak voices get a pitch setting; the other engines keep their own (pitch varies by augmentation).
    assert all(p.pitch == 50 for p in plan if ":" in p.voice)


def test_voice_plans_refuse_reserved_and_overlapping_voices(monkeypatch):
    import pytest

    from speechlm.data import corpus_voices as voices
    from speechlm.data.text_sources import CorpusError
    from speechlm.data.tts import HARD_VOICES

    with pytest.raises(CorpusError, match="training and held out"):
        voices.VoicePlan(train={"flite": ["flite:kal16"]}, train_share={"flite": 1.0},
                         held_out={"valid": ["flite:kal16"], "test": ["en-gb-scotland+f4"]}).check_disjoint()
    monkeypatch.setitem(voices.NATURAL_TRAIN_VOICES, "flite", ("flite:kal16", "flite:slt"))
    with pytest.raises(CorpusError, match="reserved"):
        voices.VoicePlan.default(engines={"flite"})
    # An engine that is not installed is left out, and the plan says which voices went missing.
    monkeypatch.setitem(voices.NATURAL_TRAIN_VOICES, "flite", ("flite:kal16",))
    plan = voices.VoicePlan.default(engines=set())
    assert set(plan.train) == {"espeak"} and plan.train_share == {"espeak": 1.0}
    assert "flite:kal16" in plan.missing and "piper:en_US-joe-medium" in plan.missing
    assert plan.held_out["test"] == list(HARD_VOICES["test"])


def test_engine_conditions_of_corpus_voices():
    """The corpus labels voices with the one shared "which TTS engine" answer (speechlm.data.tts.engine_of)."""
    from speechlm.data.corpus_voices import HELD_OUT_VOICES, NATURAL_TRAIN_VOICES
    from speechlm.data.tts import engine_of

    assert [engine_of(v) for v in HELD_OUT_VOICES["test"]] == [
        "festival", "piper", "espeak-hard", "espeak-hard"]
    assert {engine_of(v) for vs in NATURAL_TRAIN_VOICES.values() for v in vs} == {"flite", "festival"}
    assert {engine_of(v) for v in train_voices()} == {"espeak"}
    assert engine_of("en-gb-scotland+f4", label_hard=False) == "espeak"


def test_coverage_selection_prefers_sentences_with_needed_words():
    from speechlm.data.coverage import select_for_coverage

    pool = ["The the the the the the.", "A red cat and a blue dog.", "Cat dog red blue.", "Nothing here at all."]
    chosen = select_for_coverage(pool, {"cat", "dog", "red", "blue"}, budget_s=100.0, depth=1)
    assert chosen == [2]  # the densest sentence covers every target; nothing else adds any
    chosen = select_for_coverage(pool, {"cat", "dog", "red", "blue"}, budget_s=100.0, depth=2)
    assert sorted(chosen) == [1, 2]
    assert select_for_coverage(pool, {"zebra"}, budget_s=100.0) == []


def test_read_eval_texts(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"id": "x-1", "context": ["Tom ran."], "right_ending": "He won."})
                                      + "\n")
    (tmp_path / "q.csv").write_text('"What is red, often?",An apple,The sky,B\n')
    assert read_eval_texts(tmp_path) == ["What is red, often?", "An apple", "The sky", "Tom ran.", "He won."]


def test_tiny_corpus_build(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("\n\n".join(
        f"{name} went to the {place} on day {i}. It was a nice trip, and {name} came back home at night."
        for i, (name, place) in enumerate((n, p) for n in ("Tom", "Anna", "Ben", "Lucy")
                                           for p in ("park", "store", "lake", "school", "farm"))))
    out = tmp_path / "corpus"
    summary = build_corpus(out, hours=0.01, text_files=[text], seed=0, workers=1, progress=False)
    rows = {s: read_manifest(out / f"{s}.jsonl") for s in ("train", "valid", "test")}
    assert all(rows.values()) and summary.counts == {s: len(r) for s, r in rows.items()}
    texts = {s: {r.text for r in rs} for s, rs in rows.items()}
    assert not texts["train"] & (texts["valid"] | texts["test"])
    voices = {s: {r.speaker.split("/")[0] for r in rs} for s, rs in rows.items()}
    assert not voices["train"] & (voices["valid"] | voices["test"])
    for split, rs in rows.items():
        for r in rs:
            assert r.split == split and r.sample_rate == 16000 and not Path(r.audio).is_absolute()
            sr, duration_s = audio_info(r.audio_path)
            assert sr == 16000 and abs(duration_s - r.duration_s) < 1e-3
            if r.words is not None:  # engines without word timings leave them out
                assert [w.word for w in r.words] == r.text.split()
                assert all(w.start_s < w.end_s <= duration_s for w in r.words)
            assert (r.augment is None) if split != "train" else True
    assert json.loads((out / "summary.json").read_text())["counts"] == summary.counts
    assert 0.0 < summary.coverage <= 1.0


def test_wordnet_examples(tmp_path):
    (tmp_path / "data.verb").write_text(
        "  1 This software and database is being provided AS IS\n"
        '00001740 29 v 04 breathe 0 | draw air into the lungs; "I can breathe better when the air is clean"; '
        '"The patient is respiring"\n'
        '00002000 29 v 01 sneeze 0 | exhale spasmodically; "pepper makes me sneeze"; "sneeze"\n')
    assert read_wordnet_examples(tmp_path) == [
        "I can breathe better when the air is clean.", "The patient is respiring.", "Pepper makes me sneeze."]


def test_corpus_deterministic_and_rebuild_removes_stale_audio(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"The {c} dog ran to the {p} and sat down." for c in ("red", "big", "old", "small")
                                for p in ("park", "gate", "shop", "barn", "lake")))
    a, b = tmp_path / "a", tmp_path / "b"
    build_corpus(a, hours=0.01, text_files=[text], seed=4, workers=1, progress=False)
    build_corpus(b, hours=0.01, text_files=[text], seed=4, workers=1, progress=False)
    for split in ("train", "valid", "test"):
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    wavs = sorted(p.relative_to(a) for p in (a / "audio").rglob("*.wav"))
    assert wavs and all((a / w).read_bytes() == (b / w).read_bytes() for w in wavs)
    build_corpus(a, hours=0.005, text_files=[text], seed=5, workers=1, progress=False)
    named = {r.audio_path.resolve() for s in ("train", "valid", "test") for r in read_manifest(a / f"{s}.jsonl")}
    assert {p.resolve() for p in (a / "audio").rglob("*.wav")} == named


def test_corpus_from_the_same_plan_is_kept_unless_forced(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"The {c} cat slept on the {p} all day." for c in ("red", "big", "old")
                                for p in ("mat", "sofa", "roof", "step")))
    out = tmp_path / "c"
    first = build_corpus(out, hours=0.006, text_files=[text], seed=1, workers=1, progress=False)
    assert len(first.plan_sha256) == 64
    wav = next((out / "audio").rglob("*.wav"))
    stamp = wav.stat().st_mtime_ns
    again = build_corpus(out, hours=0.006, text_files=[text], seed=1, workers=1, progress=False)
    assert again == first and wav.stat().st_mtime_ns == stamp  # kept: cached features stay fresh
    other = build_corpus(out, hours=0.006, text_files=[text], seed=2, workers=1, progress=False)
    assert other.plan_sha256 != first.plan_sha256  # another plan is synthesized
    forced = build_corpus(out, hours=0.006, text_files=[text], seed=2, workers=1, progress=False, force=True)
    assert forced.plan_sha256 == other.plan_sha256
    assert all(w.stat().st_mtime_ns != stamp for w in (out / "audio").rglob("*.wav"))


def test_plan_fingerprint_covers_plan_and_synthesis_version(monkeypatch):
    from speechlm.data import corpus
    from speechlm.data.corpus_plan import PlannedUtterance

    plan = [PlannedUtterance("train-000000-x", "A cat sat.", "train", "x", "en-us", 175, 50)]
    first = corpus.plan_fingerprint(plan)
    assert first == corpus.plan_fingerprint(list(plan))
    other_voice = [PlannedUtterance("train-000000-x", "A cat sat.", "train", "x", "en-us+m1", 175, 50)]
    assert corpus.plan_fingerprint(other_voice) != first
    monkeypatch.setattr(corpus, "SYNTHESIS_VERSION", corpus.SYNTHESIS_VERSION + 1)
    assert corpus.plan_fingerprint(plan) != first  # new synthesis code: old corpora are not reused
