"""The spelling path: the speller model (speechlm.models.speller), its training from text (speechlm.training.speller),
the soft spellings heard in token spans (speechlm.eval.spelling) and the token analysis with a speller."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from alignment_helpers import byte_level_bpe, peaky_posteriors, sentencepiece_llama
from training_helpers import WORDS, make_llm, make_world

from alignment.tokens import CHAR_ALPHABET
from speechlm.errors import ConfigError, ModelError
from speechlm.eval import spelling as sp
from speechlm.models.speller import Speller, SpellerConfig, load_speller, one_hot_spellings, spelling_labels
from speechlm.training import speller as st

ALPHABET = list(CHAR_ALPHABET)
V = len(ALPHABET) + 1  # with the blank


def tiny_config(**kw) -> SpellerConfig:
    return SpellerConfig(**{"alphabet": ALPHABET, "d_llm": 16, "d_model": 32, "layers": 1, "heads": 2,
                            "ff_mult": 2, "dropout": 0.0, "max_chars": 24, **kw})


def label(ch: str) -> int:
    return ALPHABET.index(ch) + 1


# ------------------------------------------------------------------------------------ spellings of tokens
def test_piece_spellings_follow_the_aligner_normalisation():
    assert st.piece_spelling("The", ALPHABET) == "the"
    assert st.piece_spelling(" The", ALPHABET) == " the"  # word-initial: the separator the aligner emits
    assert st.piece_spelling("'s", ALPHABET) == "'s"  # an apostrophe inside a word is spoken
    assert st.piece_spelling(" 42", ALPHABET) == " forty two"
    assert st.piece_spelling("é", ALPHABET) == "e"
    for silent in (".", " ", "-", "\n", "()", "\ufffd"):
        assert st.piece_spelling(silent, ALPHABET) == ""
    assert st.piece_spelling(" the", list("theab")) == "the"  # no separator in the alphabet: no leading space


@pytest.mark.parametrize("family", ["bpe", "sentencepiece"])
def test_token_spellings_keep_the_leading_space(family, tmp_path):
    tok = byte_level_bpe() if family == "bpe" else sentencepiece_llama(tmp_path)
    spellings = st.token_spellings(tok, ALPHABET)
    assert not set(spellings) & set(tok.all_special_ids)
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    pieces = [spellings.get(i) for i in ids]
    assert "".join(p for p in pieces if p).replace(" ", "") == "thecatsatonthemat"
    assert pieces[0].strip() == "the" and " the" in pieces[1:]  # a later word carries its separator
    assert all(set(s) <= set(ALPHABET) and s.strip() for s in spellings.values())


def test_noise_and_soft_inputs():
    rng = random.Random(0)
    word = spelling_labels(" spelling", ALPHABET)
    assert st.corrupt(word, V, rng, 0.0, 0.0, label(" ")) == word
    edits = [st.corrupt(word, V, rng, 0.3, 0.0, label(" ")) for _ in range(200)]
    assert sum(e != word for e in edits) > 100 and all(e and 0 not in e for e in edits)
    flips = [st.corrupt(word, V, rng, 0.0, 1.0, label(" ")) for _ in range(3)]
    assert all(f == word[1:] for f in flips)  # the leading separator dropped
    chars, mask = one_hot_spellings([word, word[:3]], V, 24)
    soft = st.soften(chars, mask, torch.tensor([True, False]), 0.4, torch.Generator().manual_seed(0))
    assert torch.allclose(soft.sum(-1)[mask], torch.ones(int(mask.sum())))
    assert torch.equal(soft[1], chars[1]) and not torch.equal(soft[0], chars[0])
    assert (soft[0][mask[0]].max(-1).values >= 0.6 - 1e-6).all() and float(soft[..., 0].abs().max()) == 0.0


# ------------------------------------------------------------------------------------ text training
def test_text_training_learns_a_toy_vocabulary(tmp_path):
    tok = byte_level_bpe()
    torch.manual_seed(0)
    table = torch.randn(len(tok), 16)
    cfg = st.SpellerTrainConfig(d_model=48, layers=1, heads=2, ff_mult=2, dropout=0.0, max_chars=24, steps=250,
                                batch_size=64, lr=3e-3, warmup_steps=20, noise=0.0, space_flip=0.0, soft_prob=0.0,
                                holdout=0.0, eval_every=0, eval_tokens=0, seed=0)
    spellings = st.token_spellings(tok, ALPHABET)
    fresh = Speller(cfg.model_config(16))
    before = st.spelling_accuracy(fresh, sorted(spellings), spellings, F.normalize(table, dim=-1))
    report = st.train_speller(cfg, table, tok, tmp_path / "speller", "toy", progress=False)
    assert report["held_out_tokens"] == 0 and report["train_tokens"] == len(spellings) > 100
    assert before["same_spelling"] < 0.1
    assert report["train"]["same_spelling"] > 0.9  # a random table: learnt by heart from the spellings
    assert report["train"]["exact"] <= report["train"]["same_spelling"]
    saved = json.loads((tmp_path / "speller" / "training.json").read_text())
    assert saved["train"] == report["train"] and saved["config"]["steps"] == 250
    model = load_speller(tmp_path / "speller", alphabet=ALPHABET, d_llm=16)
    again = st.spelling_accuracy(model, sorted(spellings), spellings, F.normalize(table, dim=-1))
    assert again["same_spelling"] == report["train"]["same_spelling"]


def test_holdout_split_is_seeded_and_disjoint():
    train, held = st.split_holdout(range(1000), 0.1, seed=3)
    assert len(held) == 100 and not set(train) & set(held) and len(train) + len(held) == 1000
    assert st.split_holdout(range(1000), 0.1, seed=3) == (train, held)
    assert st.split_holdout(range(1000), 0.1, seed=4)[1] != held
    with pytest.raises(ConfigError):
        st.SpellerTrainConfig(holdout=1.0)


# ------------------------------------------------------------------------------------ folder
def test_save_load_round_trip_and_bad_folders(tmp_path):
    torch.manual_seed(0)
    model = Speller(tiny_config()).eval()
    chars, mask = one_hot_spellings([spelling_labels(" cat", ALPHABET), spelling_labels("s", ALPHABET), []], V, 24)
    out = model(chars, mask)
    assert out.shape == (3, 16) and torch.isfinite(out).all()  # an empty row is finite (and unused)
    model.save_pretrained(tmp_path / "sp", extra={"note": 1})
    loaded = load_speller(tmp_path / "sp", alphabet=ALPHABET, d_llm=16)
    assert torch.equal(loaded(chars, mask), out)
    assert loaded.config == model.config

    with pytest.raises(ModelError, match="not a speller folder"):
        load_speller(tmp_path / "nope")
    with pytest.raises(ModelError, match="alphabet"):
        load_speller(tmp_path / "sp", alphabet=ALPHABET[:-1])
    with pytest.raises(ModelError, match="d_llm=16"):
        load_speller(tmp_path / "sp", d_llm=32)
    cfg = json.loads((tmp_path / "sp" / "config.json").read_text())
    (tmp_path / "sp" / "config.json").write_text(json.dumps({**cfg, "d_model": 64}))
    with pytest.raises(ModelError, match="do not match"):
        load_speller(tmp_path / "sp")
    (tmp_path / "sp" / "config.json").write_text(json.dumps({**cfg, "colour": "red"}))
    with pytest.raises(ModelError, match="invalid speller config.*colour"):
        load_speller(tmp_path / "sp")
    (tmp_path / "sp" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"sp/config.json: invalid speller config"):
        load_speller(tmp_path / "sp")
    with pytest.raises(ConfigError):
        tiny_config(heads=5)
    with pytest.raises(ModelError, match="character distributions"):
        model(torch.zeros(1, 2, V + 1), torch.ones(1, 2, dtype=torch.bool))


# ------------------------------------------------------------------------------------ speech side
def test_soft_spellings_of_hand_built_spans():
    b, s = 0, label(" ")
    c, a, t, o, k = (label(x) for x in "catok")
    #        0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
    path = [b, c, c, a, b, t, s, s, b, o, b, o, k, b, b, b]
    lp = torch.from_numpy(peaky_posteriors(path, V, p=0.9))
    spans = sp.token_spans([5, 5, 12, 15], 50.0, 50.0, len(path))
    assert spans == [(0, 5), (6, 5), (6, 12), (13, 15)]
    heard = [sp.heard_text(sp.soft_spelling(lp, x, y), ALPHABET) for x, y in spans]
    assert heard == ["cat", "", " ook", ""]  # repeats collapse, a blank splits "o o", all-blank and empty spans
    one = sp.soft_spelling(lp, 0, 5)
    assert one.shape == (3, V) and torch.allclose(one.sum(-1), torch.ones(3)) and float(one[:, 0].max()) == 0.0
    # each character: the mean posterior of its frames without the blank, renormalised
    expect = lp[1:3].exp().mean(0)
    expect[0] = 0
    assert torch.allclose(one[0], expect / expect.sum())
    assert sp.soft_spelling(lp, 4, 3).shape == (0, V)
    # boundaries at 25 Hz read from 50 Hz posteriors: frame 2 at 25 Hz ends at frame 5 at 50 Hz
    assert sp.token_spans([2, 6], 25.0, 50.0, len(path)) == [(0, 5), (6, 13)]
    assert sp.token_spans([3], 50.0, 50.0, 0) == [(0, -1)]


def test_mix_and_choosing_its_weight():
    torch.manual_seed(0)
    table_unit = F.normalize(torch.randn(50, 8), dim=-1)
    targets = torch.arange(40)
    ssr = 3.0 * table_unit[targets] + 0.9 * torch.randn(40, 8)  # noisy
    spell = table_unit[targets].clone()
    spell[:10] = torch.randn(10, 8)  # the speller misheard 10 tokens
    spelled = torch.ones(40, dtype=torch.bool)
    spelled[-5:] = False
    assert torch.allclose(sp.mix_vectors(ssr, spell, 0.0, spelled), ssr)
    one = sp.mix_vectors(ssr, spell, 1.0, spelled)
    assert torch.allclose(one[:-5], F.normalize(spell[:-5], dim=-1) * ssr[:-5].norm(dim=-1, keepdim=True))
    assert torch.equal(one[-5:], ssr[-5:])  # nothing heard: SSR's vector
    w, grid = sp.choose_mix(ssr, spell, spelled, targets, table_unit)
    assert set(grid) == set(sp.MIX_GRID) and w == min(k for k, v in grid.items() if v == max(grid.values()))
    for k, acc in grid.items():
        pred = (F.normalize(sp.mix_vectors(ssr, spell, k, spelled), dim=-1) @ table_unit.T).argmax(-1)
        assert acc == pytest.approx(float((pred == targets).float().mean()))
    assert grid[w] > grid[0.0]  # the speller helps on this set


# ------------------------------------------------------------------------------------ token analysis
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """make_world's feature cache, its rows re-aligned for a byte-level BPE LLM (hidden 16), an SSR connector, a
    random charCTC aligner on the cached frames and a random speller."""
    from alignment.ctc_model import CTCAligner, char_ctc_config
    from speechlm.data.feature_cache import FeatureCache
    from speechlm.data.manifest import read_manifest, write_manifest
    from speechlm.training import build
    from speechlm.training.configs import DataConfig, ModelConfig

    root = tmp_path_factory.mktemp("spellworld")
    paths = make_world(root, n_train=4, n_valid=4)
    tok = byte_level_bpe()
    tok.save_pretrained(root / "bpe_llm")
    make_llm(root / "bpe_llm", vocab=len(tok), hidden=16)
    rng = random.Random(1)
    utts = read_manifest(paths["manifest"])
    for u in utts:
        u.text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))).capitalize() + "."
        n = len(tok(u.text, add_special_tokens=False)["input_ids"])
        frames = int(u.duration_s * 100)
        u.token_boundaries = [int((j + 1) * frames / (n - 1)) - 1 for j in range(n - 1)]
        u.token_boundaries.append(u.token_boundaries[-1])  # the "." shares the last word's boundary
    write_manifest(root / "train.jsonl", [u for u in utts if u.split == "train"])
    write_manifest(root / "valid.jsonl", [u for u in utts if u.split == "valid"])
    llm, _ = build.load_llm_embeddings(str(root / "bpe_llm"))
    data = DataConfig(feature_cache=paths["cache"])
    enc = build.encoder_facts(ModelConfig(), data)
    torch.manual_seed(0)
    model = ModelConfig(connector={"name": "ssr", "d_model": 32, "n_layers": 1, "n_heads": 2, "stack": 4})
    build.make_connector(model, enc, llm).save_pretrained(root / "connector")
    cache = FeatureCache.open(paths["cache"])
    CTCAligner(char_ctc_config(input_dim=cache.hidden_size, d_model=32, layers=1, heads=2, dropout=0.0,
                               encoder_layers=list(cache.layers), frame_rate_hz=cache.frame_rate_hz)
               ).save_pretrained(root / "aligner")
    Speller(tiny_config(d_llm=16)).save_pretrained(root / "speller")
    return {"root": root, "cache": paths["cache"], "llm": str(root / "bpe_llm"), "train": str(root / "train.jsonl"),
            "valid": str(root / "valid.jsonl"), "connector": str(root / "connector"),
            "aligner": str(root / "aligner"), "speller": str(root / "speller")}


def test_analysis_reports_the_spelling_path(world):
    from speechlm.eval import token_analysis as at
    from speechlm.eval.paired import compare_reports

    def run(**kw):
        return at.analyze(world["connector"], world["valid"], world["cache"], llm=world["llm"],
                          train_manifest=world["train"], progress=False, speller=world["speller"],
                          aligner=world["aligner"], **kw)

    rep = run(choose_mix_on=world["train"], choose_mix_cache=world["cache"], choose_mix_rows=3)
    plain = at.analyze(world["connector"], world["valid"], world["cache"], llm=world["llm"],
                       train_manifest=world["train"], progress=False)
    assert rep["items"] == plain["items"]  # SSR's outcomes are untouched
    assert rep["mix"]["chosen_on"] == world["train"] and rep["mix"]["rows"] == 3
    assert rep["mix"]["weight"] in sp.MIX_GRID and len(rep["mix"]["grid"]) == len(sp.MIX_GRID)
    assert set(rep["items_speller"]) == set(rep["items_mix"]) == set(rep["items"])
    for name, f in rep["classes"].items():
        for k in ("speller_acc", "speller_cosine", "mix_acc", "mix_cosine", "spelled"):
            assert k in f
        if f["tokens"]:
            assert 0.0 <= f["speller_acc"] <= 1.0 and 0.0 <= f["spelled"] <= 1.0
            assert set(rep["paired"][name]) == {"mix_vs_ssr", "speller_vs_ssr"}
            assert "mix - SSR" in rep["paired"][name]["mix_vs_ssr"]["line"]
            assert rep["paired"][name]["mix_vs_ssr"]["n"] == f["tokens"]
    spelled = rep["items_spelled"]
    last = {}
    for k in spelled:
        utt, j = k.rsplit("/", 1)
        last[utt] = max(last.get(utt, 0), int(j))
    assert all(spelled[f"{u}/{j}"] == 0 for u, j in last.items())  # the "." has an empty span: falls back
    assert 0.0 < rep["classes"]["all"]["spelled"] == sum(spelled.values()) / len(spelled) < 1.0
    assert len(rep["spelling_examples"]) == min(40, len(rep["items"]))
    for e in rep["spelling_examples"]:
        assert bool(e["heard"]) == bool(spelled[e["item"]]) and set(e["heard"]) <= set(ALPHABET)
    assert "speller acc" in at.markdown_table(rep) and "mix cosine" in at.markdown_table(rep)
    # fallen-back tokens score as SSR's; w = 0 is SSR; w = 1 is the speller (nearest row: norm-free)
    assert all(rep["items_speller"][k] == rep["items"][k] for k, v in spelled.items() if not v)
    assert run(mix=0.0)["items_mix"] == rep["items"]
    w1 = run(mix=1.0)
    assert w1["items_mix"] == w1["items_speller"] and w1["mix"] == {"weight": 1.0, "chosen_on": None}
    ((label, pair),) = compare_reports(w1, w1, items_a="items_mix", items_b="items_speller")
    assert pair.diff == 0.0 and "[items_mix]" in label


def test_analysis_spelling_errors(world, tmp_path):
    from speechlm.eval import token_analysis as at

    def run(**kw):
        return at.analyze(world["connector"], world["valid"], world["cache"], llm=world["llm"], progress=False, **kw)

    with pytest.raises(ConfigError, match="both a speller"):
        run(speller=world["speller"])
    with pytest.raises(ConfigError, match="not both"):
        run(speller=world["speller"], aligner=world["aligner"], mix=0.5, choose_mix_on=world["train"],
            choose_mix_cache=world["cache"])
    with pytest.raises(ConfigError, match="also analysed"):
        run(speller=world["speller"], aligner=world["aligner"], choose_mix_on=world["valid"],
            choose_mix_cache=world["cache"])
    with pytest.raises(ConfigError, match="feature cache"):
        run(speller=world["speller"], aligner=world["aligner"], choose_mix_on=world["train"])
    with pytest.raises(ModelError, match="not a speller folder"):
        run(speller=tmp_path, aligner=world["aligner"])
    other = Speller(tiny_config(d_llm=24))
    other.save_pretrained(tmp_path / "wide")
    with pytest.raises(ModelError, match="wide: speller outputs d_llm=24"):
        run(speller=tmp_path / "wide", aligner=world["aligner"])


def test_heard_text_and_rates_are_consistent():
    lp = torch.from_numpy(peaky_posteriors([0, label("a"), 0, label("b")], V))
    assert sp.heard_text(sp.soft_spelling(lp, 0, 3), ALPHABET) == "ab"
    assert math.isclose(float(sp.soft_spelling(lp, 0, 3).sum()), 2.0, rel_tol=1e-6)
    assert np.isfinite(sp.soft_spelling(lp, 0, 3).numpy()).all()


def test_train_speller_command_line(world, tmp_path):
    import subprocess
    import sys

    tool = Path(__file__).resolve().parents[1] / "tools" / "train_speller.py"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(tool), "--llm", world["llm"], "--steps", "5", "--batch-size", "16",
                               "--d-model", "32", "--layers", "1", "--heads", "2", "--eval-every", "0",
                               "--no-progress", *args], check=False, capture_output=True, text=True, timeout=300)

    done = run("--aligner", world["aligner"], "--out", str(tmp_path / "sp"))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert summary["steps_done"] == 5 and summary["held_out_tokens"] > 0
    model = load_speller(tmp_path / "sp", alphabet=ALPHABET, d_llm=16)
    assert model.config.llm_vocab_size > 0 and float(model.offset.abs().sum()) > 0  # tied to the LLM's table
    with pytest.raises(ModelError, match="not an aligner folder"):  # what the command reports for a wrong folder
        st.aligner_alphabet(tmp_path)
