"""Parameter-efficient encoder adaptation (speechlm.models.encoder_adapt) on tiny random encoders: parameter counts,
identity at init, gradients, safetensors round trip, config refusals, and a stage-1 -> stage-2 run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_encoder import make_w2vbert, make_waveform_model, make_whisper
from training_helpers import ROOT, make_world, run_recipe, stage1_overrides

from speechlm.errors import ConfigError, ModelError
from speechlm.models.encoder import SpeechEncoder
from speechlm.models.encoder_adapt import (
    AdapterConfig,
    EncoderAdaptConfig,
    EncoderLoRAConfig,
    PromptTuningConfig,
    adapt_config_from_dict,
    expected_parameters,
)

SR = 16_000
METHOD_CFGS = {
    "adapter-seq": {"method": "adapter", "bottleneck": 8},
    "adapter-par-ffn": {"method": "adapter", "placement": "parallel", "where": "ffn", "bottleneck": 4},
    "lora": {"method": "lora", "r": 4, "projections": ["q", "k", "v", "o"]},
    "prompt": {"method": "prompt", "n_prompts": 3},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapt_encoders")
    return {"whisper": make_whisper(root / "whisper"), "wav2vec2": make_waveform_model("wav2vec2", root / "wav2vec2"),
            "hubert": make_waveform_model("hubert", root / "hubert"),
            "w2v-bert": make_w2vbert(root / "w2v-bert")}


def _waves(*seconds: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [0.1 * torch.randn(int(s * SR), generator=g) for s in seconds]


def _encoder(folders: dict[str, str], kind: str, cfg: dict | None = None) -> SpeechEncoder:
    enc = SpeechEncoder(folders[kind], layers=(0, 1, -1))
    if cfg is not None:
        enc.adapt(cfg)
    return enc


@pytest.mark.parametrize("kind", ["whisper", "wav2vec2"])
@pytest.mark.parametrize("name", list(METHOD_CFGS))
def test_each_method_adds_only_its_own_parameters(folders, kind, name):
    enc = _encoder(folders, kind)
    base = {n: p.detach().clone() for n, p in enc.model.named_parameters()}
    enc.adapt(METHOD_CFGS[name])
    cfg = adapt_config_from_dict(METHOD_CFGS[name])
    want = expected_parameters(cfg, enc.num_hidden_layers, enc.hidden_size)
    assert enc.num_trainable_parameters() == want > 0
    assert {id(p) for p in enc.trainable_parameters()}.isdisjoint({id(p) for p in enc.model.parameters()})
    assert not any(p.requires_grad for p in enc.model.parameters())
    # the base model's names and values are untouched (hooks, no wrapping): same fingerprint keys
    assert {n: p for n, p in enc.model.named_parameters()}.keys() == base.keys()
    assert not enc.model.training


def test_formula_by_hand():
    # whisper-base-like: 6 layers x 512; adapters on attn + ffn with bottleneck 64: 6 * 2 * (2*512*64 + 64 + 512)
    assert expected_parameters(AdapterConfig(), 6, 512) == 6 * 2 * (2 * 512 * 64 + 64 + 512)
    assert expected_parameters(EncoderLoRAConfig(r=8), 6, 512) == 6 * 2 * 8 * (512 + 512)
    assert expected_parameters(PromptTuningConfig(n_prompts=16), 6, 512) == 16 * 512
    assert expected_parameters(EncoderAdaptConfig(), 6, 512) == 0


@pytest.mark.parametrize("kind", ["whisper", "wav2vec2", "hubert", "w2v-bert"])
@pytest.mark.parametrize("name", ["adapter-seq", "adapter-par-ffn", "lora"])
def test_adapter_and_lora_start_as_the_identity(folders, kind, name):
    waves = _waves(1.0, 0.43)
    ref = _encoder(folders, kind)(waves)
    enc = _encoder(folders, kind, METHOD_CFGS[name])
    with torch.no_grad():
        out = enc(waves)
    assert out.lengths.tolist() == ref.lengths.tolist()
    assert torch.equal(out.features, ref.features)


@pytest.mark.parametrize("kind", ["whisper", "wav2vec2"])
def test_prompts_keep_frame_counts_but_change_frames(folders, kind):
    waves = _waves(1.0, 0.43)
    ref = _encoder(folders, kind)(waves)
    enc = _encoder(folders, kind, METHOD_CFGS["prompt"])
    with torch.no_grad():
        out = enc(waves)
    assert out.lengths.tolist() == ref.lengths.tolist() and out.features.shape == ref.features.shape
    assert torch.equal(out.features[:, 0], ref.features[:, 0])  # the layers' input: before any prompt
    assert not torch.allclose(out.features[:, -1], ref.features[:, -1])  # prompt tuning is not the identity
    # a batch still gives, per clip, what the clip gives alone (the prompts see no padding)
    alone = enc([waves[1]])
    n = int(out.lengths[1])
    assert torch.allclose(alone.features[0], out.features[1, :, :n], atol=1e-5)


def test_prompt_is_refused_for_w2v_bert(folders):
    with pytest.raises(ModelError, match="w2v-BERT"):
        _encoder(folders, "w2v-bert", METHOD_CFGS["prompt"])


@pytest.mark.parametrize("name", list(METHOD_CFGS))
def test_gradients_reach_only_the_adaptation_and_the_connector(folders, name):
    from speechlm.models.connectors.base import build_connector

    enc = _encoder(folders, "whisper", METHOD_CFGS[name])
    if name.startswith("adapter") or name == "lora":  # move off the zero init so every tensor gets a gradient
        with torch.no_grad():
            for p in enc.trainable_parameters():
                p.add_(0.01 * torch.randn_like(p))
    connector = build_connector({"name": "stack", "d_enc": enc.hidden_size, "n_enc_layers": 3, "d_llm": 16,
                                 "frame_rate_hz": enc.frame_rate_hz})
    out = enc(_waves(0.6, 0.4))
    assert out.features.requires_grad
    emb = connector(out.features, out.lengths)
    (emb.embeds.float() ** 2).mean().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in enc.trainable_parameters())
    assert all(p.grad is None for p in enc.model.parameters())
    assert any(p.grad is not None for p in connector.parameters())
    with torch.no_grad():  # validation: no graph
        assert not enc(_waves(0.3)).features.requires_grad


def test_frozen_encoder_runs_without_gradients_as_before(folders):
    enc = _encoder(folders, "whisper")
    assert not enc.adapted and enc.trainable_parameters() == []
    assert not enc(_waves(0.5)).features.requires_grad


@pytest.mark.parametrize("name", ["adapter-par-ffn", "lora", "prompt"])
def test_save_load_round_trip_is_exact(folders, tmp_path, name):
    enc = _encoder(folders, "whisper", METHOD_CFGS[name])
    with torch.no_grad():
        for p in enc.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = enc.save_adaptation(tmp_path / "encoder_adapt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["config"]["method"] == METHOD_CFGS[name]["method"]
    assert meta["trainable_parameters"] == enc.num_trainable_parameters()
    again = SpeechEncoder(folders["whisper"], layers=(0, 1, -1))
    again.adapt({"method": "none"}, folder=folder)
    waves = _waves(0.8, 0.5)
    with torch.no_grad():
        assert torch.equal(enc(waves).features, again(waves).features)
    frozen = SpeechEncoder(folders["whisper"], layers=(0, 1, -1))
    frozen.adapt({"train": False}, folder=folder)
    assert frozen.adapted and frozen.trainable_parameters() == []


def test_mismatching_folder_is_refused_naming_it(folders, tmp_path):
    enc = _encoder(folders, "whisper", METHOD_CFGS["adapter-seq"])
    folder = enc.save_adaptation(tmp_path / "whisper_adapt")
    other = SpeechEncoder(folders["wav2vec2"], layers=(0, 1, -1))
    with pytest.raises(ModelError, match=str(folder)):
        other.adapt({}, folder=folder)
    with pytest.raises(ModelError, match="differs from the configured"):
        SpeechEncoder(folders["whisper"]).adapt({"method": "lora"}, folder=folder)
    with pytest.raises(ModelError, match="not an encoder adaptation folder"):
        SpeechEncoder(folders["whisper"]).adapt({}, folder=tmp_path / "nothing")
    # same encoder type and size, other weights
    torch.manual_seed(1)
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    w = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(folders["whisper"]))
    w.save_pretrained(tmp_path / "whisper2")
    WhisperFeatureExtractor().save_pretrained(tmp_path / "whisper2")
    with pytest.raises(ModelError, match="weights differ"):
        SpeechEncoder(str(tmp_path / "whisper2"), layers=(0, 1, -1)).adapt({}, folder=folder)


def test_config_refusals(tmp_path):
    from speechlm.training import build
    from speechlm.training.configs import DataConfig, ModelConfig

    with pytest.raises(ConfigError, match="model.encoder_adapt.method"):
        adapt_config_from_dict({"method": "houlsby"}, "model.encoder_adapt")
    with pytest.raises(ConfigError, match="unknown key"):
        adapt_config_from_dict({"method": "lora", "rank": 4})
    with pytest.raises(ConfigError, match="projections"):
        adapt_config_from_dict({"method": "lora", "projections": ["x"]})
    assert build.encoder_adapt_config(ModelConfig(), DataConfig(feature_cache="cache")) is None  # default: off
    model = ModelConfig(encoder_adapt={"method": "adapter"})
    with pytest.raises(ConfigError, match=r"data\.feature_cache"):
        build.encoder_adapt_config(model, DataConfig(feature_cache=str(tmp_path / "cache")))
    with pytest.raises(ConfigError, match=r"data\.valid_feature_cache"):
        build.encoder_adapt_config(model, DataConfig(valid_feature_cache="v"))
    from speechlm.training.engine import EngineConfig

    with pytest.raises(ConfigError, match="ZeRO-3"):
        build.encoder_adapt_config(model, DataConfig(), EngineConfig(zero_stage=3))
    assert build.encoder_adapt_config(model, DataConfig()).method == "adapter"
    with pytest.raises(ModelError, match="not an encoder adaptation folder"):
        build.encoder_adapt_config(ModelConfig(init_encoder_adapt=str(tmp_path / "missing")))


def test_per_method_configs_and_folders_written_before_them(folders, tmp_path):
    # one dataclass per method: a key of another method is refused, naming it
    assert type(adapt_config_from_dict({"method": "adapter", "bottleneck": 8})) is AdapterConfig
    assert adapt_config_from_dict({"method": "lora", "projections": "q,k"}).projections == ["q", "k"]
    with pytest.raises(ConfigError, match=r"unknown key.*'bottleneck'.*method lora"):
        adapt_config_from_dict({"method": "lora", "bottleneck": 8}, "model.encoder_adapt")
    with pytest.raises(ConfigError, match="EncoderLoRAConfig"):
        EncoderAdaptConfig(method="lora")
    # a folder whose config.json holds every method's fields (as written before the per-method configs) loads
    enc = _encoder(folders, "whisper", {"method": "lora", "r": 2})
    folder = enc.save_adaptation(tmp_path / "adapt")
    meta = json.loads((folder / "config.json").read_text())
    assert set(meta["config"]) == {"method", "train", "r", "alpha", "dropout", "projections"}
    meta["config"].update(placement="sequential", where="both", bottleneck=64, n_prompts=16)
    (folder / "config.json").write_text(json.dumps(meta))
    fresh = SpeechEncoder(folders["whisper"], layers=(0, 1, -1))
    assert fresh.adapt({"train": False}, folder=folder).cfg == EncoderLoRAConfig(r=2, train=False)


def test_typo_under_model_config_is_refused_before_any_model_loads(monkeypatch):
    """A wrong key or type under model.connector / model.encoder_adapt fails in load_config, naming the key path,
    before the LLM or the encoder is read (their loaders fail the test if called)."""
    from speechlm.config import load_config
    from speechlm.models import encoder as encoder_module
    from speechlm.training import build
    from speechlm.training.configs import Stage1Config, Stage2Config

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    for name in ("load_llm", "load_encoder", "load_llm_embeddings"):
        if hasattr(build, name):
            monkeypatch.setattr(build, name, must_not_load)
    monkeypatch.setattr(encoder_module.SpeechEncoder, "__init__", must_not_load)
    yaml = ROOT / "recipes/configs/stage1_tiny.yaml"
    cases = {
        "model.connector.d_modle": ["model.connector.d_modle=64"],
        "model.connector.hidden": ["model.connector.hidden=64"],  # a stack/conv key, the YAML's connector is ssr
        "model.connector.n_layers": ["model.connector.n_layers=two"],
        "model.connector.name": ["model.connector.name=mlp"],
        "model.encoder_adapt.bottelneck": ["model.encoder_adapt.method=adapter", "model.encoder_adapt.bottelneck=8"],
        "model.encoder_adapt.r": ["model.encoder_adapt.method=adapter", "model.encoder_adapt.r=8"],
        "model.encoder_adapt.n_prompts": ["model.encoder_adapt.method=prompt", "model.encoder_adapt.n_prompts=0"],
        "model.encoder_adapt.method": ["model.encoder_adapt.method=houlsby"],
    }
    for key, overrides in cases.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(Stage1Config, yaml, overrides)
    with pytest.raises(ConfigError, match=r"model\.connector\.slot_redout"):
        load_config(Stage2Config, ROOT / "recipes/configs/stage2_tiny.yaml", ["model.connector.slot_redout=true"])
    # the same syntax still sets valid keys, and another connector name starts from that connector's defaults
    cfg = load_config(Stage1Config, None, ["model.connector.name=stack", "model.connector.stack=4",
                                           "model.encoder_adapt.method=lora", "model.encoder_adapt.projections=q,k"])
    assert type(cfg.model.connector).__name__ == "StackConfig" and cfg.model.connector.stack == 4
    assert cfg.model.encoder_adapt == EncoderLoRAConfig(projections=["q", "k"])


def test_stage1_module_encodes_inside_with_adapted_encoder(folders):
    """The stage-1 module runs an adapted encoder itself: the loss reaches the adaptation."""
    from speechlm.data.batching import Batch
    from speechlm.models.connectors.base import build_connector
    from speechlm.training.stages import Stage1Distill, TokenEmbedding

    enc = _encoder(folders, "whisper", METHOD_CFGS["prompt"])
    connector = build_connector({"name": "ssr", "d_enc": enc.hidden_size, "n_enc_layers": 3, "d_llm": 16,
                                 "frame_rate_hz": enc.frame_rate_hz, "d_model": 16, "n_layers": 1, "n_heads": 2})
    model = Stage1Distill(connector, TokenEmbedding(torch.randn(30, 16)), encoder=enc).train()
    ids = torch.tensor([[3, 4, 5], [6, 7, 0]])
    batch = Batch(["a", "b"], ids, ids > 0, torch.tensor([[5, 10, 20], [5, 10, 0]]), None, None,
                  waves=_waves(0.5, 0.4))
    loss, metrics = model(batch)
    loss.backward()
    assert enc.adaptation.prompts.grad is not None and metrics["tokens"] == 5
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
        enc.num_trainable_parameters() + sum(p.numel() for p in connector.parameters()))


# ------------------------------------------------------------------------------------------------ benchmark
def _bench():
    from speechlm.perf.benchmarks import encoder_adapt as bench_encoder_adapt

    return bench_encoder_adapt


def test_bench_methods_table_and_refusal():
    bench = _bench()
    assert list(bench.METHODS) == ["frozen", "adapter-seq", "adapter-par", "lora", "prompt"]
    assert bench.method_overrides("frozen") == []
    assert "model.encoder_adapt.placement=parallel" in bench.method_overrides("adapter-par")
    rows = [{"method": "frozen", "encoder_params": 0, "step_time_s_median": 1.5, "peak_rss_mb": 900.0,
             "cosine": 0.41, "token_acc": 0.12},
            {"method": "lora", "encoder_params": 73728, "step_time_s_median": 2.25, "peak_rss_mb": 950.5,
             "cosine": None, "token_acc": None}]
    text = bench.table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| method |") and len(lines) == 4
    assert "| 0.410 | 0.120 |" in lines[2] and "73,728" in lines[3] and "| - | - |" in lines[3]
    script = [sys.executable, str(ROOT / "tools" / "benchmarks" / "bench_encoder_adapt.py")]
    for argv, message in ((["--methods", "frozen,houlsby"], "bench_encoder_adapt --methods: unknown choice(s)"),
                          (["--steps", "0"], "bench_encoder_adapt: --steps must be >= 1")):
        proc = subprocess.run([*script, *argv], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode != 0 and f"{ConfigError.__name__}: {message}" in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ recipes
@pytest.mark.slow
def test_stage1_adapter_exports_and_stage2_loads_it(tmp_path):
    world = make_world(tmp_path / "world", n_train=8, n_valid=3, cache=False)
    s1 = tmp_path / "s1"
    over = stage1_overrides(world, s1, cache=False, **{"loop.max_steps": 2, "loop.eval_every": 0,
                                                       "loop.save_every": 2, "model.encoder_adapt.method": "adapter",
                                                       "model.encoder_adapt.bottleneck": 4, "engine.zero_stage": 0})
    proc = run_recipe("stage1_distill.py", "stage1_tiny.yaml", over)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = s1 / "encoder_adapt"
    meta = json.loads((folder / "config.json").read_text())
    assert meta["config"]["method"] == "adapter" and (folder / "model.safetensors").is_file()
    assert json.loads((s1 / "metrics.json").read_text())["frozen_unchanged"] is True
    # the checkpoint holds the adaptation with the connector (exact resume), and the run identity names it
    ckpt = json.loads((s1 / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert any(k.startswith("encoder.adaptation.adapters.") for k in ckpt["trainable"])
    assert not any(k.startswith("encoder.model.") for k in ckpt["trainable"])
    assert ckpt["identity"]["encoder_adapt"]["bottleneck"] == 4
    # stage 1 trained the adapters: the exported up projections left zero
    from safetensors.torch import load_file

    ups = [v for k, v in load_file(str(folder / "model.safetensors")).items() if ".up.weight" in k]
    assert ups and any(bool(v.abs().sum() > 0) for v in ups)

    s2 = tmp_path / "s2"
    over2 = [f"out_dir={s2}", f"model.llm={world['llm']}", f"model.encoder={world['enc']}",
             f"model.init_connector={s1 / 'connector'}", f"model.init_encoder_adapt={folder}",
             f"data.train_manifest={world['manifest']}", "data.max_frames=400", "data.max_tokens=40",
             "engine.threads=1", "engine.zero_stage=0", "loop.max_steps=1", "loop.eval_every=0", "loop.save_every=1",
             "loop.progress=false", "leakage_utts=1"]
    proc = run_recipe("stage2_finetune.py", "stage2_tiny.yaml", over2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((s2 / "encoder_adapt" / "config.json").read_text())["config"]["bottleneck"] == 4
    # a feature cache with the adaptation on is refused, naming the key
    proc = run_recipe("stage1_distill.py", "stage1_tiny.yaml",
                      stage1_overrides(world, tmp_path / "s3", cache=False,
                                       **{"data.feature_cache": str(tmp_path / "x"),
                                          "model.encoder_adapt.method": "lora"}))
    assert proc.returncode != 0 and "data.feature_cache" in proc.stderr


@pytest.mark.slow
def test_stage1_with_lora_resumes_exactly_after_a_stop(tmp_path, monkeypatch):
    """SIGTERM in step 2 of an adapted stage 1 (LoRA with dropout, the encoder on the fly): the checkpoint holds the
    adaptation, and the rerun ends with the uninterrupted run's losses, connector and adaptation, bit for bit."""
    from safetensors.torch import load_file

    from speechlm.errors import EXIT_PREEMPTED
    from speechlm.training.loop import FAULT_ENV

    world = make_world(tmp_path / "world", n_train=8, n_valid=3, cache=False)
    extra = {"loop.max_steps": 4, "loop.eval_every": 0, "loop.save_every": 1, "loop.log_every": 1,
             "model.encoder_adapt.method": "lora", "model.encoder_adapt.r": 2, "model.encoder_adapt.dropout": 0.2,
             "engine.zero_stage": 0}

    def run(out: Path, faults: str = ""):
        monkeypatch.setenv(FAULT_ENV, faults)
        return run_recipe("stage1_distill.py", "stage1_tiny.yaml", stage1_overrides(world, out, cache=False, **extra))

    base, chain = tmp_path / "base", tmp_path / "chain"
    proc = run(base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(chain, "sigterm_at_step:2")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert (chain / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    proc = run(chain)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m, ref = (json.loads((d / "metrics.json").read_text()) for d in (chain, base))
    assert len(ref["train_losses"]) == 4 and m["train_losses"] == ref["train_losses"]
    for name in ("encoder_adapt", "connector"):
        w, w_ref = (load_file(str(d / name / "model.safetensors")) for d in (chain, base))
        assert w.keys() == w_ref.keys() and all(torch.equal(w[k], w_ref[k]) for k in w), name
    lora_b = [v for k, v in load_file(str(base / "encoder_adapt" / "model.safetensors")).items() if "B.weight" in k]
    assert lora_b and any(bool(v.abs().sum() > 0) for v in lora_b)         # it did train


def test_identity_is_empty_when_off():
    from speechlm.training import build
    from speechlm.training.configs import ModelConfig

    assert build.adapt_identity(ModelConfig(), None) == {}
    assert Path(ROOT / "speechlm" / "models" / "encoder_adapt.py").is_file()


def test_aligner_trains_and_exports_the_adaptation(tmp_path):
    from test_alignment_tools import _corpus

    from alignment.training import load_train_config, train
    from speechlm.models.encoder_adapt import load_state

    encoder = make_whisper(tmp_path / "whisper")
    train_m, _valid = _corpus(tmp_path)
    out = tmp_path / "aligner"
    args = [f"train_manifest={train_m}", f"valid_manifest={train_m}", f"encoder={encoder}", "steps=3", "valid_every=3",
            "batch_size=2", "model.d_model=32", "model.layers=1", "model.heads=2", "threads=1", "lr=1e-2",
            "encoder_adapt.method=lora", "encoder_adapt.r=2"]
    aligner_yaml = ROOT / "recipes/configs/aligner_tiny.yaml"
    assert train(load_train_config(aligner_yaml, [*args, f"out_dir={out}"]))["steps"] == 3
    folder = out / "encoder_adapt"
    assert json.loads((folder / "config.json").read_text())["config"]["r"] == 2
    assert (out / "model.safetensors").is_file()  # the aligner itself, beside its adaptation (also after calibration)
    enc = SpeechEncoder(encoder)
    enc.adapt({}, folder=folder)
    assert any(bool(p.abs().sum() > 0) for n, p in enc.adaptation.named_parameters() if n.endswith("B.weight"))
    load_state(folder, enc.adaptation)
    # feature caches with the adaptation on: refused, naming the key (when the config loads, before any model)
    with pytest.raises(ConfigError, match="feature_cache_train"):
        load_train_config(aligner_yaml, [*args, f"out_dir={tmp_path / 'x'}", f"feature_cache_train={tmp_path}"])

    # Using it: the aligner brings its adaptation, and the tools give it the adapted encoder's frames.
    from alignment_helpers import byte_level_bpe

    from alignment.aligner import Aligner
    from alignment.annotate import align_manifest
    from alignment.features import open_frame_source
    from speechlm.data.audio import load_audio
    from speechlm.data.manifest import read_manifest

    tok_dir = tmp_path / "tok"
    byte_level_bpe().save_pretrained(tok_dir)
    aligner = Aligner.from_pretrained(out, byte_level_bpe(), decoder="forced_align")
    assert aligner.encoder_adapt == folder
    adapted = aligner.load_encoder()
    assert adapted.adapted and adapted.num_trainable_parameters() == 0      # frozen: it only reads
    rows = read_manifest(train_m)
    waves = [load_audio(r.audio_path) for r in rows]
    with torch.no_grad():
        a, f = adapted(waves[:1]).features, SpeechEncoder(encoder)(waves[:1]).features
    assert a.shape == f.shape and not torch.allclose(a, f)                  # the adaptation changes the frames
    with pytest.raises(ModelError, match="adapted encoder"):
        open_frame_source(aligner, cache_dir=str(tmp_path / "cache"))      # frozen-encoder frames: refused
    with pytest.raises(ModelError, match="adapted encoder"):
        aligner.align_waves(SpeechEncoder(encoder), waves[:1], [rows[0].text])
    aligned = tmp_path / "train.aligned.jsonl"
    align_manifest(str(train_m), str(out), str(tok_dir), str(aligned), decoder="forced_align")
    direct = aligner.align_waves(adapted, waves, [r.text for r in rows])
    assert [r.token_boundaries for r in read_manifest(aligned)] == [d.token_boundaries for d in direct]
    with pytest.raises(ModelError, match="adapted encoder"):
        align_manifest(str(train_m), str(out), str(tok_dir), str(tmp_path / "no.jsonl"),
                       feature_cache=str(tmp_path / "cache"))
