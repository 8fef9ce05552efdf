"""The recipes under DeepSpeed: ZeRO-2/3 with 2 CPU ranks against plain PyTorch, crash + exact resume,
frozen weights bit-identical, clear errors for corrupt or mismatched checkpoints. The ZeRO-3 runs have stage 1's
sampled-softmax term on (it reads the embedding table, which ZeRO-3 partitions across the ranks).

Slow: each launcher run starts two Python processes (the first run on a machine also JIT-builds
DeepSpeed's shared-memory comm op, ~90 s). Three launcher runs and three plain ones in all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from training_helpers import leaked_shm_buffers, make_world, run_recipe, stage1_overrides

from speechlm.config import load_config
from speechlm.training import build
from speechlm.training.configs import Stage1Config
from speechlm.training.deepspeed_engine import frozen_fingerprint, param_groups
from speechlm.training.distributed import DistInfo, seed_everything
from speechlm.training.factory import stage1_module
from speechlm.training.schedule import warmup_cosine
from speechlm.training.stages import TokenEmbedding

pytestmark = pytest.mark.slow
STEPS = 6
# The sampled-softmax term with more random rows than the tiny vocabulary has: the candidates are then the whole
# table whatever the draws, so the loss does not depend on the RNG and the ranks can be compared with one process.
CONTRASTIVE = {"contrastive.weight": 1.0, "contrastive.negatives": 4096}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return make_world(tmp_path_factory.mktemp("dsworld"))


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _metrics(out_dir: Path) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def plain_pytorch_losses(overrides: list[str], world_size: int) -> list[float]:
    """The same training in one process without DeepSpeed: each step averages the ranks' losses (and
    hence gradients), clips, AdamW, schedule: what data parallelism should compute."""
    cfg = load_config(Stage1Config, "recipes/configs/stage1_tiny.yaml", overrides)
    seed_everything(cfg.seed, 0)  # the recipe's initialisation, call for call
    llm, tok = build.load_llm(cfg.model.llm)
    enc = build.encoder_facts(cfg.model, cfg.data)
    model = stage1_module(cfg, build.make_connector(cfg.model, enc, llm), llm.get_input_embeddings().weight)
    assert model.contrastive_negatives > 20 * llm.get_input_embeddings().weight.shape[0] or not cfg.contrastive.weight
    e = cfg.engine
    opt = torch.optim.AdamW(param_groups(model, e.weight_decay), lr=e.lr, betas=tuple(e.betas),
                            weight_decay=e.weight_decay)
    sched = warmup_cosine(opt, e.warmup_steps, cfg.loop.max_steps, e.lr_floor)
    iters = [build.train_batches(cfg.data, build.make_reader(cfg.data, enc, tok), DistInfo(r, world_size, r, world_size),
                                 cfg.seed) for r in range(world_size)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for _ in range(cfg.loop.max_steps):
        opt.zero_grad()
        step_losses = []
        for it in iters:
            loss, m = model(next(it))
            (loss / world_size).backward()
            step_losses.append(m["loss"])
        torch.nn.utils.clip_grad_norm_(trainable, e.grad_clip)
        opt.step()
        sched.step()
        losses.append(sum(step_losses) / world_size)
    return losses


def _overrides(world, out_dir, **extra):
    return stage1_overrides(world, out_dir, **{"loop.max_steps": STEPS, "loop.save_every": 3,
                                               "loop.eval_every": 3, **extra})


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> list[float]:
    torch.set_num_threads(1)
    return plain_pytorch_losses(_overrides(world, tmp_path_factory.mktemp("ref")), world_size=2)


@pytest.fixture(scope="module")
def reference_contrastive(world, tmp_path_factory) -> list[float]:
    torch.set_num_threads(1)
    return plain_pytorch_losses(_overrides(world, tmp_path_factory.mktemp("refc"), **CONTRASTIVE), world_size=2)


def _embedding_fingerprint(world) -> str:
    llm, _ = build.load_llm(world["llm"])
    return frozen_fingerprint(TokenEmbedding(llm.get_input_embeddings().weight))


def test_zero2_two_ranks_matches_plain_pytorch(world, reference, tmp_path):
    out = tmp_path / "z2"
    proc = run_recipe("stage1_distill.py", "stage1_tiny.yaml", _overrides(world, out, **{"engine.zero_stage": 2}),
                      ranks=2)
    _ok(proc)
    assert not leaked_shm_buffers(proc.master_port)  # DeepSpeed's CPU all-reduce buffers are released
    m = _metrics(out)
    assert m["world_size"] == 2 and m["steps"] == STEPS
    assert m["train_losses"] == pytest.approx(reference, rel=1e-6)
    assert reference[-1] < reference[0]  # it learns
    assert m["frozen_unchanged"] and m["frozen_sha256_start"] == _embedding_fingerprint(world)
    assert {"cosine", "mse", "token_acc", "loss"} <= set(m["final_valid"])
    assert (out / "connector" / "model.safetensors").is_file() and (out / "curves.png").is_file()
    assert list((out / "tensorboard").glob("events.*"))


@pytest.fixture(scope="module")
def zero3_crashed(world, tmp_path_factory) -> Path:
    """A ZeRO-3 2-rank run that dies right after step 4 (last complete checkpoint: step 3)."""
    out = tmp_path_factory.mktemp("z3") / "run"
    proc = run_recipe("stage1_distill.py", "stage1_tiny.yaml",
                      _overrides(world, out, **{"engine.zero_stage": 3, "loop.crash_after": 4, **CONTRASTIVE}),
                      ranks=2)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert not leaked_shm_buffers(proc.master_port)  # not even by a rank that died without cleaning up
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert not (out / "metrics.json").exists()
    return out


def test_zero3_killed_and_resumed_equals_uninterrupted(world, reference, reference_contrastive, zero3_crashed,
                                                       tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(zero3_crashed, out)
    _ok(run_recipe("stage1_distill.py", "stage1_tiny.yaml",
                   _overrides(world, out, **{"engine.zero_stage": 3, **CONTRASTIVE}), ranks=2))
    m = _metrics(out)
    history = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == list(range(1, STEPS + 1))  # step 4 redone once, not twice
    assert all(r["contrastive"] > 0 for r in history["train"])
    # ZeRO-3 with the term = one process with it; and the term changed the losses (it is not silently off)
    assert m["train_losses"] == pytest.approx(reference_contrastive, rel=1e-6)
    assert abs(reference_contrastive[0] - reference[0]) > 0.1
    assert m["frozen_unchanged"] and m["frozen_sha256_start"] == _embedding_fingerprint(world)


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(world, zero3_crashed, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(zero3_crashed, corrupt)
    victim = min((corrupt / "checkpoints" / "step-00000003").glob("*optim_states.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_recipe("stage1_distill.py", "stage1_tiny.yaml", _overrides(world, corrupt, **CONTRASTIVE))
    assert proc.returncode != 0
    assert "CheckpointError" in proc.stderr and victim.name in proc.stderr and "corrupt" in proc.stderr

    other = tmp_path / "other"
    shutil.copytree(zero3_crashed, other)
    # Other training data too (a re-aligned manifest: same rows, one boundary moved), not only another model.
    rows = Path(world["manifest"]).read_text().splitlines()
    first = json.loads(rows[0])
    if first.get("token_boundaries"):
        first["token_boundaries"][0] = max(0, first["token_boundaries"][0] - 1)
    first["text"] = first["text"] + " "
    realigned = tmp_path / "realigned.jsonl"
    realigned.write_text("\n".join([json.dumps(first)] + rows[1:]) + "\n")
    proc = run_recipe("stage1_distill.py", "stage1_tiny.yaml",
                      _overrides(world, other, **{"model.connector.d_model": 48, "data.train_manifest": realigned,
                                                  **CONTRASTIVE}))
    assert proc.returncode != 0 and "CheckpointError" in proc.stderr
    for why in ("saved with 2 ranks", "ZeRO-3", "trainable parameters differ", "d_model", "train_data"):
        assert why in proc.stderr, proc.stderr[-3000:]


def test_stage2_plain_process_keeps_the_llm_bit_identical(world, tmp_path):
    stage1 = tmp_path / "s1"
    _ok(run_recipe("stage1_distill.py", "stage1_tiny.yaml", _overrides(world, stage1, **{"loop.max_steps": 2})))
    over = [o for o in _overrides(world, tmp_path / "s2", **{"loop.max_steps": 4, "loop.save_every": 2})
            if not o.startswith("model.connector")]
    over += [f"model.init_connector={stage1 / 'connector'}", "leakage_utts=3", "distill_weight=0.5"]
    _ok(run_recipe("stage2_finetune.py", "stage2_tiny.yaml", over))
    m = _metrics(tmp_path / "s2")
    llm, _ = build.load_llm(world["llm"])
    assert m["frozen_unchanged"] and m["frozen_sha256_start"] == frozen_fingerprint(llm)
    valid = m["final_valid"]
    for k in ("loss_speech", "loss_text", "leakage_gap", "loss_speech_cut", "cosine"):
        assert k in valid and valid[k] == valid[k]  # present and not NaN
    assert valid["leakage_gap"] == pytest.approx(valid["loss_speech_cut"] - valid["loss_speech_onfly"])
