"""Engine pieces that need no process group, the stage modules in-process, the leakage check, configs."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import ROOT, make_llm, make_tokenizer, make_whisper
from transformers import AutoModelForCausalLM

from speechlm.config import load_config
from speechlm.data.batching import Batch
from speechlm.errors import CheckpointError, ConfigError
from speechlm.models.connectors.base import build_connector
from speechlm.models.encoder import SpeechEncoder
from speechlm.models.speechlm import SpeechLM
from speechlm.training.checkpoint import latest_checkpoint
from speechlm.training.configs import Stage1Config, Stage2Config
from speechlm.training.deepspeed_engine import EngineConfig, ds_config, param_groups
from speechlm.training.distributed import rng_state, set_rng_state
from speechlm.training.safe_load import safe_torch_load
from speechlm.training.stages import (
    Stage1Distill,
    Stage2Finetune,
    TokenEmbedding,
    leakage_losses,
    truncated_vectors,
)


def test_rng_state_round_trip(tmp_path):
    torch.save(rng_state(), tmp_path / "rng.pt")
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # plain types: a safe load reads it
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


class _RunsCode:
    """Unpickling this (unsafely) touches a file: the attack a weights-only load prevents."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_safe_torch_load_refuses_code_and_allows_deepspeed_state(tmp_path):
    import pickle

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "evil": _RunsCode(marker)}, tmp_path / "evil.pt")
    original = torch.load
    with safe_torch_load(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pt", weights_only=False)     # as DeepSpeed asks: overridden
    assert not marker.exists() and torch.load is original
    torch.save({"stage": ZeroStageEnum.gradients, "scaler": DynamicLossScaler(8.0, 1000, 1, 2, False),
                "w": torch.ones(2)}, tmp_path / "ds.pt")
    with safe_torch_load():
        state = torch.load(tmp_path / "ds.pt", weights_only=False)
    assert state["stage"] is ZeroStageEnum.gradients and state["scaler"].cur_scale == 8.0


def test_ds_config_fills_auto_and_keeps_fp32_on_cpu():
    for stage in (0, 2, 3):
        conf = ds_config(EngineConfig(zero_stage=stage, grad_accum=3, grad_clip=0.5))
        assert conf["zero_optimization"]["stage"] == stage
        assert conf["gradient_accumulation_steps"] == 3 and conf["gradient_clipping"] == 0.5
        assert conf["train_micro_batch_size_per_gpu"] == 1
        assert conf["bf16"]["enabled"] is False  # the CPU accelerator has no bf16 training here
    with pytest.raises(ConfigError, match="bf16"):
        ds_config(EngineConfig(precision="bf16"))
    with pytest.raises(ConfigError, match="zero_stage=1"):
        ds_config(EngineConfig(zero_stage=1))


def test_param_groups_exclude_frozen_and_skip_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 1]
    assert groups[0]["params"][0] is model[1].weight and groups[1]["weight_decay"] == 0.0
    with pytest.raises(ConfigError):
        param_groups(model.requires_grad_(False), 0.1)


def test_latest_checkpoint_pointer(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text("step-00000005\n")
    (tmp_path / "step-00000005").mkdir()  # torn: no meta.json
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_recipe_configs_load_with_overrides():
    c1 = load_config(Stage1Config, ROOT / "recipes/configs/stage1_tiny.yaml", ["engine.zero_stage=3", "loop.max_steps=7"])
    assert c1.engine.zero_stage == 3 and c1.loop.max_steps == 7 and c1.model.connector.name == "ssr"
    assert c1.cosine_weight == 5.0 and c1.engine.betas == [0.9, 0.95]
    c2 = load_config(Stage2Config, ROOT / "recipes/configs/stage2_tiny.yaml", ["variant=multitask"])
    assert c2.variant == "multitask" and c2.distill_weight > 0
    with pytest.raises(ConfigError, match="nope"):
        load_config(Stage1Config, ROOT / "recipes/configs/stage1_tiny.yaml", ["engine.nope=1"])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    tok = make_tokenizer(root / "llm")
    make_llm(root / "llm", vocab=len(tok))
    make_whisper(root / "enc")
    return {"llm": root / "llm", "enc": root / "enc", "vocab": len(tok)}


def _batch(vocab: int, d_enc: int, with_text: bool = False) -> Batch:
    torch.manual_seed(3)
    ids = torch.randint(4, vocab, (2, 5))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    bnd = torch.tensor([[3, 7, 12, 20, 29], [4, 9, 14, 14, 14]])
    features = torch.randn(2, 1, 30, d_enc)
    text = torch.randint(4, vocab, (3, 6)) if with_text else None
    return Batch(["a", "b"], ids, mask, bnd, features, torch.tensor([30, 15]),
                 text_ids=text, text_mask=torch.ones(3, 6, dtype=torch.bool) if with_text else None)


def _connector(llm, d_enc: int, **kw):
    return build_connector({"name": "ssr", "d_enc": d_enc, "d_llm": llm.config.hidden_size, "d_model": 16,
                            "n_heads": 2, "n_layers": 1, "mask": "causal", **kw})


def test_stage1_module_targets_are_raw_embedding_rows(models):
    llm = AutoModelForCausalLM.from_pretrained(models["llm"])
    table = llm.get_input_embeddings().weight
    module = Stage1Distill(_connector(llm, 16), TokenEmbedding(table))
    batch = _batch(models["vocab"], 16)
    _, m = module(batch)
    out = module.connector(batch.features, batch.frame_lengths, batch.boundaries, batch.token_mask)
    target = table[batch.token_ids]
    cos = torch.nn.functional.cosine_similarity(out.embeds, target, dim=-1)[batch.token_mask].mean()
    assert m["cosine"] == pytest.approx(cos.item(), rel=1e-5) and m["tokens"] == 8
    module.eval()
    _, m = module(batch)
    assert m["acc_total"] == 8 and 0 <= m["acc_correct"] <= 8
    assert not module.embedding.weight.requires_grad


def test_stage2_multitask_trains_connector_and_lora_only(models):
    llm = AutoModelForCausalLM.from_pretrained(models["llm"])
    slm = SpeechLM(_connector(llm, 16), llm)
    slm.apply_lora(r=2, alpha=4)
    module = Stage2Finetune(slm, bos_id=1, distill_weight=0.5, text_weight=1.0).train()
    plain = _batch(models["vocab"], 16)
    loss_plain, _ = module(plain)
    loss, m = module(_batch(models["vocab"], 16, with_text=True))
    assert "loss_text_lm" in m and "distill" in m
    assert loss.item() == pytest.approx(loss_plain.item() + m["loss_text_lm"], rel=1e-5)
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert any("lora_" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any(n.startswith("speechlm.connector") and g is not None for n, g in grads.items())
    assert all(p.grad is None for p in module.parameters() if not p.requires_grad)
    module.eval()
    with torch.no_grad():
        _, m = module(plain)
    assert m["loss_text"] > 0 and m["targets"] == 4 + 2


@pytest.mark.parametrize("name", ["stack", "conv", "qformer"])
def test_stage2_trains_a_baseline_connector_with_speech_as_prefix(models, name):
    llm = AutoModelForCausalLM.from_pretrained(models["llm"])
    size = {"hidden": 32} if name in ("stack", "conv") else {"d_model": 16, "n_heads": 2, "n_layers": 1}
    conn = build_connector({"name": name, "d_enc": 16, "d_llm": llm.config.hidden_size, **size})
    with pytest.raises(ConfigError, match="distill_weight"):
        Stage2Finetune(SpeechLM(conn, llm), bos_id=1, distill_weight=0.5)
    module = Stage2Finetune(SpeechLM(conn, llm), bos_id=1).train()
    batch = _batch(models["vocab"], 16)
    batch = replace(batch, boundaries=None)  # baselines are read without boundaries
    loss, m = module(batch)
    assert m["loss_prefix"] == pytest.approx(loss.item()) and m["targets"] == 4 + 2
    loss.backward()
    grads = [p.grad for p in module.speechlm.connector.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in llm.parameters())
    module.eval()
    with torch.no_grad():
        _, m = module(batch)
    assert 0 < m["loss_speech"] and m["loss_text"] > 0


def test_leakage_cut_vectors(models):
    encoder = SpeechEncoder(str(models["enc"]))
    llm = AutoModelForCausalLM.from_pretrained(models["llm"])
    connector = _connector(llm, encoder.hidden_size, frame_rate_hz=encoder.frame_rate_hz).eval()
    torch.manual_seed(0)
    wave = 0.1 * torch.randn(16_000)  # 1 s = 50 frames
    bnd = [9, 19, 29, 49]
    with torch.no_grad():
        enc = encoder([wave])
        full = connector(enc.features, enc.lengths, torch.tensor([bnd]), torch.ones(1, 4, dtype=torch.bool)).embeds[0]
    cut = truncated_vectors(connector, encoder, wave, bnd)
    assert cut.shape == full.shape
    assert torch.allclose(cut[-1], full[-1], atol=1e-5)  # the last token's cut is the whole clip
    assert not torch.allclose(cut[0], full[0], atol=1e-3)  # the bidirectional encoder heard the future
    module = Stage2Finetune(SpeechLM(connector, llm), bos_id=1).eval()
    r = leakage_losses(module, encoder, wave, [5, 6, 7, 8], bnd)
    assert r["targets"] == 3 and np.isfinite(r["plain"]) and np.isfinite(r["cut"]) and r["plain"] != r["cut"]


def test_frozen_fingerprint_sees_one_bit_and_ignores_trainable():
    from speechlm.training.deepspeed_engine import frozen_fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    a = frozen_fingerprint(model)
    with torch.no_grad():
        model[1].weight.add_(1.0)  # trainable: not part of the fingerprint
    assert frozen_fingerprint(model) == a
    with torch.no_grad():
        w = model[0].weight.view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(1e9))
    assert frozen_fingerprint(model) != a


def test_data_fingerprint_follows_the_training_rows(tmp_path):
    """A checkpoint records which training data it saw: re-aligned rows or another split change the
    fingerprint (so a resume on them is refused), rewriting the same bytes does not."""
    from speechlm.training import build
    from speechlm.training.configs import DataConfig

    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"id": "a", "token_boundaries": [3, 7]}\n')
    data = DataConfig(train_manifest=str(manifest))
    first = build.data_fingerprint(data)
    manifest.write_text('{"id": "a", "token_boundaries": [3, 7]}\n')
    assert build.data_fingerprint(data) == first
    manifest.write_text('{"id": "a", "token_boundaries": [3, 8]}\n')
    assert build.data_fingerprint(data) != first
    assert build.data_fingerprint(DataConfig(train_manifest=str(manifest), train_split="valid")) \
        != build.data_fingerprint(data)
    shard = tmp_path / "shard-0.jsonl"
    shard.write_text("x\n")
    sharded = build.data_fingerprint(DataConfig(train_shards=str(tmp_path / "shard-*.jsonl")))
    shard.write_text("xy\n")
    assert build.data_fingerprint(DataConfig(train_shards=str(tmp_path / "shard-*.jsonl"))) != sharded


def test_checkpoint_identity_from_before_a_new_connector_option_still_matches():
    """A checkpoint written before a connector config field existed resumes when the field is at its default."""
    import dataclasses

    from speechlm.training.checkpoint import _with_new_defaults

    cfg = build_connector({"name": "ssr", "d_enc": 16, "d_llm": 8, "d_model": 8, "n_heads": 2, "n_layers": 1}).cfg
    now = {"stage": "stage1", "connector": dataclasses.asdict(cfg)}
    old = {"stage": "stage1", "connector": {k: v for k, v in now["connector"].items() if k != "slot_readout"}}
    assert _with_new_defaults(old) == now
    changed = {**old, "connector": {**old["connector"], "d_model": 16}}
    assert _with_new_defaults(changed) != now  # a real difference still shows
    future = {**now, "connector": {**now["connector"], "an_option_from_the_future": 1}}
    assert _with_new_defaults(future) == future  # unknown field: left as saved, reported as a mismatch



def test_checkpoint_identity_from_before_per_method_adaptation_configs_still_matches():
    """An adapted run checkpointed when the adaptation config held every method's fields resumes now that each
    method has its own config; a real difference (another rank) still shows."""
    import dataclasses

    from speechlm.models.encoder_adapt_config import adapt_config_from_dict
    from speechlm.training.checkpoint import _with_new_defaults

    now = {"stage": "stage1", "encoder_adapt": dataclasses.asdict(adapt_config_from_dict({"method": "lora", "r": 4}))}
    flat = {"method": "lora", "placement": "sequential", "where": "both", "bottleneck": 64, "scale": 1.0,
            "activation": "gelu", "r": 4, "alpha": 16.0, "dropout": 0.0, "projections": ["q", "v"],
            "n_prompts": 16, "prompt_init_std": 0.02, "train": True}
    old = {"stage": "stage1", "encoder_adapt": flat}
    assert old != now and _with_new_defaults(old) == now
    assert _with_new_defaults({**old, "encoder_adapt": {**flat, "r": 8}}) != now

def test_leakage_check_names_or_skips_an_unreadable_row(models, tmp_path):
    """A validation row whose audio is gone: an AudioError naming it, or (skip_bad) left out of the losses,
    counted, with the same numbers as the readable rows alone."""
    from types import SimpleNamespace

    import soundfile as sf

    from speechlm.data.manifest import Utterance
    from speechlm.errors import AudioError
    from speechlm.training.build import leakage_check
    from speechlm.training.distributed import DistInfo

    encoder = SpeechEncoder(str(models["enc"]))
    llm = AutoModelForCausalLM.from_pretrained(models["llm"])
    connector = _connector(llm, encoder.hidden_size, frame_rate_hz=encoder.frame_rate_hz).eval()
    module = Stage2Finetune(SpeechLM(connector, llm), bos_id=1).eval()
    torch.manual_seed(0)
    sf.write(tmp_path / "good.wav", (0.1 * torch.randn(16_000)).numpy(), 16_000)
    row = {"sample_rate": 16_000, "duration_s": 1.0, "text": "a b c d", "split": "valid",
           "token_boundaries": [9, 19, 29, 49], "boundary_frame_rate_hz": encoder.frame_rate_hz}
    good = Utterance(id="good", audio=str(tmp_path / "good.wav"), **row)
    gone = Utterance(id="gone", audio=str(tmp_path / "gone.wav"), **row)
    engine = SimpleNamespace(info=DistInfo(0, 1, 0, 1), ds=module)

    def reader(skip_bad: bool):
        return SimpleNamespace(tokens=lambda utt: [5, 6, 7, 8], frame_rate_hz=encoder.frame_rate_hz, skip_bad=skip_bad)

    with pytest.raises(AudioError, match=r"row 'gone'.*gone\.wav.*data\.skip_bad"):
        leakage_check(engine, module, encoder, [good, gone], reader(False))
    both = leakage_check(engine, module, encoder, [gone, good], reader(True))
    alone = leakage_check(engine, module, encoder, [good], reader(False))
    assert both["leakage_rows_skipped"] == 1 and alone["leakage_rows_skipped"] == 0
    for k in ("loss_speech_onfly", "loss_speech_cut", "leakage_gap", "leakage_targets"):
        assert both[k] == pytest.approx(alone[k], rel=1e-6)
    assert alone["leakage_targets"] == 3


def test_engine_module_still_exports_what_recipes_import():
    """speechlm.training.engine is the one import for a recipe: every name it lists resolves to the module the
    part lives in, so callers from before the split keep working."""
    from speechlm.training import checkpoint, deepspeed_engine, distributed, engine, export, safe_load

    homes = (checkpoint, deepspeed_engine, distributed, export, safe_load)
    for name in engine.__all__:
        assert any(getattr(m, name, None) is getattr(engine, name) for m in homes), name
    assert engine.load_checkpoint is checkpoint.load_checkpoint and engine.export_lora is export.export_lora
    assert engine.init_distributed is distributed.init_distributed and engine.Engine is deepspeed_engine.Engine


def test_unsafe_checkpoint_error_names_where_the_allow_list_lives(tmp_path):
    import pickle

    from speechlm.training.safe_load import unsafe_object_error

    err = unsafe_object_error(tmp_path / "x.pt", pickle.UnpicklingError(
        "Weights only load failed.\nUnsupported global: GLOBAL os.system. Please use something"))
    assert isinstance(err, CheckpointError) and "Unsupported global: GLOBAL os.system" in str(err)
    assert "SAFE_CHECKPOINT_GLOBALS in speechlm/training/safe_load.py" in str(err)


@pytest.mark.parametrize("distributed", [True, False])
def test_run_main_flushes_and_skips_the_teardown_after_a_distributed_run(distributed, tmp_path):
    """A finished distributed recipe leaves through os._exit after the orderly shutdown (a rank could abort in the
    interpreter's teardown); its printed output and logs still arrive. Without a process group: a normal exit."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import atexit, logging, os, sys
        import torch.distributed as dist
        from speechlm.training.distributed import run_main
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        atexit.register(lambda: print("interpreter teardown", flush=True))
        def main():
            if {distributed}:
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
                dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
            print("result line")  # block-buffered (stdout is a pipe): only a flush brings it out
            logging.getLogger("speechlm").info("log line")
        run_main(main)
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "result line" in proc.stdout and "log line" in proc.stderr
    assert ("interpreter teardown" in proc.stdout) is (not distributed)
