"""The real-scale recipe (Llama-3-8B, w2v-BERT 2.0 / Whisper large-v3, LibriSpeech) checked without its models.

Its YAML configs are loaded through the same config classes as the recipes (unknown keys fail), then
every component is built from them with tiny random stand-ins of the same architectures (a Llama with
grouped-query attention, a w2v-BERT / Whisper-with-128-mel-bins encoder) and one optimizer step of the
aligner, stage 1 and stage 2 runs; only model paths, sizes and the CPU's precision are overridden.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import WORDS, make_tokenizer, make_whisper

from alignment.training import TrainAlignerConfig
from speechlm.config import load_config
from speechlm.errors import ConfigError
from speechlm.training.configs import Stage1Config, Stage2Config
from speechlm.training.engine import ds_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
STAGE1 = CONFIGS / "librispeech_llama3_stage1.yaml"
STAGE2 = CONFIGS / "librispeech_llama3_stage2.yaml"
ALIGNER = CONFIGS / "aligner_librispeech.yaml"
SCRIPT = ROOT / "recipes" / "run_librispeech_llama3.sh"
SR = 16_000


# ------------------------------------------------------------------------------------- configs
def test_real_configs_hold_the_method_hyperparameters():
    for cls, path in ((Stage1Config, STAGE1), (Stage2Config, STAGE2)):
        cfg = load_config(cls, path)
        e = cfg.engine
        assert (e.lr, list(e.betas), e.weight_decay, e.warmup_steps, e.lr_floor) == (1e-4, [0.9, 0.95], 0.1, 2000, 0.2)
        assert e.precision == "bf16" and e.zero_stage == 2
        assert cfg.data.max_tokens == 512
        assert cfg.model.connector.name == "ssr" and cfg.model.connector.n_layers == 4
        # the DeepSpeed JSON it names exists (relative to the repository root, where the script runs) and agrees
        conf = json.loads((ROOT / e.ds_config).read_text())
        assert conf["zero_optimization"]["stage"] == e.zero_stage
    assert load_config(Stage2Config, STAGE2).model.gradient_checkpointing
    zero3 = json.loads((ROOT / "recipes" / "ds" / "zero3_gpu.json").read_text())
    assert zero3["zero_optimization"]["stage"] == 3
    acfg = load_config(TrainAlignerConfig, ALIGNER)
    assert acfg.model.kind == "charCTC" and acfg.model.layers == 4


def test_real_configs_reject_a_wrong_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(STAGE1.read_text().replace("warmup_steps:", "warmup_step:"))
    with pytest.raises(ConfigError, match="warmup_step"):
        load_config(Stage1Config, bad)


@pytest.mark.parametrize("ds_json", ["zero2_gpu.json", "zero3_gpu.json"])
def test_bf16_follows_the_accelerator(ds_json):
    from deepspeed.accelerator import get_accelerator

    engine = replace(load_config(Stage1Config, STAGE1).engine, ds_config=str(ROOT / "recipes" / "ds" / ds_json))
    acc = get_accelerator()
    if acc.device_name() == "cpu" or not acc.is_bf16_supported():
        with pytest.raises(ConfigError, match="bf16"):  # bf16 asked for, none there: an error, not fp32
            ds_config(engine)
    else:
        assert ds_config(engine)["bf16"]["enabled"] is True
    conf = ds_config(replace(engine, precision="fp32"))
    assert conf["bf16"]["enabled"] is False and conf["gradient_accumulation_steps"] == engine.grad_accum


def test_shell_script_parses_and_uses_the_configs():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    text = SCRIPT.read_text()
    for name in (STAGE1.name, STAGE2.name, ALIGNER.name, "--hostfile", "data.train_shards="):
        assert name in text, name


# -------------------------------------------------------------------------- tiny stand-ins
def _tiny_llama3(folder: Path) -> int:
    """Word-level tokenizer + a random Llama with Llama-3's architecture knobs (GQA, rope 500k, untied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, rope_theta=500000.0,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return cfg.hidden_size


def _tiny_encoder(kind: str, folder: Path) -> None:
    torch.manual_seed(0)
    if kind == "w2v-bert":  # facebook/w2v-bert-2.0: conformer, relative_key positions, fbank stacked by 2
        from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

        cfg = Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 output_hidden_size=32, feature_projection_input_dim=160, conv_depthwise_kernel_size=5,
                                 position_embeddings_type="relative_key", left_max_position_embeddings=16,
                                 right_max_position_embeddings=4, add_adapter=False)
        Wav2Vec2BertModel(cfg).save_pretrained(folder)
        SeamlessM4TFeatureExtractor().save_pretrained(folder)
    else:  # openai/whisper-large-v3: 128 mel bins
        make_whisper(folder, encoder_layers=2, mel_bins=128)


def _corpus(root: Path, n_train: int = 16, n_valid: int = 4) -> None:
    """LibriSpeech-like raw manifests (UPPER-CASE transcripts) with token boundaries at 50 Hz."""
    from speechlm.data.audio import save_audio
    from speechlm.data.manifest import Utterance, write_manifest

    rng, np_rng = random.Random(0), np.random.default_rng(0)
    rows = []
    for i in range(n_train + n_valid):
        n_words = rng.randint(3, 6)
        text = " ".join(rng.choice(WORDS) for _ in range(n_words)).upper()
        samples = int((0.3 * n_words + 0.2) * SR)
        t = np.arange(samples) / SR
        wave = 0.1 * np_rng.standard_normal(samples) + 0.2 * np.sin(2 * np.pi * (150 + 30 * (i % 5)) * t)
        save_audio(root / "audio" / f"s{i:03d}.flac", wave.astype(np.float32), SR)
        frames = samples * 50 // SR
        rows.append(Utterance(id=f"s{i:03d}", audio=str(root / "audio" / f"s{i:03d}.flac"), sample_rate=SR,
                              duration_s=samples / SR, text=text, split="train" if i < n_train else "valid",
                              token_boundaries=[(k + 1) * frames // n_words - 1 for k in range(n_words)],
                              boundary_frame_rate_hz=50.0))
    write_manifest(root / "raw" / "train.jsonl", rows[:n_train])
    write_manifest(root / "raw" / "valid.jsonl", rows[n_train:])


def _tool(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    """Run tools/<name>.py as the shell script does (a test of a script's command line runs it)."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=str(ROOT), timeout=300, check=False)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module", params=["w2v-bert", "whisper"])
def world(request, tmp_path_factory) -> dict[str, str]:
    """The script's data flow on a tiny corpus: lower-cased shards, per-shard caches merged into one."""
    from speechlm.data.cache_jobs import merge_feature_caches
    from speechlm.data.feature_cache import build_feature_cache
    from speechlm.data.sharding import shard_manifests
    from speechlm.models.encoder import SpeechEncoder

    root = tmp_path_factory.mktemp(f"realscale-{request.param}")
    hidden = _tiny_llama3(root / "llm")
    _tiny_encoder(request.param, root / "enc")
    _corpus(root)
    shard_manifests([root / "raw" / "train.jsonl"], root / "shards", "train", shards=2, lowercase=True)
    shard_manifests([root / "raw" / "valid.jsonl"], root / "manifests", "valid", lowercase=True)
    encoder = SpeechEncoder(str(root / "enc"))
    parts = sorted((root / "shards").glob("train-*.jsonl"))
    for k, part in enumerate(parts):
        build_feature_cache(part, encoder, root / "feats" / f"train-part-{k}")
    merged = merge_feature_caches([root / "feats" / f"train-part-{k}" for k in range(len(parts))],
                                  root / "feats" / "train")
    assert len(merged) == 16
    build_feature_cache(root / "manifests" / "valid.jsonl", encoder, root / "feats" / "valid")
    return {"kind": request.param, "llm": str(root / "llm"), "enc": str(root / "enc"), "root": str(root),
            "shards": str(root / "shards" / "train-*.jsonl"), "valid": str(root / "manifests" / "valid.jsonl"),
            "cache": str(root / "feats" / "train"), "valid_cache": str(root / "feats" / "valid"),
            "d_llm": str(hidden)}


def test_shards_are_lowercased_round_robin(tmp_path):
    from speechlm.data.manifest import Utterance, read_manifest, write_manifest

    rows = [Utterance(id=f"u{i}", audio="a.wav", sample_rate=SR, duration_s=1.0, text=f"WORD {i}", split="train")
            for i in range(7)]
    write_manifest(tmp_path / "a.jsonl", rows[:4])
    write_manifest(tmp_path / "b.jsonl", rows[4:])
    _ok(_tool("shard_manifest", "--in", tmp_path / "a.jsonl", tmp_path / "b.jsonl", "--out-dir", tmp_path / "s",
              "--name", "train", "--shards", "3", "--lowercase"))
    got = [[u.id for u in read_manifest(p)] for p in sorted((tmp_path / "s").glob("train-*-of-00003.jsonl"))]
    assert got == [["u0", "u3", "u6"], ["u1", "u4"], ["u2", "u5"]]
    assert read_manifest(tmp_path / "s" / "train-00000-of-00003.jsonl")[1].text == "word 3"
    assert _tool("shard_manifest", "--in", tmp_path / "a.jsonl", tmp_path / "a.jsonl", "--out-dir", tmp_path / "d",
                 "--name", "x").returncode == 1  # the same id twice


def test_merged_cache_refuses_another_encoder_and_duplicates(world, tmp_path):
    from speechlm.data.cache_jobs import merge_feature_caches as merge
    from speechlm.data.feature_cache import FeatureCache, build_feature_cache
    from speechlm.errors import FeatureCacheError
    from speechlm.models.encoder import SpeechEncoder

    root = Path(world["root"])
    merged = FeatureCache.open(world["cache"])
    part = FeatureCache.open(root / "feats" / "train-part-0")
    for utt_id in part.ids:  # the merged cache serves the very same features
        assert torch.equal(merged[utt_id], part[utt_id])
    with pytest.raises(FeatureCacheError, match="also in another"):
        merge([root / "feats" / "train-part-0", root / "feats" / "train-part-0"], tmp_path / "dup")
    other = SpeechEncoder(world["enc"], layers=[0])  # other settings: layer 0
    build_feature_cache(world["valid"], other, tmp_path / "other")
    with pytest.raises(FeatureCacheError, match="other encoder settings"):
        merge([root / "feats" / "train-part-0", tmp_path / "other"], tmp_path / "mixed")


# ------------------------------------------------------------------------------ one step each
def test_aligner_config_trains_on_the_stand_in(world):
    from alignment.training import train

    out = Path(world["root"]) / "aligner"
    cfg = load_config(TrainAlignerConfig, ALIGNER,
                      [f"train_manifest={world['root']}/shards/train-00000-of-00002.jsonl",
                       f"valid_manifest={world['valid']}", f"feature_cache_train={world['cache']}",
                       f"feature_cache_valid={world['valid_cache']}",
                       f"out_dir={out}", f"encoder={world['enc']}", "steps=1", "valid_every=1", "device=cpu",
                       "threads=1", "model.d_model=32", "model.heads=2"])
    assert train(cfg)["steps"] == 1
    saved = json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").is_file() and saved["layers"] == 4
    # tools/align.py as the script calls it: every row gets one boundary per LLM token
    aligned = Path(world["root"]) / "aligned" / "valid.jsonl"
    _ok(_tool("align", "--manifest", world["valid"], "--aligner", out, "--tokenizer", world["llm"],
              "--feature-cache", world["valid_cache"], "--out", aligned, "--skip-bad"))
    from speechlm.data.manifest import read_manifest

    rows = read_manifest(aligned)
    assert rows and all(len(u.token_boundaries) == len(u.text.split()) for u in rows)


# Both stages in one process (torch and DeepSpeed imported once), as the recipes run them.
DRIVER = r"""
import json, sys
from speechlm.config import load_config
from speechlm.training.configs import Stage1Config, Stage2Config
from speechlm.training.stage_runs import run_stage1, run_stage2
args = json.loads(sys.argv[1])
results = {"stage1": run_stage1(load_config(Stage1Config, args["stage1"][0], args["stage1"][1:]))}
for key in [k for k in args if k.startswith("stage2")]:
    results[key] = run_stage2(load_config(Stage2Config, args[key][0], args[key][1:]))
print("RESULTS " + json.dumps(results))
"""


def test_stage1_and_stage2_step_with_the_real_configs(world, tmp_path):
    out = tmp_path / "run"
    # Only model paths, model sizes, the CPU's precision and threads differ from the real configs.
    common = [f"model.llm={world['llm']}", f"model.encoder={world['enc']}", "model.connector.d_model=32",
              "model.connector.n_heads=2", f"data.train_shards={world['shards']}",
              f"data.valid_manifest={world['valid']}", f"data.feature_cache={world['cache']}",
              f"data.valid_feature_cache={world['valid_cache']}",
              "engine.precision=fp32", "engine.threads=1", "loop.max_steps=1", "loop.progress=false"]
    s1 = [str(STAGE1), *common, f"out_dir={out}/stage1"]  # the config file, then its overrides
    s2 = [str(STAGE2), *common, f"out_dir={out}/stage2", f"model.init_connector={out}/stage1/connector"]
    args = {"stage1": s1, "stage2": s2}
    if world["kind"] == "w2v-bert":  # the ZeRO-3 alternative of stage 2 (frozen LLM partitioned too)
        args["stage2_zero3"] = [str(STAGE2), *common, f"out_dir={out}/stage2_zero3",
                                f"model.init_connector={out}/stage1/connector", "engine.zero_stage=3",
                                "engine.ds_config=recipes/ds/zero3_gpu.json"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], capture_output=True,
                          text=True, cwd=str(ROOT), env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])

    r1 = results["stage1"]
    assert r1["steps"] == 1 and r1["frozen_unchanged"]
    assert all(np.isfinite(r1["final_valid"][k]) for k in ("loss", "cosine", "mse", "token_acc"))
    conn = json.loads((out / "stage1" / "connector" / "config.json").read_text())["config"]
    assert conn["n_layers"] == 4 and conn["d_llm"] == int(world["d_llm"]) and conn["mask"] == "causal"
    assert conn["encoder_name"] == "enc" and conn["dropout"] == 0.1

    for key in [k for k in results if k.startswith("stage2")]:
        r2 = results[key]
        assert r2["steps"] == 1 and r2["frozen_unchanged"], key
        for k in ("loss_speech", "loss_text", "leakage_gap", "cosine"):
            assert np.isfinite(r2["final_valid"][k]), (key, k)
        assert (out / key / "connector" / "config.json").is_file()


def test_leakage_cut_keeps_the_read_frame_for_w2v_bert(tmp_path):
    """w2v-BERT needs frames x hop + 240 samples for its frames: the cut audio must still hold frame b."""
    from speechlm.models.connectors.base import build_connector
    from speechlm.models.encoder import SpeechEncoder
    from speechlm.training.stages import _samples_for_frames, truncated_vectors

    _tiny_encoder("w2v-bert", tmp_path / "enc")
    encoder = SpeechEncoder(str(tmp_path / "enc"))
    spf = encoder.sample_rate / encoder.frame_rate_hz
    for frames in (1, 2, 7, 50):
        n = _samples_for_frames(encoder, frames, spf)
        assert int(encoder.frame_lengths(torch.tensor([n]))[0]) == frames
        assert int(encoder.frame_lengths(torch.tensor([n - 1]))[0]) == frames - 1  # the fewest samples
    connector = build_connector({"name": "ssr", "d_enc": encoder.hidden_size, "d_llm": 8, "d_model": 16,
                                 "n_heads": 2, "n_layers": 1, "mask": "causal"}).eval()
    torch.manual_seed(0)
    wave = 0.1 * torch.randn(16_000)
    n_full = int(encoder.frame_lengths(torch.tensor([wave.numel()]))[0])
    bnd = [0, 9, n_full - 1]  # a token ending in the first frame used to leave an empty cut
    cut = truncated_vectors(connector, encoder, wave, bnd)
    with torch.no_grad():
        enc = encoder([wave])
        full = connector(enc.features, enc.lengths, torch.tensor([bnd]), torch.ones(1, 3, dtype=torch.bool)).embeds[0]
    assert cut.shape == (3, 8) and torch.isfinite(cut).all()
    assert torch.allclose(cut[-1], full[-1], atol=1e-5)  # the last token's cut is the whole clip
