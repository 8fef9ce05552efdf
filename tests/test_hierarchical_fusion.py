"""Layer fusion option (issue 12 item 3): hierarchical feature fusion in every connector, the weighted default
unchanged, save/load (also of folders from before the option), parameter counts, the one-layer cache cut, and the
benchmark's table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from speechlm.errors import ConfigError, FeatureCacheError
from speechlm.models.connectors import LayerFusion, build_connector, load_connector
from speechlm.models.connectors.fusion import (
    FusionStep,
    HierarchicalFusion,
    fusion_param_count,
    layer_groups,
    make_layer_fusion,
)

ROOT = Path(__file__).resolve().parents[1]
D_ENC, D_LLM, L = 16, 24, 5
NAMES = ["ssr", "stack", "conv", "qformer"]
NEW_FIELDS = ("layer_fusion", "fusion_group", "fusion_dim")


def small(name, **kw):
    extra = {"d_model": 32, "n_heads": 4} if name in ("ssr", "qformer") else {"hidden": 32}
    return build_connector({"name": name, "d_enc": D_ENC, "d_llm": D_LLM, "n_enc_layers": L, **extra, **kw})


def batch(n_layers=L, t=60, lengths=(60, 37)):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(lengths), n_layers, t, D_ENC, generator=g)
    for b, n in enumerate(lengths):
        feats[b, :, n:] = 0  # the encoder's padding
    bnd = torch.tensor([[5, 10, 10, 30, 52], [3, 20, 36, 0, 0]])
    tmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return feats, torch.tensor(lengths), bnd, tmask


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------- the module
def test_groups_run_bottom_to_top_and_the_top_group_keeps_the_rest():
    assert layer_groups(7, 2) == [[0, 1], [2, 3], [4, 5], [6]]
    assert layer_groups(6, 3) == [[0, 1, 2], [3, 4, 5]]
    assert layer_groups(2, 2) == [[0, 1]]
    assert layer_groups(3, 1) == [[0], [1], [2]]
    f = HierarchicalFusion(7, 8, group=2)
    # step 1 sees its group; every later step sees the previous output and its group
    assert [s.n_inputs for s in f.steps] == [2, 3, 3, 2]


def test_step_is_mean_plus_mlp_and_fusion_matches_by_hand():
    torch.manual_seed(0)
    f = HierarchicalFusion(3, 4, group=2, fusion_dim=6).eval()
    x = torch.randn(2, 3, 5, 4)
    s0, s1 = f.steps

    def step(s: FusionStep, xs):
        cat = torch.cat(xs, -1)
        return torch.stack(xs).mean(0) + s.out(torch.nn.functional.gelu(s.inp(s.norm(cat))))

    h1 = step(s0, [x[:, 0], x[:, 1]])
    h2 = step(s1, [h1, x[:, 2]])
    assert torch.allclose(f(x), h2, atol=1e-6)


@pytest.mark.parametrize("n_layers,group,fusion_dim", [(7, 2, 0), (5, 2, 12), (4, 4, 0), (3, 1, 8), (2, 3, 0)])
def test_parameter_count_by_hand(n_layers, group, fusion_dim):
    d = 16
    f = HierarchicalFusion(n_layers, d, group, fusion_dim)
    hidden = fusion_dim or d
    expected = 0
    for k, g in enumerate(layer_groups(n_layers, group)):
        n = len(g) + (1 if k else 0)
        expected += 2 * n * d + n * d * hidden + hidden + hidden * d + d  # LayerNorm, W_1 + b_1, W_2 + b_2
    assert n_params(f) == expected == HierarchicalFusion.param_count(n_layers, d, group, fusion_dim)


def test_worked_count_for_whisper_base_all_layers():
    # 7 hidden states of 512, groups [0,1] [2,3] [4,5] [6]: steps of 2, 3, 3, 2 inputs of 512, width 512
    per = {n: 2 * n * 512 + n * 512 * 512 + 512 + 512 * 512 + 512 for n in (2, 3)}
    assert HierarchicalFusion.param_count(7, 512, 2, 0) == 2 * per[2] + 2 * per[3] == 3_684_352


def test_padding_frames_stay_zero_and_do_not_change_real_frames():
    torch.manual_seed(0)
    f = HierarchicalFusion(4, D_ENC, 2)
    feats, lengths, _, _ = batch(4)
    out = f(feats, lengths)
    assert torch.all(out[1, 37:] == 0) and out[1, :37].abs().sum() > 0
    alone = f(feats[1:, :, :37], lengths[1:])
    assert torch.allclose(out[1, :37], alone[0], atol=1e-6)


def test_every_layer_reaches_the_output():
    torch.manual_seed(0)
    f = HierarchicalFusion(5, 8, 2)
    x = torch.randn(1, 5, 3, 8, requires_grad=True)
    f(x).sum().backward()
    assert all(x.grad[0, i].abs().sum() > 0 for i in range(5))


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="at least 2 encoder layers"):
        small("ssr", n_enc_layers=1, layer_fusion="hierarchical")
    with pytest.raises(ConfigError, match="unknown layer_fusion 'attention'"):
        small("stack", layer_fusion="attention")
    with pytest.raises(ConfigError, match="fusion_group must be >= 1"):
        small("conv", layer_fusion="hierarchical", fusion_group=0)
    with pytest.raises(ConfigError, match="fusion_dim must be >= 0"):
        small("qformer", layer_fusion="hierarchical", fusion_dim=-1)
    # the weighted default ignores the hierarchical knobs and takes one layer
    assert isinstance(small("ssr", n_enc_layers=1, fusion_group=0).fusion, LayerFusion)


# ------------------------------------------------------------------------------------------ in the connectors
@pytest.mark.parametrize("name", NAMES)
def test_default_is_the_old_weighted_fusion(name):
    conn = small(name)
    assert conn.cfg.layer_fusion == "weighted" and type(conn.fusion) is LayerFusion
    keys = list(conn.state_dict())
    assert [k for k in keys if k.startswith("fusion.")] == ["fusion.logits"]
    assert conn.fusion.logits.shape == (L,)
    one = small(name, n_enc_layers=1)
    assert not [k for k in one.state_dict() if k.startswith("fusion.")]  # one layer: no weights, as before
    # the rest of the connector is the same whichever fusion sits in front
    hier = small(name, layer_fusion="hierarchical")
    assert [k for k in hier.state_dict() if not k.startswith("fusion.")] == [k for k in keys if k != "fusion.logits"]
    # and it computes the softmax-weighted sum, as before
    feats = batch()[0]
    with torch.no_grad():
        conn.fusion.logits.copy_(torch.linspace(-1, 1, L))
    w = torch.softmax(torch.linspace(-1, 1, L), 0)
    assert torch.allclose(conn.fusion(feats, batch()[1]), torch.einsum("bltd,l->btd", feats, w), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_hierarchical_keeps_shapes_masks_and_padding_invariance(name):
    torch.manual_seed(0)
    plain = small(name).eval()
    conn = small(name, layer_fusion="hierarchical").eval()
    assert isinstance(conn.fusion, HierarchicalFusion)
    feats, lengths, bnd, tmask = batch()
    a, b = plain(feats, lengths, bnd, tmask), conn(feats, lengths, bnd, tmask)
    assert a.embeds.shape == b.embeds.shape and torch.equal(a.mask, b.mask)
    assert torch.all(b.embeds[~b.mask] == 0) and torch.isfinite(b.embeds).all()
    alone = conn(feats[1:, :, :37], lengths[1:], bnd[1:, :3], tmask[1:, :3])
    n = int(alone.mask.sum())
    assert torch.allclose(b.embeds[1, :n], alone.embeds[0, :n], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fusion_weights_get_gradients(name):
    torch.manual_seed(0)
    conn = small(name, layer_fusion="hierarchical", fusion_dim=8).train()
    conn(*batch()).embeds.square().mean().backward()
    fusion = dict(conn.fusion.named_parameters())
    assert len(fusion) == 6 * len(conn.fusion.steps)  # norm, inp, out: weight + bias each
    dead = [k for k, p in fusion.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    missing = [k for k, p in conn.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("name", NAMES)
def test_connector_parameter_counts(name):
    weighted, hier = small(name), small(name, layer_fusion="hierarchical", fusion_group=2, fusion_dim=12)
    assert n_params(weighted.fusion) == fusion_param_count(weighted.cfg) == L
    assert n_params(hier.fusion) == fusion_param_count(hier.cfg) == HierarchicalFusion.param_count(L, D_ENC, 2, 12)
    assert n_params(hier) - n_params(weighted) == fusion_param_count(hier.cfg) - L
    assert fusion_param_count(small(name, n_enc_layers=1).cfg) == 0


def test_make_layer_fusion_follows_the_config():
    cfg = small("ssr").cfg
    assert type(make_layer_fusion(cfg)) is LayerFusion
    cfg.layer_fusion, cfg.fusion_group = "hierarchical", 3
    f = make_layer_fusion(cfg)
    assert isinstance(f, HierarchicalFusion) and f.groups == [[0, 1, 2], [3, 4]] and f.hidden == D_ENC


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("name", NAMES)
def test_hierarchical_connector_round_trips(tmp_path, name):
    torch.manual_seed(0)
    conn = small(name, layer_fusion="hierarchical", fusion_group=3, fusion_dim=8).eval()
    conn.save_pretrained(tmp_path / "c")
    saved = json.loads((tmp_path / "c" / "config.json").read_text())["config"]
    assert {k: saved[k] for k in NEW_FIELDS} == {"layer_fusion": "hierarchical", "fusion_group": 3, "fusion_dim": 8}
    back = load_connector(tmp_path / "c").eval()
    assert (back.cfg.layer_fusion, back.cfg.fusion_group, back.cfg.fusion_dim) == ("hierarchical", 3, 8)
    assert torch.equal(conn(*batch()).embeds, back(*batch()).embeds)


@pytest.mark.parametrize("name", NAMES)
def test_folder_saved_before_the_option_still_loads(tmp_path, name):
    torch.manual_seed(0)
    conn = small(name).eval()
    conn.save_pretrained(tmp_path / "c")
    path = tmp_path / "c" / "config.json"
    meta = json.loads(path.read_text())
    for k in NEW_FIELDS:  # what connector folders written before the option hold
        del meta["config"][k]
    path.write_text(json.dumps(meta, indent=2))
    back = load_connector(tmp_path / "c").eval()
    assert back.cfg.layer_fusion == "weighted" and type(back.fusion) is LayerFusion
    assert torch.equal(conn(*batch()).embeds, back(*batch()).embeds)


def test_checkpoint_identity_from_before_the_option_matches():
    """A stage checkpoint's saved identity without the new fields reads them as their defaults (engine resume)."""
    import dataclasses

    from speechlm.training.engine import _with_new_defaults

    cfg = dataclasses.asdict(small("ssr").cfg)
    old = {"stage": "stage1", "connector": {k: v for k, v in cfg.items() if k not in NEW_FIELDS}}
    assert _with_new_defaults(old) == {"stage": "stage1", "connector": cfg}


# ------------------------------------------------------------------------------------- feature-cache layer cut
@pytest.fixture(scope="module")
def all_layers_cache(tmp_path_factory):
    from test_encoder import make_whisper

    from speechlm.data.audio import save_audio
    from speechlm.data.feature_cache import build_feature_cache
    from speechlm.data.manifest import Utterance, write_manifest
    from speechlm.models.encoder import SpeechEncoder

    root = tmp_path_factory.mktemp("fusion_cache")
    enc = SpeechEncoder(make_whisper(root / "whisper"), layers=(0, 1, 2))
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, s in enumerate((0.6, 1.1, 0.3)):
        save_audio(root / "audio" / f"u{i}.wav", 0.1 * torch.randn(int(s * 16000), generator=g), 16000)
        rows.append(Utterance(id=f"u{i}", audio=f"audio/u{i}.wav", sample_rate=16000, duration_s=s, text="x",
                              split="train"))
    write_manifest(root / "m.jsonl", rows)
    build_feature_cache(root / "m.jsonl", enc, root / "all", batch_size=2, shard_mb=0.001)
    return root


def test_select_layers_cuts_a_cache_without_the_encoder(all_layers_cache):
    from speechlm.data.feature_cache import FeatureCache, select_layers

    src = FeatureCache.open(all_layers_cache / "all")
    assert src.layers == (0, 1, 2) and len(src.index["shards"]) >= 2
    cut = select_layers(all_layers_cache / "all", all_layers_cache / "top", [2])
    assert cut.layers == (2,) and cut.encoder_key == {**src.encoder_key, "layers": [2]}
    assert cut.ids == src.ids and cut.index["utterances"] == src.index["utterances"]
    for u in src.ids:
        assert torch.equal(cut[u], src[u][2:3]) and cut.frames(u) == src.frames(u)
    two = select_layers(all_layers_cache / "all", all_layers_cache / "two", [2, 0])
    assert torch.equal(two["u1"], src["u1"][[2, 0]])
    mtimes = {p.name: p.stat().st_mtime_ns for p in (all_layers_cache / "top").glob("shard-*")}
    select_layers(all_layers_cache / "all", all_layers_cache / "top", [2])  # complete and current: kept
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (all_layers_cache / "top").glob("shard-*")}
    with pytest.raises(FeatureCacheError, match=r"layers \[5\] are not in the feature cache"):
        select_layers(all_layers_cache / "all", all_layers_cache / "bad", [5])


# ---------------------------------------------------------------------------------------------- the benchmark
@pytest.fixture(scope="module")
def bench():
    from speechlm.perf.benchmarks import fusion as bench_fusion

    return bench_fusion


def test_bench_variants_and_cache_cost(bench, all_layers_cache):
    plans = bench.variants(depth=6, middle=3, group=2, fusion_dim=0)
    assert list(plans) == list(bench.VARIANTS)
    assert plans["top"]["layers"] == [6] and plans["middle"]["layers"] == [3]
    assert plans["weighted"]["layers"] == plans["hierarchical"]["layers"] == list(range(7))
    assert plans["hierarchical"]["connector"] == {"layer_fusion": "hierarchical", "fusion_group": 2, "fusion_dim": 0}
    stats = bench.cache_stats(all_layers_cache / "all")
    # L x D x frame rate x 2 bytes (fp16): 3 layers of 32 at 50 Hz
    assert stats["bytes_per_s"] == 3 * 32 * 50.0 * 2 and stats["layers"] == [0, 1, 2]
    assert stats["bytes_per_s"] <= stats["bytes_per_s_measured"] < 1.5 * stats["bytes_per_s"]  # + headers
    from speechlm.data.feature_cache import select_layers

    select_layers(all_layers_cache / "all", all_layers_cache / "top", [2])  # the one-layer cut (kept if there)
    top = bench.cache_stats(all_layers_cache / "top")
    assert top["bytes_per_s"] * 3 == stats["bytes_per_s"] and top["audio_s"] == stats["audio_s"]


def test_bench_table_and_params(bench):
    cfg = {"name": "ssr", "d_enc": D_ENC, "d_llm": D_LLM, "n_enc_layers": L, "d_model": 32, "n_heads": 4,
           "layer_fusion": "hierarchical", "fusion_dim": 8}
    params, fusion = bench.connector_params(cfg)
    assert fusion == HierarchicalFusion.param_count(L, D_ENC, 2, 8) and params == n_params(build_connector(cfg))

    def cache(n):
        return {"layers": list(range(n)), "bytes_per_s": n * 51_200.0, "bytes_per_s_measured": n * 51_300.0}

    rows = [{"variant": "top", "layers": [6], "cosine": 0.61, "token_acc": 0.4, "loss": 6.1, "params": 2_772_000,
             "params_fusion": 0, "step_time_s_median": 0.2, "cache": cache(1)},
            {"variant": "hierarchical", "layers": list(range(7)), "cosine": 0.65, "token_acc": 0.43, "loss": 5.9,
             "params": 5_927_968, "params_fusion": 3_684_352, "step_time_s_median": 0.31, "cache": cache(7)}]
    text = bench.table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[1] == "|" + "---|" * 9
    assert lines[2] == "| top layer only | 6 | 0.610 | 0.400 | 6.100 | 2.772 M (0) | 0.200 | 51.2 (51.3) | 1x |"
    assert lines[3] == ("| hierarchical fusion of all layers | 0..6 | 0.650 | 0.430 | 5.900 | 5.928 M (3,684,352) | "
                        "0.310 | 358.4 (359.1) | 7x |")


def test_bench_refuses_unknown_variants_and_missing_runs(bench, tmp_path):
    script = [sys.executable, str(ROOT / "tools" / "benchmarks" / "bench_fusion.py")]
    for argv, message in ((["--variants", "top,attention", "--run", str(tmp_path)],
                           "bench_fusion --variants: unknown choice"),
                          (["--run", str(tmp_path / "nope"), "--llm", str(tmp_path), "--encoder", str(tmp_path)],
                           "bench_fusion: train not found")):
        proc = subprocess.run([*script, *argv], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode != 0 and f"{ConfigError.__name__}: {message}" in proc.stderr, proc.stderr[-2000:]


def test_bench_variant_caches_and_stage1_command(bench, all_layers_cache, tmp_path, monkeypatch):
    import argparse

    from speechlm.config import load_config
    from speechlm.training.configs import Stage1Config

    all_root = tmp_path / "all"
    all_root.mkdir()
    for split in bench.SPLITS:  # the same cache stands in for both splits
        (all_root / split).symlink_to(all_layers_cache / "all", target_is_directory=True)
    assert bench.variant_features(all_root, tmp_path, [0, 1, 2]) == all_root  # every layer: the cache itself
    one = bench.variant_features(all_root, tmp_path, [1])
    assert one == tmp_path / "features" / "layer1"
    assert all((one / s / "index.json").is_file() for s in bench.SPLITS)

    calls = []
    monkeypatch.setattr(bench.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    paths = {"train": tmp_path / "train.jsonl", "valid": tmp_path / "valid.jsonl", "llm": tmp_path / "llm",
             "encoder": tmp_path / "enc", "config": ROOT / "recipes" / "configs" / "stage1_small.yaml"}
    args = argparse.Namespace(retrain=False, steps=5, seed=1, ranks=1, master_port=29999)
    plan = bench.variants(6, 3, 3, 64)["hierarchical"]
    bench.train("hierarchical", plan, args, paths, tmp_path / "feats", tmp_path / "runs" / "hierarchical")
    (cmd,) = calls
    assert cmd[:2] == [sys.executable, str(ROOT / "recipes" / "stage1_distill.py")]
    i = cmd.index("--config")
    cfg = load_config(Stage1Config, cmd[i + 1], cmd[i + 2:])  # the overrides are the recipe's own keys
    assert cfg.model.connector.layer_fusion == "hierarchical" and cfg.model.connector.fusion_group == 3
    assert cfg.model.connector.fusion_dim == 64 and cfg.model.connector.name == "ssr"
    assert cfg.model.encoder_layers == list(range(7)) and cfg.loop.max_steps == 5 and cfg.seed == 1
    assert cfg.data.feature_cache == str(tmp_path / "feats" / "train")
    assert cfg.data.valid_feature_cache == str(tmp_path / "feats" / "valid")
