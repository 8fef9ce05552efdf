"""Spoken StoryCloze: ending-only scoring, a rigged LLM scored right in every condition, loaders."""

import json

import pytest
import torch

from speechlm.errors import ManifestError
from speechlm.eval import storycloze as sc
from speechlm.eval.scoring import SpeechFrontEnd, SpeechInput, choose, score_text, start_ids, text_ids
from speechlm.models.speechlm import TextSegment
from tests.eval_helpers import (
    OracleFrontEnd,
    speech_model,
    tiny_llm,
    unigram_llm,
    unigram_logprobs,
    word_tokenizer,
)

CONTEXT = ["tom was late .", "he ran to the bus .", "the bus had left .", "tom walked home ."]
RIGHT, WRONG = "tom was very sad .", "tom was very happy ."


def item(i=0, right=RIGHT, wrong=WRONG):
    return sc.StoryItem(f"s{i}", list(CONTEXT), right, wrong)


def spoken(it):
    wave = torch.zeros(1600)
    return sc.SpokenStory(it, SpeechInput(wave, it.context_text, "c"), SpeechInput(wave, it.right_ending, "r"),
                          SpeechInput(wave, it.wrong_ending, "w"))


def test_text_scores_cover_exactly_the_ending_tokens():
    tok = word_tokenizer()
    llm = unigram_llm(tok, {"sad": 3.0})
    uni = unigram_logprobs(llm)
    [pair] = sc.score_text_condition(llm, tok, [item()])
    for ending, lp in ((RIGHT, pair.right), (WRONG, pair.wrong)):
        ids = text_ids(tok, " " + ending)
        assert len(lp) == len(ids) == 5
        torch.testing.assert_close(lp, uni[ids], atol=1e-5, rtol=0)


def test_endings_condition_scores_the_same_tokens_without_the_context():
    """``endings``: the ending tokens after the start token alone; the written context changes the scores."""
    tok = word_tokenizer()
    llm = tiny_llm(len(tok), seed=5)
    items = [item(0), item(1, right="a dog ran home .", wrong="the cat was blue .")]
    alone = sc.score_text_condition(llm, tok, items, context=False)
    text = sc.score_text_condition(llm, tok, items)
    for it, a, t in zip(items, alone, text):
        for ending, lp, with_ctx in ((it.right_ending, a.right, t.right), (it.wrong_ending, a.wrong, t.wrong)):
            ids = text_ids(tok, " " + ending)
            want = score_text(llm, [start_ids(tok)], [ids], batch_size=1)[0]
            torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
            assert lp.shape == with_ctx.shape and not torch.allclose(lp, with_ctx)


def test_storycloze_config_rejects_an_unknown_condition():
    from speechlm.errors import ConfigError
    from speechlm.eval.run_storycloze import StoryClozeEvalConfig

    assert "endings" in StoryClozeEvalConfig().conditions
    with pytest.raises(ConfigError, match="conditions must be among"):
        StoryClozeEvalConfig(conditions=["text", "ending"])


def test_score_text_matches_full_sequence_and_batching():
    tok = word_tokenizer()
    llm = tiny_llm(len(tok))
    q = start_ids(tok) + text_ids(tok, "what is two plus two ? answer :")
    # two one-token continuations of the same prefix share a forward pass: still scored separately
    pre = [start_ids(tok) + text_ids(tok, "tom was late ."), start_ids(tok) + text_ids(tok, "the cat"), q, q]
    cont = [text_ids(tok, " he ran home ."), text_ids(tok, " was happy"), text_ids(tok, " A"), text_ids(tok, " B")]
    batched = score_text(llm, pre, cont, batch_size=2)
    assert batched[2].item() != batched[3].item()
    for p, c, lp in zip(pre, cont, batched):
        with torch.no_grad():
            logits = llm(input_ids=torch.tensor([p + c])).logits[0]
        want = torch.log_softmax(logits, -1)[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)]
        torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
        assert score_text(llm, [p], [c], batch_size=1)[0].shape == (len(c),)


def test_rigged_llm_is_scored_right_in_every_condition():
    tok = word_tokenizer()
    llm = unigram_llm(tok, {"sad": 4.0})  # the right ending says "sad"
    items = [item(0), item(1, right="so tom was sad .", wrong="so tom was happy .")]
    text = sc.score_text_condition(llm, tok, items)
    model = speech_model(llm, tok)
    speech = sc.score_speech_conditions(model, OracleFrontEnd(model), [spoken(i) for i in items])
    for cond, scores in [("text", text), ("s2t", speech["s2t"]), ("s", speech["s"])]:
        for scoring in ("summed", "length_norm"):
            assert all(p.correct(scoring) for p in scores), (cond, scoring)
    # Flip the preference: every condition flips with it (the answer is not a constant).
    llm2 = unigram_llm(tok, {"happy": 4.0})
    model2 = speech_model(llm2, tok)
    speech2 = sc.score_speech_conditions(model2, OracleFrontEnd(model2), [spoken(i) for i in items])
    assert not any(p.correct("summed") for p in sc.score_text_condition(llm2, tok, items))
    assert not any(p.correct("summed") for p in speech2["s2t"] + speech2["s"])


def test_oracle_speech_equals_text_on_a_random_llm():
    """Speech vectors equal to the text embeddings must give exactly the text scores (S->T and S)."""
    tok = word_tokenizer()
    llm = tiny_llm(len(tok), seed=3)
    items = [item(0), item(1, right="a dog ran home .", wrong="the cat was blue .")]
    text = sc.score_text_condition(llm, tok, items)
    model = speech_model(llm, tok)
    speech = sc.score_speech_conditions(model, OracleFrontEnd(model), [spoken(i) for i in items], batch_size=2)
    for cond in ("s2t", "s"):
        for t, s in zip(text, speech[cond]):
            torch.testing.assert_close(s.right, t.right, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(s.wrong, t.wrong, atol=1e-4, rtol=1e-4)


def test_choose_summed_vs_length_normalised():
    short, long = torch.tensor([-2.0]), torch.tensor([-1.5, -1.5])
    assert choose([short, long], "summed") == 0
    assert choose([short, long], "length_norm") == 1


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "a", "context": CONTEXT, "right_ending": RIGHT, "wrong_ending": WRONG}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ({**GOOD, "context": CONTEXT[:3]}, "4 non-empty sentences"),
    ({**GOOD, "right_ending": ""}, "'right_ending'"),
    ({**GOOD, "wrong_ending": RIGHT}, "identical"),
    ({**GOOD, "context_audio": "c.wav"}, "need all of"),
    ({k: v for k, v in GOOD.items() if k != "id"}, "'id'"),
])
def test_story_loader_rejects_malformed_rows(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "s.jsonl", [{**GOOD, "id": "first"}, bad])
    with pytest.raises(ManifestError, match=message) as e:
        sc.read_story_items(path)
    assert f"{path}:2" in str(e.value)


def test_story_loader_random_style_and_audio_paths(tmp_path):
    rows = [{**GOOD, "id": f"s{i}", "right_ending": f"tom was {w} .", "context_audio": f"c{i}.wav",
             "right_audio": f"r{i}.wav", "wrong_audio": f"w{i}.wav"} for i, w in enumerate(["sad", "happy", "late"])]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    items = sc.read_story_items(path)
    assert items[0].context_audio == tmp_path / "c0.wav"
    rnd = sc.read_story_items(path, wrong_style="random", seed=1)
    rights = {it.right_ending for it in items}
    for it in rnd:
        assert it.wrong_style == "random" and it.wrong_ending in rights and it.wrong_ending != it.right_ending


def test_embedded_set_is_valid_and_large_enough():
    items = sc.read_story_items(sc.embedded_set_path())
    assert len(items) == 310  # 210 written 2026-11-23 + 100 appended 2026-12-04
    assert all(not any(ch.isdigit() for ch in it.context_text + it.right_ending + it.wrong_ending) for it in items)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_release_loader_pairs_files(tmp_path):
    for i in range(3):
        touch(tmp_path / "sSC" / f"{i}_incorrect.wav")
        touch(tmp_path / "sSC" / f"{i}_correct.wav")
    pairs = sc.read_spoken_release(tmp_path / "sSC")
    assert [p.id for p in pairs] == ["0", "1", "2"]
    assert all(p.positive.name.endswith("_correct.wav") and p.negative.name.endswith("_incorrect.wav") for p in pairs)


@pytest.mark.parametrize("names, message", [
    (["0_correct.wav"], "has 1 files"),
    (["0_correct.wav", "0_right.wav"], "both"),
    (["story_correct.wav"], "not <index>_<label>.wav"),
])
def test_release_loader_rejects_malformed_layouts(tmp_path, names, message):
    for n in names:
        touch(tmp_path / "rel" / n)
    with pytest.raises(ManifestError, match=message):
        sc.read_spoken_release(tmp_path / "rel")


def test_release_loader_requires_folder(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        sc.read_spoken_release(tmp_path / "missing")


class StubEncoder:
    def __call__(self, waves):
        from speechlm.models.encoder import EncoderOutput

        lengths = torch.tensor([len(w) // 320 for w in waves])
        feats = torch.zeros(len(waves), 1, int(lengths.max()), 8)
        for b, n in enumerate(lengths):
            feats[b, :, :n] = torch.randn(1, int(n), 8)
        return EncoderOutput(feats, lengths)


class StubAligner:
    """Free mode 'decodes' a fixed transcript; forced mode aligns the given one. Boundaries spread evenly."""

    def __init__(self, tok, fail=()):
        self.tok, self.calls, self.fail = tok, [], set(fail)

    def align(self, features, lengths, texts, utt_ids=None, target_frame_rate_hz=None, target_num_frames=None):
        from types import SimpleNamespace

        from speechlm.errors import AlignmentError

        self.calls.append(list(texts))
        if self.fail & set(utt_ids):
            raise AlignmentError(f"utterance {min(self.fail & set(utt_ids))!r}: free mode decoded no speech")
        out = []
        for t, n in zip(texts, target_num_frames):
            ids = text_ids(self.tok, t if t is not None else "what is two plus two")
            bounds = [int((k + 1) * n / len(ids)) - 1 for k in range(len(ids))]
            out.append(SimpleNamespace(token_ids=ids, token_boundaries=bounds))
        return out


@pytest.mark.parametrize("mode", ["free", "forced"])
def test_front_end_gives_one_vector_per_aligned_token(mode):
    tok = word_tokenizer()
    model = speech_model(tiny_llm(len(tok)), tok)
    model.encoder = StubEncoder()
    aligner = StubAligner(tok)
    front = SpeechFrontEnd(model, aligner, mode=mode)
    segs = front.embed([SpeechInput(torch.zeros(16000), "tom was late"), SpeechInput(torch.zeros(9600), "a cat")])
    assert aligner.calls == [[None, None] if mode == "free" else ["tom was late", "a cat"]]
    want = ["what is two plus two"] * 2 if mode == "free" else ["tom was late", "a cat"]
    for s, w in zip(segs, want):
        assert s.ids == text_ids(tok, w) and s.embeds.shape == (len(s.ids), 32)
    assert front.label == mode


def test_front_end_feeds_the_aligner_its_own_encoder_frames():
    """An aligner trained with an adapted encoder reads that encoder's frames (at its own frame count), while the
    connector reads the SpeechLM's and the boundaries land on the connector's frames."""
    from speechlm.models.encoder import EncoderOutput

    class OwnEncoder:  # 7.0 everywhere, a different frame rate (one frame per 640 samples)
        def __call__(self, waves):
            lengths = torch.tensor([len(w) // 640 for w in waves])
            return EncoderOutput(torch.full((len(waves), 1, int(lengths.max()), 8), 7.0), lengths)

    class Recording(StubAligner):
        def align(self, features, lengths, texts, **kw):
            self.seen = (features.clone(), lengths.tolist(), list(kw["target_num_frames"]))
            return super().align(features, lengths, texts, **kw)

    tok = word_tokenizer()
    model = speech_model(tiny_llm(len(tok)), tok)
    model.encoder = StubEncoder()
    for own in (None, OwnEncoder()):
        aligner = Recording(tok)
        front = SpeechFrontEnd(model, aligner, mode="forced", aligner_encoder=own)
        segs = front.embed([SpeechInput(torch.zeros(16000), "tom was late"), SpeechInput(torch.zeros(9600), "a cat")])
        features, lengths, targets = aligner.seen
        assert targets == [50, 30]                                  # the connector's frames, either way
        if own is None:
            assert lengths == [50, 30] and not bool((features == 7.0).any())
        else:
            assert lengths == [25, 15] and bool((features == 7.0).all())
        assert [s.ids for s in segs] == [text_ids(tok, "tom was late"), text_ids(tok, "a cat")]


def test_default_voices_are_held_out_from_training():
    from speechlm.data.corpus_voices import train_voices

    voices = sc.default_eval_voices()
    assert voices and not set(voices) & set(train_voices())


def test_front_end_survives_an_utterance_without_boundaries():
    tok = word_tokenizer()
    model = speech_model(tiny_llm(len(tok)), tok)
    model.encoder = StubEncoder()
    front = SpeechFrontEnd(model, StubAligner(tok, fail={"u2"}), mode="free")
    segs = front.embed([SpeechInput(torch.zeros(16000), id="u1"), SpeechInput(torch.zeros(9600), id="u2")])
    assert segs[0].ids == text_ids(tok, "what is two plus two") and segs[0].embeds.shape[0] == 5
    assert segs[1].ids == [] and segs[1].embeds.shape[0] == 0
    assert len(front.failures) == 1 and "u2" in front.failures[0]
    # An ending without speech vectors scores -inf: it can only lose (a tie counts as wrong).
    pre = [[TextSegment(start_ids(tok)), segs[0]]] * 2
    lp = model.score_speech(pre, [segs[0], segs[1]])
    pair = sc.PairScores("x", lp[0], lp[1])
    assert pair.correct("summed") and not sc.PairScores("y", lp[1], lp[1]).correct("length_norm")


def cue_stories():
    """Two stories whose right ending is told by the context's last word: a bigram LLM follows "cat" with
    "sad" and "dog" with "happy", so only the story's own context picks its right ending."""
    ctx = ["tom was late .", "he ran to the bus .", "the bus had left ."]
    return [sc.StoryItem("cat", ctx + ["tom walked home to the cat"], "sad .", "happy ."),
            sc.StoryItem("dog", ctx + ["tom walked home to the dog"], "happy ?", "sad ?")]


def test_another_storys_spoken_context_is_the_control_for_what_the_story_adds():
    from tests.eval_helpers import bigram_llm

    tok = word_tokenizer()
    model = speech_model(bigram_llm(tok, {"cat": "sad", "dog": "happy"}), tok)
    stories = [spoken(it) for it in cue_stories()]
    others = sc.other_story_contexts(stories)
    assert [o.item.id for o in others] == ["cat", "dog"]  # the items and their endings stay
    assert [o.context.text for o in others] == [stories[1].context.text, stories[0].context.text]
    assert all(o.right is s.right and o.wrong is s.wrong for o, s in zip(others, stories))
    front = OracleFrontEnd(model)
    own = sc.score_speech_conditions(model, front, stories, ["s2t"])["s2t"]
    other = sc.score_speech_conditions(model, front, others, ["s2t"])["s2t"]
    assert sc.accuracy_counts(own)["summed"] == (2, 2) and sc.accuracy_counts(other)["summed"] == (0, 2)
    three = [spoken(it) for it in cue_stories() + [item(2)]]  # every story gets another's context
    assert [o.context for o in sc.other_story_contexts(three)] == [three[1].context, three[2].context,
                                                                  three[0].context]
    with pytest.raises(ValueError, match="at least two stories"):
        sc.other_story_contexts(stories[:1])
    # random wrong endings, each taken from the story n // 2 further on: that story's context would argue for the
    # wrong ending, so every story gets the next one's instead
    rights = [f"tom was {w} ." for w in ("sad", "happy", "late", "very sad")]
    four = [spoken(item(k, right=rights[k], wrong=rights[(k + 2) % 4])) for k in range(4)]
    assert [o.context for o in sc.other_story_contexts(four)] == [four[3].context, four[0].context,
                                                                 four[1].context, four[2].context]
    pair = sc.random_wrong_endings([item(0), item(1, right="tom was happy .")])
    with pytest.raises(ValueError, match="every other story's right ending is its wrong ending"):
        sc.other_story_contexts([spoken(it) for it in pair])
