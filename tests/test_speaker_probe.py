"""Speaker probe: EER/minDCF against a brute-force sweep, AM-softmax, training on a tiny world, evaluation."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speechlm.config import load_config
from speechlm.data.manifest import read_manifest, write_manifest
from speechlm.errors import ConfigError, ManifestError
from speechlm.eval.speaker import (
    AMSoftmax,
    SpeakerProbeConfig,
    eer,
    evaluate_probe,
    min_dcf,
    score_trials,
    train_probe,
)
from tests.training_helpers import ROOT, make_world


# ------------------------------------------------------------------------------------------ metrics
def brute_force(scores, labels, p_target=0.01, c_miss=1.0, c_fa=1.0):
    """Every threshold (each distinct score, then +inf), counted one trial at a time."""
    n_tar = sum(labels)
    n_non = len(labels) - n_tar
    best_gap, eer_value, dcf_value = None, None, None
    for t in sorted(set(scores)) + [float("inf")]:
        miss = sum(1 for s, y in zip(scores, labels) if y and s < t) / n_tar
        fa = sum(1 for s, y in zip(scores, labels) if not y and s >= t) / n_non
        if best_gap is None or abs(miss - fa) < best_gap:
            best_gap, eer_value = abs(miss - fa), (miss + fa) / 2
        cost = (c_miss * miss * p_target + c_fa * fa * (1 - p_target)) / min(c_miss * p_target, c_fa * (1 - p_target))
        dcf_value = cost if dcf_value is None else min(dcf_value, cost)
    return eer_value, dcf_value


HAND = ([0.9, 0.8, 0.8, 0.7, 0.6, 0.55, 0.5, 0.4, 0.3, 0.3, 0.2, 0.1],
        [1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0])


def test_eer_and_min_dcf_on_a_hand_list():
    scores, labels = HAND
    want_eer, want_dcf = brute_force(scores, labels)
    got_eer, t = eer(np.array(scores), np.array(labels))
    assert got_eer == pytest.approx(want_eer) and t == 0.55
    # Threshold 0.55: targets below it 1 of 5 (0.3) -> P_miss 0.2; non-targets at/above it 2 of 7 (0.8, 0.6).
    assert got_eer == pytest.approx((1 / 5 + 2 / 7) / 2)
    assert min_dcf(np.array(scores), np.array(labels))[0] == pytest.approx(want_dcf)
    for p, cm, cf in ((0.05, 1, 1), (0.5, 1, 1), (0.01, 10, 1)):
        assert min_dcf(np.array(scores), np.array(labels), p, cm, cf)[0] == pytest.approx(
            brute_force(scores, labels, p, cm, cf)[1])


def test_metrics_match_brute_force_on_random_lists_and_edge_cases():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(4, 30)
        labels = [rng.random() < 0.4 for _ in range(n)]
        labels[0], labels[1] = True, False
        scores = [round(rng.gauss(0.5 if y else 0.0, 0.5), 1) for y in labels]  # rounding makes ties
        want_eer, want_dcf = brute_force(scores, labels)
        assert eer(np.array(scores), np.array(labels))[0] == pytest.approx(want_eer)
        assert min_dcf(np.array(scores), np.array(labels))[0] == pytest.approx(want_dcf)
    assert eer(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0]))[0] == 0.0  # separable
    assert min_dcf(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0]))[0] == 0.0
    assert eer(np.array([0.1, 0.9]), np.array([1, 0]))[0] == 1.0  # reversed
    with pytest.raises(ValueError, match="non-target"):
        eer(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="p_target"):
        min_dcf(np.array([0.1, 0.2]), np.array([1, 0]), p_target=0.0)


def test_score_trials_counts_all_pairs():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0]])
    r = score_trials(emb, ["a", "a", "b", "b"])
    assert r["trials"] == 6 and r["target_trials"] == 2 and r["eer"] == 0.0 and r["speakers"] == 2


# ---------------------------------------------------------------------------------------- AM-softmax
def test_am_softmax_margin_and_scale():
    torch.manual_seed(0)
    head = AMSoftmax(8, 5, margin=0.0, scale=10.0)
    emb, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    loss, logits = head(emb, labels)
    cos = F.normalize(emb, dim=-1) @ F.normalize(head.weight, dim=-1).T
    assert torch.allclose(logits, 10.0 * cos) and torch.allclose(loss, F.cross_entropy(10.0 * cos, labels))
    head.margin = 0.3  # the margin lowers only the true class's logit by scale * margin
    loss_m, logits_m = head(emb, labels)
    assert torch.allclose(logits - logits_m, 3.0 * F.one_hot(labels, 5).float()) and loss_m > loss
    with pytest.raises(ConfigError):
        AMSoftmax(8, 5, margin=-0.1)
    with pytest.raises(ConfigError):
        AMSoftmax(8, 1)


# ------------------------------------------------------------------------------------- tiny world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny training world's clips carry a tone of 200 + 40 * (i % 7) Hz: that tone is the 'speaker'.
    Speakers 0-4 train the probe; 5 and 6 are held out."""
    root = tmp_path_factory.mktemp("spk")
    paths = make_world(root, n_train=34, n_valid=8)
    rows = read_manifest(paths["manifest"])
    for i, u in enumerate(rows):
        u.speaker = f"tone{i % 7}/r100/p50"
        u.split = "train" if i % 7 < 5 else "test"
    write_manifest(root / "spk.jsonl", rows)
    paths["spk"] = str(root / "spk.jsonl")
    return paths


def probe_config(paths, out_dir, **over):
    base = [f"out_dir={out_dir}", f"data.train_manifest={paths['spk']}", f"data.feature_cache={paths['cache']}",
            "model.d_model=16", "model.n_heads=2", "model.embed_dim=8", "model.att_dim=8", "train.steps=30",
            "train.batch_size=8", "train.lr=1e-2", "train.warmup_steps=3", "train.progress=false",
            "data.crop=40", "train.margin=0.1", "train.scale=10"]
    return load_config(SpeakerProbeConfig, str(ROOT / "recipes/configs/speaker_probe_tiny.yaml"),
                       base + [f"{k}={v}" for k, v in over.items()])


def test_probe_trains_on_encoder_features_and_scores_held_out_speakers(world, tmp_path):
    m = train_probe(probe_config(world, tmp_path / "plain"))
    assert m["train_speakers"] == 5 and m["loss_last"] < 0.8 * m["loss_first"]
    pf = train_probe(probe_config(world, tmp_path / "pf", **{"model.partition_groups": 2}))
    assert pf["loss_last"] < pf["loss_first"] and pf["params_blocks"] < m["params_blocks"]
    r = evaluate_probe(tmp_path / "plain/probe", [world["spk"]], [world["cache"]], progress=False)
    assert r["held_out_speakers"] == ["tone5", "tone6"] and r["dropped_seen_speaker_rows"] == 30
    assert r["utterances"] == 12 and r["trials"] == 66 and 0.0 <= r["eer"] <= 1.0 and 0.0 <= r["min_dcf"] <= 1.0
    # The command-line tool writes the same result.
    out = tmp_path / "eval.json"
    cmd = [sys.executable, str(ROOT / "tools" / "eval_speaker.py"), "--probe", str(tmp_path / "plain/probe"),
           "--manifest", world["spk"], "--features", world["cache"], "--out", str(out), "--no-progress", "--threads", "1"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"EER {100 * r['eer']:.2f}%" in done.stdout
    assert json.loads(out.read_text())["eer"] == pytest.approx(r["eer"])


def test_probe_on_connector_vectors(world, tmp_path):
    from speechlm.models.connectors import build_connector

    conn = build_connector({"name": "ssr", "d_enc": 16, "d_llm": 12, "d_model": 16, "n_heads": 2, "n_layers": 1})
    conn.save_pretrained(tmp_path / "conn")
    m = train_probe(probe_config(world, tmp_path / "c", **{"data.input": "connector",
                                                            "data.connector": str(tmp_path / "conn")}))
    assert m["loss_last"] < m["loss_first"]
    r = evaluate_probe(tmp_path / "c/probe", [world["spk"]], [world["cache"]], progress=False)
    assert r["input"] == "connector" and r["speakers"] == 2


def test_bad_probe_inputs_raise(world, tmp_path):
    with pytest.raises(ConfigError, match="data.input"):
        train_probe(probe_config(world, tmp_path / "x", **{"data.input": "mel"}))
    with pytest.raises(ConfigError, match="data.connector"):
        train_probe(probe_config(world, tmp_path / "x", **{"data.input": "connector"}))
    rows = read_manifest(world["spk"])
    for u in rows:
        u.speaker = None
    write_manifest(tmp_path / "nospk.jsonl", rows)
    with pytest.raises(ManifestError, match="speaker"):
        train_probe(probe_config(world, tmp_path / "x", **{"data.train_manifest": str(tmp_path / "nospk.jsonl")}))
    with pytest.raises(ConfigError, match="partition_groups=3"):
        train_probe(probe_config(world, tmp_path / "x", **{"model.partition_groups": 3}))
    assert not Path(tmp_path / "x" / "probe").exists()
