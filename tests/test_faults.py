"""Faults of a shared cluster, injected into 2-rank DeepSpeed (ZeRO-2) runs of stage 1 on a tiny random world
(issue 17; docs/PERFORMANCE.md "Reliability: faults tried"):

1. a NaN loss: the step is skipped on both ranks and counted; K in a row stop the run naming step and rows;
2. SIGTERM in the middle of a step: both ranks checkpoint that step and exit 75; the rerun resumes exactly;
3. out of memory on a batch: a clear error naming its size, rows and budget keys, or (skip_oom_batches) skipped;
4. audio deleted mid-run: skipped and reported (data.skip_bad), or both ranks stop naming the file, no hang;
5. a full disk while checkpointing: both ranks stop with the space needed/free; the previous checkpoint stays
   ``latest`` and the rerun resumes from it exactly.

Faults come from the ``SPEECHLM_FAULT`` drill (speechlm/training/faults.py, parse_faults), installed in the loop as
a hook (speechlm/training/hooks.py); a production run installs none. The quick tests at the top run in-process
without DeepSpeed (the loop on a fake engine); the launcher runs are marked slow (11 runs, ~3 minutes on 2 idle
cores).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from training_helpers import ROOT, fake_batches, fake_engine, make_world, run_recipe, stage1_overrides

from speechlm.errors import EXIT_PREEMPTED, AudioError, ConfigError, FeatureCacheError
from speechlm.training.failures import describe_batch, is_out_of_memory
from speechlm.training.faults import (
    FAULT_ENV,
    CrashAfter,
    FaultInjector,
    drill_hooks,
    failing_writes,
    parse_faults,
)
from speechlm.training.hooks import HookList, TrainHooks
from speechlm.training.loop import LoopConfig, Trainer, train_loop

STEPS = 6


# ------------------------------------------------------------------------------------ quick, in-process
def test_fault_spec_parses_and_refuses_typos():
    f = parse_faults("nan_at_step:3, oom_at_step:2-4@1,rm_at_step:5=/tmp/a:b.wav,enospc_at_save:4@1")
    assert [(x.kind, x.first, x.last, x.rank, x.path) for x in f] == [
        ("nan_at_step", 3, 3, None, ""), ("oom_at_step", 2, 4, 1, ""), ("rm_at_step", 5, 5, None, "/tmp/a:b.wav"),
        ("enospc_at_save", 4, 4, 1, "")]
    assert f[0].hits("nan_at_step", 3, rank=1) and not f[0].hits("nan_at_step", 4, rank=1)
    assert f[1].hits("oom_at_step", 3, rank=1) and not f[1].hits("oom_at_step", 3, rank=0)
    assert f[2].hits("rm_at_step", 5, rank=0) and not f[2].hits("rm_at_step", 5, rank=1)  # rank 0 deletes
    assert parse_faults("") == []
    for bad in ("nan_at:3", "nan_at_step", "rm_at_step:3", "nan_at_step:3=/x"):
        with pytest.raises(ConfigError, match=FAULT_ENV):
            parse_faults(bad)


def test_production_loop_installs_no_drill(monkeypatch):
    """Without SPEECHLM_FAULT and loop.crash_after nothing is installed; each asks for its own drill only."""
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert drill_hooks() == [] and drill_hooks(crash_after=0, rank=1) == []
    monkeypatch.setenv(FAULT_ENV, "nan_at_step:2")
    [injector] = drill_hooks()
    assert isinstance(injector, FaultInjector) and [f.kind for f in injector.items] == ["nan_at_step"]
    monkeypatch.setenv(FAULT_ENV, "")
    [crash] = drill_hooks(crash_after=3)
    assert isinstance(crash, CrashAfter) and crash.step == 3
    with pytest.raises(ConfigError, match=FAULT_ENV):
        drill_hooks(spec="nan_at:3")


def test_fault_injector_strikes_its_rank_and_step_once(tmp_path):
    oom = FaultInjector("oom_at_step:2@1", rank=1)
    oom.before_forward(1)
    with pytest.raises(torch.OutOfMemoryError, match=f"injected by {FAULT_ENV}"):
        oom.before_forward(2)
    oom.before_forward(2)  # once per step: the batch taken instead of the skipped one is spared
    FaultInjector("oom_at_step:2@1", rank=0).before_forward(2)  # another rank: nothing
    nan = FaultInjector("nan_at_step:3", rank=0)
    loss, metrics = nan.after_forward(3, torch.tensor(2.0), {"loss": 2.0, "tokens": 5})
    assert math.isnan(loss.item()) and math.isnan(metrics["loss"]) and metrics["tokens"] == 5
    assert nan.after_forward(4, torch.tensor(2.0), {"loss": 2.0})[1] == {"loss": 2.0}
    victim = tmp_path / "a.wav"
    victim.write_bytes(b"x")
    FaultInjector(f"rm_at_step:2={victim}", rank=1).start_of_step(2)  # rank 0 deletes by default
    assert victim.exists()
    FaultInjector(f"rm_at_step:2={victim}", rank=0).start_of_step(2)
    assert not victim.exists()


def test_full_disk_drill_fails_every_torch_save_inside_its_block_only(tmp_path):
    real = torch.save
    with failing_writes(), pytest.raises(OSError, match="No space left on device"):
        torch.save({"w": torch.ones(1)}, tmp_path / "x.pt")
    assert torch.save is real and not (tmp_path / "x.pt").exists()
    injector = FaultInjector("enospc_at_save:4", rank=0)
    with injector.saving(2):
        torch.save({"w": torch.ones(1)}, tmp_path / "ok.pt")
    with injector.saving(4), pytest.raises(OSError):
        torch.save({"w": torch.ones(1)}, tmp_path / "full.pt")
    assert (tmp_path / "ok.pt").exists() and not (tmp_path / "full.pt").exists()


class _Recorder(TrainHooks):
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def start_of_step(self, step):
        self.calls.append((self.name, "start_of_step", step))

    def before_forward(self, step):
        self.calls.append((self.name, "before_forward", step))

    def after_forward(self, step, loss, metrics):
        self.calls.append((self.name, "after_forward", step))
        return loss * 2, {**metrics, self.name: 1.0}

    def after_step(self, step, engine):
        self.calls.append((self.name, "after_step", step))

    @contextmanager
    def saving(self, step):
        self.calls.append((self.name, "saving", step))
        yield

    def end_of_step(self, step):
        self.calls.append((self.name, "end_of_step", step))


def test_hook_list_calls_every_hook_in_order_and_chains_the_loss():
    calls: list = []
    hooks = HookList([_Recorder("a", calls), _Recorder("b", calls)])
    loss, metrics = hooks.after_forward(1, torch.tensor(1.0), {"loss": 1.0})
    assert loss.item() == 4.0 and metrics == {"loss": 1.0, "a": 1.0, "b": 1.0}
    with hooks.saving(3):
        pass
    assert calls == [("a", "after_forward", 1), ("b", "after_forward", 1), ("a", "saving", 3), ("b", "saving", 3)]
    assert not HookList() and HookList([TrainHooks()])


def _fake_loop(tmp_path: Path, hooks=(), **cfg) -> dict:
    engine = fake_engine()
    loop = LoopConfig(**{"max_steps": 3, "eval_every": 0, "save_every": 0, "progress": False, **cfg})
    return Trainer(engine, fake_batches(), lambda raw, step=None: raw, lambda: {"loss": 1.0}, loop, tmp_path,
                   {"run": "fake"}, export=lambda folder: None, title="fake", hooks=hooks).run()


def test_trainer_calls_installed_hooks_at_the_named_points(tmp_path):
    calls: list = []
    result = _fake_loop(tmp_path, [_Recorder("h", calls)], max_steps=2)
    points = [(point, step) for _, point, step in calls]
    per_step = ["start_of_step", "before_forward", "after_forward", "after_step"]
    assert points == ([(p, 1) for p in per_step] + [("end_of_step", 1)]
                      + [(p, 2) for p in per_step] + [("saving", 2), ("end_of_step", 2)])
    assert result["steps"] == 2 and result["optimizer_updates"] == 2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    # the metrics a hook returns are the metrics the loop logs
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["h"] for r in history["train"]] == [1.0, 1.0]


def test_nan_drill_installed_as_a_hook_skips_the_step_in_process(tmp_path):
    """The NaN-loss drill on the fake engine: the step makes no update and is counted; the others train."""
    clean = _fake_loop(tmp_path / "clean")
    hit = _fake_loop(tmp_path / "nan", [FaultInjector("nan_at_step:2", rank=0)])
    assert (hit["nonfinite_steps"], hit["optimizer_updates"], clean["optimizer_updates"]) == (1, 2, 3)
    assert math.isnan(hit["train_losses"][1]) and hit["train_losses"][0] == clean["train_losses"][0]
    assert all(math.isfinite(x) for x in hit["train_losses"][::2])


def test_train_loop_keeps_its_signature_and_reads_the_drill_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "nan_at_step:1")
    engine = fake_engine()
    cfg = LoopConfig(max_steps=2, eval_every=0, save_every=0, progress=False)
    result = train_loop(engine, fake_batches(), lambda raw, step=None: raw, lambda: {"loss": 1.0}, cfg, tmp_path,
                        {"run": "fake"}, lambda folder: None, start=None, title="fake", frozen_check=None,
                        batch_limits=None)
    assert result["nonfinite_steps"] == 1 and result["optimizer_updates"] == 1


def test_a_checkpoint_missing_a_ranks_file_is_never_committed_nor_resumed(tmp_path):
    """Every rank's files must be in a checkpoint before it is called complete (a folder removed under a rank that
    was still saving left one with rank 1's optimizer partition and the module states gone), and a checkpoint
    without them is refused on resume with what it lacks, not DeepSpeed's bare assertion."""
    from speechlm.errors import CheckpointError, CheckpointWriteError
    from speechlm.training.checkpoint import load_checkpoint, missing_files, save_checkpoint

    zero2 = ["trainer_state_rank0.pt", "trainer_state_rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert missing_files(zero2, 2, 2) == ["mp_rank_*_model_states.pt", "*zero_pp_rank_1_mp_rank_*_optim_states.pt"]
    zero3 = [f"trainer_state_rank{r}.pt" for r in range(12)] + [
        f"{pre}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(12) for pre, kind in (("", "model"),
                                                                                                 ("bf16_", "optim"))]
    assert missing_files(zero3, 12, 3) == []
    assert missing_files([n for n in zero3 if n != "zero_pp_rank_1_mp_rank_00_model_states.pt"], 12, 3) == [
        "zero_pp_rank_1_mp_rank_*_model_states.pt"]  # rank 10's and 11's files do not stand in for rank 1's
    assert missing_files(["trainer_state_rank0.pt", "mp_rank_00_model_states.pt"], 1, 0) == []

    engine, ckpts = fake_engine(), tmp_path / "checkpoints"
    first = save_checkpoint(engine, ckpts, 1, {"run": "fake"}, {})
    engine.ds.save_checkpoint = lambda folder, tag, **kwargs: None  # DeepSpeed's files vanish before the commit
    with pytest.raises(CheckpointWriteError, match=r"incomplete: no mp_rank_\*_model_states\.pt"):
        save_checkpoint(engine, ckpts, 2, {"run": "fake"}, {})
    assert (ckpts / "latest").read_text().strip() == first.name
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", first.name]  # no step 2, no temporary left

    meta = json.loads((first / "meta.json").read_text())  # a checkpoint committed without them (older code)
    del meta["files"]["mp_rank_00_model_states.pt"]
    (first / "meta.json").write_text(json.dumps(meta))
    (first / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=f"{first}: incomplete checkpoint, no mp_rank_"):
        load_checkpoint(engine, ckpts, {"run": "fake"})


def test_out_of_memory_is_recognised_and_described():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 123456789 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    from speechlm.data.batching import Example, collate

    batch = collate([Example("a", [1, 2, 3], [1, 2, 3], features=torch.zeros(1, 7, 4)),
                     Example("b", [4], [0], features=torch.zeros(1, 5, 4))])
    text = describe_batch(batch, {"data.max_frames": 400, "data.max_tokens": 40})
    assert "2 x 7 = 14 padded encoder frames" in text and "2 x 3 = 6 padded tokens (4 real)" in text
    assert "ids: a, b" in text and "data.max_frames=400, data.max_tokens=40" in text


def test_unreadable_rows_are_skipped_or_named(tmp_path):
    """A row whose cached features are gone: skipped with data.skip_bad, else an error naming the shard."""
    from speechlm.data.audio import save_audio
    from speechlm.data.batching import ExampleReader
    from speechlm.data.feature_cache import FeatureCache, audio_fingerprint
    from speechlm.data.manifest import Utterance

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(1, len(text.split()) + 1))}

    from safetensors.torch import save_file

    root = tmp_path / "cache"
    root.mkdir()
    utts = []
    for i in range(2):
        wav = tmp_path / f"u{i}.wav"
        save_audio(wav, torch.zeros(1600).numpy(), 16000)
        utts.append(Utterance(id=f"u{i}", audio=str(wav), sample_rate=16000, duration_s=0.1, text="a b",
                              split="train", token_boundaries=[1, 3], boundary_frame_rate_hz=50.0))
        save_file({f"u{i}": torch.ones(1, 5, 4, dtype=torch.float16)}, str(root / f"shard-0000{i}.safetensors"))
    key = {"encoder": "x", "frame_rate_hz": 50.0, "layers": [-1], "hidden_size": 4, "sample_rate": 16000}
    index = {"format": "speechlm-feature-cache-1", "encoder_key": key, "dtype": "float16",
             "shards": {f"shard-0000{i}.safetensors": (root / f"shard-0000{i}.safetensors").stat().st_size
                        for i in range(2)},
             "utterances": {f"u{i}": {"shard": f"shard-0000{i}.safetensors", "frames": 5,
                                      "audio": audio_fingerprint(utts[i].audio_path)} for i in range(2)}}
    (root / "index.json").write_text(json.dumps(index))
    reader = ExampleReader(Tok(), 50.0, root, key)
    assert isinstance(reader.cache, FeatureCache)
    (root / "shard-00001.safetensors").unlink()  # gone after the run opened the cache
    with pytest.raises(FeatureCacheError, match=r"shard-00001.safetensors: feature-cache shard unreadable.*'u1'"):
        reader.read_batch(utts)
    reader.skip_bad = True
    batch = reader.read_batch(utts, epoch=2, index=5)
    assert batch.utt_ids == ["u0"] and [s[0] for s in batch.skipped] == ["u1"] and (batch.epoch, batch.index) == (2, 5)
    assert reader.read_batch(utts[1:]).empty
    # the on-the-fly path: the audio itself is gone
    audio_reader = ExampleReader(Tok(), 50.0)
    Path(utts[0].audio_path).unlink()
    with pytest.raises(AudioError, match=r"u0.wav: audio file not found \(row 'u0'; data.skip_bad=true"):
        audio_reader.read_batch(utts)
    audio_reader.skip_bad = True
    assert audio_reader.read_batch(utts).utt_ids == ["u1"]


def test_precision_fp16_uses_dynamic_loss_scaling_and_bf16_checks_gradients():
    from speechlm.training.deepspeed_engine import EngineConfig, ds_config, train_dtype

    conf = ds_config(EngineConfig(precision="fp16"))
    assert conf["fp16"]["enabled"] is True and conf["fp16"]["loss_scale"] == 0 and conf["bf16"]["enabled"] is False
    assert train_dtype(EngineConfig(precision="fp16")) == torch.float16
    assert "fp16" not in ds_config(EngineConfig(precision="fp32"))


# ------------------------------------------------------------------------------------ 2-rank launcher runs
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return make_world(tmp_path_factory.mktemp("faultworld"))


@contextmanager
def _faults(spec: str):
    old = os.environ.get(FAULT_ENV)
    os.environ[FAULT_ENV] = spec
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FAULT_ENV, None)
        else:
            os.environ[FAULT_ENV] = old


def _overrides(world: dict, out: Path, cache: bool = True, **extra) -> list[str]:
    return stage1_overrides(world, out, cache=cache, **{"loop.max_steps": STEPS, "loop.save_every": 2,
                                                        "loop.eval_every": 3, "loop.log_every": 1, **extra})


def _run(world: dict, out: Path, faults: str = "", ranks: int = 2, cache: bool = True, **extra):
    over = _overrides(world, out, cache, **extra)
    with _faults(faults):
        return run_recipe("stage1_distill.py", "stage1_tiny.yaml", over, ranks=ranks, timeout=300)


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _failed(proc) -> str:
    """The stderr of a run that must have failed."""
    assert proc.returncode != 0
    return proc.stderr


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "connector" / "model.safetensors"))


def _ckpts(out: Path) -> list[str]:
    """The checkpoint folder's entries (DeepSpeed's zero_to_fp32.py helper scripts left out)."""
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.suffix != ".py")


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def _intact(ckpt: Path) -> bool:
    """Every file meta.json lists is there with its size and sha256."""
    from speechlm.training.checkpoint import _sha256

    meta = json.loads((ckpt / "meta.json").read_text())
    return all((ckpt / n).stat().st_size == f["size"] and _sha256(ckpt / n) == f["sha256"]
               for n, f in meta["files"].items())


@pytest.fixture(scope="module")
def baseline(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    _ok(_run(world, out))
    return out


@pytest.fixture(scope="module")
def preempted_chain(world, tmp_path_factory) -> dict:
    """SIGTERM on rank 1 in the middle of step 3 -> checkpoint step 3, exit 75; rerun with a full disk on rank 1
    at the step-4 save -> both ranks stop, step 3 stays latest; rerun -> finishes from step 3."""
    out = tmp_path_factory.mktemp("chain") / "run"
    term = _run(world, out, "sigterm_at_step:3@1")
    after_term = {"latest": _latest(out), "ckpts": _ckpts(out),
                  "metrics": (out / "metrics.json").exists()}
    full = _run(world, out, "enospc_at_save:4@1")
    after_full = {"latest": _latest(out), "ckpts": _ckpts(out),
                  "intact": _intact(out / "checkpoints" / _latest(out))}
    final = _run(world, out)
    return {"out": out, "term": term, "after_term": after_term, "full": full, "after_full": after_full,
            "final": final}


@pytest.mark.slow
def test_sigterm_mid_step_checkpoints_that_step_and_the_rerun_resumes_exactly(baseline, preempted_chain):
    term = preempted_chain["term"]
    assert term.returncode == EXIT_PREEMPTED, term.stdout[-2000:] + term.stderr[-4000:]
    assert "SIGTERM: finishing the current step" in term.stderr  # rank 1's handler
    assert "stopped by SIGTERM after step 3 of 6" in term.stderr  # both ranks agreed on step 3
    assert preempted_chain["after_term"] == {"latest": "step-00000003", "metrics": False,
                                             "ckpts": ["latest", "step-00000002", "step-00000003"]}
    _ok(preempted_chain["final"])
    out = preempted_chain["out"]
    m, ref = _metrics(out), _metrics(baseline)
    history = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == list(range(1, STEPS + 1))  # no step lost, none repeated
    assert m["train_losses"] == ref["train_losses"]  # the same losses, bit for bit
    w, w_ref = _weights(out), _weights(baseline)
    assert w.keys() == w_ref.keys() and all(torch.equal(w[k], w_ref[k]) for k in w)
    assert {k: v for k, v in m["final_valid"].items() if k != "time_s"} == {
        k: v for k, v in ref["final_valid"].items() if k != "time_s"}


@pytest.mark.slow
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(baseline, preempted_chain):
    full = preempted_chain["full"]
    assert full.returncode not in (0, EXIT_PREEMPTED)
    err = full.stderr
    assert err.count("CheckpointWriteError") >= 2, err[-4000:]  # raised on both ranks: neither waits for the other
    assert "step-00000004: writing the checkpoint failed (rank 1:" in err and "No space left on device" in err
    assert "the checkpoint needs ~" in err and "MiB free on the filesystem of" in err
    assert "step-00000003 is untouched and `latest` still names it" in err
    after = preempted_chain["after_full"]
    assert after["latest"] == "step-00000003" and after["intact"]
    assert not [c for c in after["ckpts"] if c.endswith(".tmp")]  # the partial write was removed
    _ok(preempted_chain["final"])  # ... and the rerun resumed from step 3 (compared in the SIGTERM test)


@pytest.mark.slow
def test_nan_loss_skip_under_zero0_and_zero3(world, tmp_path):
    """The same skip where DeepSpeed has no overflow check of its own (ZeRO-0: a bare torch AdamW, guarded by the
    loop) and where parameters are partitioned (ZeRO-3): no update at the NaN step, the same losses after it."""
    losses = {}
    for stage in (0, 3):
        out = tmp_path / f"z{stage}"
        _ok(_run(world, out, "nan_at_step:2@1", **{"engine.zero_stage": stage, "loop.max_steps": 4,
                                                    "loop.eval_every": 0, "loop.save_every": 0}))
        m = _metrics(out)
        assert (m["nonfinite_steps"], m["optimizer_updates"], m["ds_skipped_steps"]) == (1, 3, 1), stage
        losses[stage] = m["train_losses"]
    assert math.isnan(losses[0][1]) and math.isnan(losses[3][1])
    assert [losses[0][i] for i in (0, 2, 3)] == pytest.approx([losses[3][i] for i in (0, 2, 3)], rel=1e-5)


@pytest.mark.slow
def test_nan_losses_in_a_row_stop_the_run_naming_step_and_rows(world, tmp_path):
    out = tmp_path / "nans"
    err = _failed(_run(world, out, "nan_at_step:3-9@1", **{"loop.max_bad_steps": 2}))
    assert err.count("NonFiniteError") >= 2, err[-4000:]
    assert "2 steps in a row without an update (loop.max_bad_steps=2): steps 3, 4 had a non-finite loss" in err
    assert "the last, step 4, trained on rank 0: u" in err and "rank 1: u" in err
    assert _latest(out) == "step-00000002" and _intact(out / "checkpoints" / "step-00000002")


@pytest.mark.slow
def test_nonfinite_weights_are_never_saved(world, tmp_path):
    out = tmp_path / "nanw"
    err = _failed(_run(world, out, "nan_weights_at_step:4"))
    assert err.count("NonFiniteError: refusing to write checkpoint") >= 2, err[-4000:]
    assert _latest(out) == "step-00000002" and _intact(out / "checkpoints" / "step-00000002")
    assert not (out / "checkpoints" / "step-00000004").exists()


@pytest.mark.slow
def test_out_of_memory_names_the_batch_and_its_budget(world, tmp_path):
    out = tmp_path / "oom"
    err = _failed(_run(world, out, "oom_at_step:2@1", **{"loop.max_steps": 3}))
    assert err.count("BatchMemoryError: out of memory in the forward pass of step 2 on rank 1:") >= 2, err[-4000:]
    assert "padded encoder frames" in err and "padded tokens" in err and "ids: u" in err
    assert "data.max_frames=400, data.max_tokens=40" in err and "loop.skip_oom_batches=true" in err


@pytest.mark.slow
def test_missing_audio_stops_every_rank_naming_the_file(world, tmp_path):
    """On-the-fly features: rank 1's audio of step 2 deleted as step 2 begins, without data.skip_bad."""
    victim_world = _copy_audio(world, tmp_path)
    out = tmp_path / "gone"
    step2 = _planned_batches(victim_world, _overrides(victim_world, out, cache=False), rank=1, n=2)[1]
    spec = ",".join(f"rm_at_step:2={victim_world['audio']}/{u}.wav" for u in step2)
    err = _failed(_run(victim_world, out, spec, cache=False, **{"loop.max_steps": 3}))
    assert f"{step2[0]}.wav: audio file not found (row '{step2[0]}'; data.skip_bad=true" in err, err[-4000:]
    assert ("RankError: rank 1 stopped the run at step 2 (loading a batch): AudioError: "
            f"{victim_world['audio']}/{step2[0]}.wav: audio file not found") in err


def _copy_audio(world: dict, tmp_path: Path) -> dict:
    """The world with its own copy of the audio and manifest (the fault deletes files)."""
    from speechlm.data.manifest import read_manifest, write_manifest

    dest = tmp_path / "world"
    shutil.copytree(Path(world["manifest"]).parent / "audio", dest / "audio")
    rows = read_manifest(world["manifest"])
    for r in rows:
        r.root = None
        r.audio = str(dest / "audio" / Path(r.audio).name)
    write_manifest(dest / "manifest.jsonl", rows)
    return {**world, "manifest": str(dest / "manifest.jsonl"), "audio": str(dest / "audio")}


def _planned_batches(world: dict, overrides: list[str], rank: int, n: int) -> list[list[str]]:
    """The first ``n`` batches (utterance ids) rank ``rank`` of 2 trains on, as the recipe samples them."""
    from speechlm.config import load_config
    from speechlm.data.batching import DistributedBucketSampler, SpeechTextDataset
    from speechlm.training import build
    from speechlm.training.configs import Stage1Config

    cfg = load_config(Stage1Config, str(ROOT / "recipes/configs/stage1_tiny.yaml"), overrides)
    _, tok = build.load_llm_embeddings(cfg.model.llm)
    enc = build.encoder_facts(cfg.model, cfg.data, build.load_encoder(cfg.model))
    utts = build.read_split(cfg.data.train_manifest, cfg.data.train_split)
    frames, tokens = SpeechTextDataset(utts, build.make_reader(cfg.data, enc, tok)).lengths()
    d = cfg.data
    sampler = DistributedBucketSampler(frames, tokens, d.max_frames, d.max_tokens, d.max_batch, 2, rank, cfg.seed,
                                       shuffle=True, infinite=True, window=d.bucket_window)
    out = []
    for key in sampler:
        out.append([utts[i].id for i in key.indices])
        if len(out) == n:
            return out
    return out


NAN_STEP = 5


@pytest.fixture(scope="module")
def survivor(world, tmp_path_factory) -> dict:
    """One run told to skip (data.skip_bad, loop.skip_oom_batches) through three faults: out of memory on rank 0
    at step 2, audio deleted as step 3 begins (on-the-fly features), a NaN loss on rank 1 at step 5."""
    tmp_path = tmp_path_factory.mktemp("survivor")
    victim_world = _copy_audio(world, tmp_path)
    out = tmp_path / "run"
    extra = {"data.skip_bad": "true", "loop.skip_oom_batches": "true"}
    over = _overrides(victim_world, out, cache=False, **extra)
    # Step 1 trains batch 0 of each rank; step 2 drops batch 1 (OOM) and trains batch 2; step s >= 2 trains batch s.
    after = [b for r in (0, 1) for b in _planned_batches(victim_world, over, r, STEPS + 1)[3:]]  # steps 3-6
    # Victims: rows whose every batch in steps 3-6 keeps another row (so no batch becomes empty).
    gone = [u for u in dict.fromkeys(x for b in after for x in b)
            if all(len(b) > 1 for b in after if u in b)][:2]
    later = [b for b in after if set(b) & set(gone)]
    assert gone and all(len(set(b) - set(gone)) for b in later)
    spec = ",".join(["oom_at_step:2@0", f"nan_at_step:{NAN_STEP}@1"]
                    + [f"rm_at_step:3={victim_world['audio']}/{u}.wav" for u in gone])
    proc = _run(victim_world, out, spec, cache=False, **extra)
    _ok(proc)
    return {"out": out, "proc": proc, "metrics": _metrics(out),
            "expected_skipped": sorted(u for b in after for u in b if u in gone)}


@pytest.mark.slow
def test_nan_loss_step_is_skipped_on_every_rank(survivor):
    m, out, err = survivor["metrics"], survivor["out"], survivor["proc"].stderr
    assert m["steps"] == STEPS and m["nonfinite_steps"] == 1 and m["optimizer_updates"] == STEPS - 1
    assert m["ds_skipped_steps"] == 1  # DeepSpeed's own count agrees: its overflow check dropped the step
    losses = m["train_losses"]
    assert math.isnan(losses[NAN_STEP - 1]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != NAN_STEP - 1)
    assert (f"step {NAN_STEP} skipped on every rank (no optimizer update): non-finite loss; batches rank 0: u"
            in err), err[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [r.get("skipped") for r in history["train"]][NAN_STEP - 2: NAN_STEP + 1] == [0.0, 1.0, 0.0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/nonfinite_steps")][-3:] == [(4, 0.0), (5, 1.0), (6, 1.0)]
    assert math.isfinite(m["final_valid"]["loss"])


@pytest.mark.slow
def test_survives_oom_batch_and_deleted_audio_when_told_to_skip(survivor):
    """Every step is trained; the skipped batch and rows are counted and named."""
    m, err = survivor["metrics"], survivor["proc"].stderr
    assert m["steps"] == STEPS and m["oom_batches"] == 1
    expected = survivor["expected_skipped"]
    assert m["rows_skipped"] == len(expected) and sorted(r["id"] for r in m["skipped_rows"]) == expected
    assert all("audio file not found" in r["error"] for r in m["skipped_rows"])
    assert "out of memory in the forward pass of step 2 on rank 0:" in err and "batch skipped on every rank" in err
    assert "skipping row" in err
