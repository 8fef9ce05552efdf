"""One import for a training recipe: the DeepSpeed engine, processes and collectives, checkpoints and exports.

Each part lives in its own module; this one only re-exports them (no code of its own):

- :mod:`speechlm.training.deepspeed_engine`: ``EngineConfig``, ``build_engine``, ``Engine``, the DeepSpeed JSON,
  precision, and the checks on the engine's weights (frozen fingerprint, finite values);
- :mod:`speechlm.training.distributed`: the process group, threads, seeds and RNG state, collectives;
- :mod:`speechlm.training.checkpoint`: resumable checkpoints (exact resume), loaded through
  :mod:`speechlm.training.safe_load` (no code runs from a checkpoint);
- :mod:`speechlm.training.export`: the connector, LoRA and encoder-adaptation exports.
"""

from __future__ import annotations

from speechlm.training.checkpoint import (  # noqa: F401 -- the private one: a test imports it from here
    CKPT_FORMAT,
    _with_new_defaults,
    checkpoint_bytes,
    estimate_checkpoint_bytes,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from speechlm.training.deepspeed_engine import (
    DS_DIR,
    Engine,
    EngineConfig,
    build_engine,
    check_finite_weights,
    ds_config,
    frozen_fingerprint,
    gathered,
    nonfinite_parameters,
    param_groups,
    train_dtype,
    trainable_shapes,
    use_bf16,
)
from speechlm.training.distributed import (
    DistInfo,
    agree_failures,
    all_max,
    all_mean,
    all_sum,
    barrier,
    gather_objects,
    init_distributed,
    release_shm_buffers,
    rng_state,
    run_main,
    seed_everything,
    set_rng_state,
    set_threads,
    shutdown_distributed,
)
from speechlm.training.export import export_encoder_adapt, export_lora, export_module
from speechlm.training.safe_load import SAFE_CHECKPOINT_GLOBALS, safe_torch_load

__all__ = [
    "CKPT_FORMAT", "DS_DIR", "SAFE_CHECKPOINT_GLOBALS", "DistInfo", "Engine", "EngineConfig", "agree_failures",
    "all_max", "all_mean", "all_sum", "barrier", "build_engine", "check_finite_weights", "checkpoint_bytes",
    "ds_config", "estimate_checkpoint_bytes", "export_encoder_adapt", "export_lora", "export_module",
    "frozen_fingerprint", "gather_objects", "gathered", "init_distributed", "latest_checkpoint", "load_checkpoint",
    "nonfinite_parameters", "param_groups", "release_shm_buffers", "rng_state", "run_main", "safe_torch_load",
    "save_checkpoint", "seed_everything", "set_rng_state", "set_threads", "shutdown_distributed", "train_dtype",
    "trainable_shapes", "use_bf16",
]
