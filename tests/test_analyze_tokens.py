"""speechlm.eval.token_analysis (tools/analyze_tokens.py): the token classes on hand-made rows, and an end-to-end
run on a tiny random world (the command line as a subprocess)."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from alignment_helpers import byte_level_bpe, sentencepiece_llama
from training_helpers import WORDS, make_llm, make_world

from speechlm.data.manifest import read_manifest, write_manifest
from speechlm.data.tts import engine_of
from speechlm.errors import FeatureCacheError, ManifestError, ModelError
from speechlm.eval import token_analysis as at
from speechlm.training.losses import distill_loss, nearest_token_accuracy

ROOT = Path(__file__).resolve().parents[1]


def run_tool(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "analyze_tokens.py"), *args, "--no-progress"],
                          check=False, capture_output=True, text=True, timeout=600)


def _text_only(classes: list[set[str]]) -> list[str]:
    out = []
    for c in classes:
        (name,) = c & set(at.TEXT_CLASSES)  # exactly one text class per token
        out.append(name)
    return out


# ------------------------------------------------------------------------------------ pure parts
def test_text_classes_on_hand_made_pieces():
    pieces = ["The", " quick", "est", " fox", ".", " It", "'s", " 42", "!", " ", "x", "2", " (", "é"]
    classes = at.token_classes(pieces, list(range(len(pieces))), stack=1)
    assert all("all" in c for c in classes)
    assert _text_only(classes) == [
        "word_initial",  # first token of the row, no space
        "word_initial", "continuation", "word_initial", "punctuation", "word_initial",
        "other",  # "'s": not letters only
        "word_initial",  # digits with a leading space start a word too
        "punctuation",
        "punctuation",  # a bare space has no letter or digit
        "word_initial",  # after a bare-space token
        "other",  # a digit piece inside a word
        "punctuation",  # " (": space-led but no letter or digit
        "continuation",  # non-ASCII letters are letters
    ]
    # SentencePiece's row-initial bare "▁" decodes to "": the next piece still starts the word
    assert _text_only(at.token_classes(["", "T", "he", "."], [0, 1, 2, 3], 1)) == [
        "punctuation", "word_initial", "continuation", "punctuation"]


def test_frame_sharing_after_stacking():
    bnd = [3, 5, 7, 8, 11, 11]  # encoder frames; k=4 read-out frames 0, 1, 1, 2, 2, 2
    pieces = [" a", " b", ".", " c", " d", "."]
    c4 = at.token_classes(pieces, bnd, stack=4)
    assert ["shares_frame_with_previous" in c for c in c4] == [False, False, True, False, True, True]
    assert ["followed_by_sharer" in c for c in c4] == [False, True, False, True, True, False]
    c1 = at.token_classes(pieces, bnd, stack=1)  # no stacking: only the equal boundaries share
    assert ["shares_frame_with_previous" in c for c in c1] == [False] * 5 + [True]
    assert ["followed_by_sharer" in c for c in c1] == [False] * 4 + [True, False]
    assert at.token_classes([" a"], [0], 4) == [{"all", "word_initial"}]


def test_seen_and_unseen_in_training():
    c = at.token_classes([" a", " b", " c"], [0, 1, 2], 1, train_ids={1, 2}, token_ids=[1, 5, 2])
    assert ["seen_in_training" in x for x in c] == [True, False, True]
    assert ["unseen_in_training" in x for x in c] == [False, True, False]
    assert not any(set(at.TRAIN_CLASSES) & x for x in at.token_classes([" a"], [0], 1))
    with pytest.raises(ValueError):
        at.token_classes([" a"], [0], 1, train_ids={1})
    with pytest.raises(ValueError):
        at.token_classes([" a", " b"], [0], 1)


def test_summarize_and_engines():
    r = at.TokenRecord
    records = [r({"all", "word_initial"}, True, 0.5, "espeak"),
               r({"all", "continuation", "followed_by_sharer"}, False, 0.25, "espeak"),
               r({"all", "punctuation", "shares_frame_with_previous"}, True, 1.0, "festival"),
               r({"all", "word_initial"}, False, 0.25, "festival")]
    s = at.summarize(records)
    assert list(s["classes"]) == ["all", *at.TEXT_CLASSES, *at.FRAME_CLASSES]  # no train classes given
    assert s["classes"]["all"] == {"tokens": 4, "share": 1.0, "token_acc": 0.5, "cosine": 0.5}
    assert s["classes"]["word_initial"] == {"tokens": 2, "share": 0.5, "token_acc": 0.5, "cosine": 0.375}
    assert s["classes"]["other"] == {"tokens": 0, "share": 0.0, "token_acc": None, "cosine": None}
    assert s["by_engine"]["festival"] == {"tokens": 2, "share": 0.5, "token_acc": 0.5, "cosine": 0.625}
    records[0].classes.add("unseen_in_training")
    assert s["classes"].keys() < at.summarize(records)["classes"].keys()
    assert engine_of("festival:ked_diphone/r175/p50") == "festival"  # the engine the analysis files rows under
    assert engine_of("en-gb-scotland+f4/r175/p50") == "espeak-hard"
    assert engine_of("en-us+m3/r160/p40") == "espeak"
    assert engine_of(None) == "unknown"
    table = at.markdown_table(s)
    assert "| all | 4 | 1.000 | 0.5000 | 0.5000 |" in table and "| engine: espeak |" in table


@pytest.mark.parametrize("family", ["bpe", "sentencepiece"])
def test_token_pieces_keep_the_spaces(family, tmp_path):
    tok = byte_level_bpe() if family == "bpe" else sentencepiece_llama(tmp_path)
    text = "The quick fox jumps over the lazy dog. It's 42!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = at.token_pieces(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces).strip() == text
    classes = _text_only(at.token_classes(pieces, list(range(len(ids))), 1))
    for piece, name in zip(pieces, classes, strict=True):
        if piece[:1] == " " and any(ch.isalnum() for ch in piece):
            assert name == "word_initial"
    assert classes[pieces.index(".")] == "punctuation"
    n_words = sum(1 for w in text.split() if any(ch.isalnum() for ch in w))
    assert classes.count("word_initial") == n_words  # each word starts exactly once


# ------------------------------------------------------------------------------------ end to end
SPEAKERS = ["festival:ked_diphone/r175/p50", "en-gb-scotland+f4/r175/p50", "en-us+m3/r160/p40", None]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """make_world's audio + feature cache, re-aligned for a byte-level BPE LLM (sentences end in '.', whose
    boundary is the last word's), speakers of several engines, and an SSR connector (stack 4) trained
    for a few steps."""
    from speechlm.data.batching import collate
    from speechlm.training import build
    from speechlm.training.configs import DataConfig, ModelConfig
    from speechlm.training.stages import Stage1Distill, TokenEmbedding

    root = tmp_path_factory.mktemp("tokworld")
    paths = make_world(root, n_train=6, n_valid=6)
    tok = byte_level_bpe()
    tok.save_pretrained(root / "bpe_llm")
    make_llm(root / "bpe_llm", vocab=len(tok))
    rng = random.Random(1)
    utts = read_manifest(paths["manifest"])
    for i, u in enumerate(utts):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        u.text = " ".join(words).capitalize() + "."
        n = len(tok(u.text, add_special_tokens=False)["input_ids"])
        frames = int(u.duration_s * 100)  # boundaries at 100 Hz, the last two (word, ".") equal
        u.token_boundaries = [int((j + 1) * frames / (n - 1)) - 1 for j in range(n - 1)]
        u.token_boundaries.append(u.token_boundaries[-1])
        u.speaker = SPEAKERS[i % len(SPEAKERS)]
    valid = [u for u in utts if u.split == "valid"]
    write_manifest(root / "aligned_train.jsonl", [u for u in utts if u.split == "train"])
    write_manifest(root / "aligned_valid.jsonl", valid)

    llm, _ = build.load_llm_embeddings(str(root / "bpe_llm"))
    data = DataConfig(feature_cache=paths["cache"])
    enc = build.encoder_facts(ModelConfig(), data)
    model = ModelConfig(connector={"name": "ssr", "d_model": 32, "n_layers": 1, "n_heads": 2, "stack": 4},
                        init_output_scale=1.0)
    torch.manual_seed(0)
    connector = build.make_connector(model, enc, llm)
    # A few steps of stage 1 on the rows themselves: some tokens right, some wrong
    stage1 = Stage1Distill(connector, TokenEmbedding(llm.get_input_embeddings().weight))
    batch = collate([build.make_reader(data, enc, tok).read(u) for u in valid])
    opt = torch.optim.Adam(connector.parameters(), lr=1e-2)
    for _ in range(40):
        loss, _ = stage1(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    connector.save_pretrained(root / "connector")
    return {"root": root, "cache": paths["cache"], "llm": str(root / "bpe_llm"),
            "valid": str(root / "aligned_valid.jsonl"), "train": str(root / "aligned_train.jsonl"),
            "connector": str(root / "connector"), "utts": valid}


def _args(world: dict, out: Path, **kw: str) -> list[str]:
    a = {"--connector": world["connector"], "--llm": world["llm"], "--manifest": world["valid"],
         "--feature-cache": world["cache"], "--train-manifest": world["train"], "--out": str(out),
         "--batch-size": "4", "--threads": "1", **kw}
    return [x for k, v in a.items() for x in (k, v)]


def test_end_to_end_report(world, tmp_path):
    from speechlm.models.connectors.base import load_connector
    from speechlm.training import build
    from speechlm.training.configs import DataConfig, ModelConfig
    from speechlm.training.engine import DistInfo
    from speechlm.training.loop import BatchPrep, validate
    from speechlm.training.stages import Stage1Distill, TokenEmbedding

    out = tmp_path / "analysis.json"
    done = run_tool(_args(world, out))
    assert done.returncode == 0, done.stderr
    assert "| all |" in done.stdout
    rep = json.loads(out.read_text())
    cls = rep["classes"]
    assert list(cls) == list(at.CLASSES)
    n = sum(len(u.token_boundaries) for u in world["utts"])
    assert rep["rows"] == len(world["utts"]) and rep["stack"] == 4
    assert cls["all"]["tokens"] == n and cls["all"]["share"] == 1.0
    assert sum(cls[c]["tokens"] for c in at.TEXT_CLASSES) == n
    assert cls["seen_in_training"]["tokens"] + cls["unseen_in_training"]["tokens"] == n
    assert cls["word_initial"]["tokens"] > 0 and cls["punctuation"]["tokens"] >= rep["rows"]
    assert cls["shares_frame_with_previous"]["tokens"] >= rep["rows"]  # every final "." shares
    assert cls["followed_by_sharer"]["tokens"] >= rep["rows"]
    assert cls["unseen_in_training"]["tokens"] > 0  # the train rows are few
    assert set(rep["by_engine"]) == {"festival", "espeak-hard", "espeak", "unknown"}
    assert sum(e["tokens"] for e in rep["by_engine"].values()) == n
    for f in [*cls.values(), *rep["by_engine"].values()]:
        assert f["share"] == pytest.approx(f["tokens"] / n)
        if f["tokens"]:
            assert 0.0 <= f["token_acc"] <= 1.0 and -1.0 <= f["cosine"] <= 1.0

    # The same vectors scored by the training code's own accuracy and cosine
    llm, tok = build.load_llm_embeddings(world["llm"])
    table = llm.get_input_embeddings().weight.float()
    connector = load_connector(world["connector"], llm=llm)
    data = DataConfig(feature_cache=world["cache"], valid_manifest=world["valid"], check_fresh=True)
    enc = build.encoder_facts(ModelConfig(), data)
    reader = build.make_reader(data, enc, tok)
    correct = total = 0
    cos_sum = 0.0
    for batch, vectors in at.connector_vectors(connector, reader, world["utts"], batch_size=4):
        c, t = nearest_token_accuracy(vectors, table, batch.token_ids, batch.token_mask)
        correct, total = correct + c, total + t
        _, parts = distill_loss(vectors, table[batch.token_ids], batch.token_mask)
        cos_sum += float(parts["cosine"]) * t
    assert total == n
    assert 0 < correct < total  # the few training steps got some tokens right
    assert cls["all"]["token_acc"] == correct / total
    assert cls["all"]["cosine"] == pytest.approx(cos_sum / total, abs=1e-6)
    # one outcome per token, keyed "<utterance id>/<index>": what pairs two connectors' tokens
    assert len(rep["items"]) == n and sum(rep["items"].values()) == correct
    assert {k.rsplit("/", 1)[0] for k in rep["items"]} == {u.id for u in world["utts"]}

    # ... and what the stage-1 validation reports (its own batches and loss module)
    valid = build.valid_batches(data, build.make_reader(data, enc, tok, valid=True), DistInfo(0, 1, 0, 1))
    model = Stage1Distill(connector, TokenEmbedding(table))
    m = validate(SimpleNamespace(ds=model, info=DistInfo(0, 1, 0, 1)), valid(), BatchPrep(torch.device("cpu")))
    assert m["tokens"] == n
    assert m["token_acc"] == pytest.approx(cls["all"]["token_acc"], abs=1e-9)
    assert m["cosine"] == pytest.approx(cls["all"]["cosine"], abs=1e-5)

    # no train manifest: no seen/unseen classes; --limit takes the first rows
    rep2 = at.analyze(world["connector"], world["valid"], world["cache"], llm=world["llm"], limit=2, batch_size=4,
                      progress=False)
    assert rep2["rows"] == 2 and rep2["train_manifest"] is None
    assert list(rep2["classes"]) == ["all", *at.TEXT_CLASSES, *at.FRAME_CLASSES]


def test_clear_errors(world, tmp_path):
    out = tmp_path / "x.json"
    done = run_tool(_args(world, out, **{"--connector": str(tmp_path / "nope")}))
    assert done.returncode == 1 and "no connector folder" in done.stderr
    assert not out.exists()

    def analyze(manifest):
        return at.analyze(world["connector"], manifest, world["cache"], llm=world["llm"], progress=False)

    utts = [dataclasses.replace(u) for u in world["utts"]]
    utts[1].token_boundaries = None
    utts[1].boundary_frame_rate_hz = None
    write_manifest(world["root"] / "unaligned.jsonl", utts)
    with pytest.raises(ManifestError, match="token_boundaries") as err:
        analyze(world["root"] / "unaligned.jsonl")
    assert repr(utts[1].id) in str(err.value)

    utts = [dataclasses.replace(u) for u in world["utts"]]
    utts[2].id = "not_cached_row"
    write_manifest(world["root"] / "uncached.jsonl", utts)
    with pytest.raises(FeatureCacheError, match="not in the feature cache.*'not_cached_row'"):
        analyze(world["root"] / "uncached.jsonl")
    with pytest.raises(ModelError, match="no connector folder"):
        at.analyze(tmp_path / "nope", world["valid"], world["cache"], llm=world["llm"])
