"""The DeepSpeed engine: its config (optimizer, schedule, precision, ZeRO stage), the engine itself with the
frozen parts kept out of the optimizer, and the checks on its weights (frozen fingerprint, finite values)
made before anything is written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speechlm.errors import ConfigError, NonFiniteError
from speechlm.training.distributed import DistInfo, all_max, gather_objects
from speechlm.training.schedule import warmup_cosine

DS_DIR = Path(__file__).resolve().parents[2] / "recipes" / "ds"


@dataclass
class EngineConfig:
    """Optimizer, schedule, precision and parallelism (docs/METHOD.md defaults; recipes scale them down)."""

    zero_stage: int = 2  # 0, 2 or 3: picks recipes/ds/zero{stage}.json unless ds_config is given
    ds_config: str = ""
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    warmup_steps: int = 2000
    lr_floor: float = 0.2  # cosine decay ends at lr_floor * lr
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    # "auto" (bf16 where the accelerator has it, else fp32) | "bf16" | "fp32" | "fp16" (DeepSpeed's dynamic
    # loss scaling: steps whose scaled gradients overflow are skipped and counted, see ds_skipped_steps)
    precision: str = "auto"
    threads: int = 0  # torch threads per rank; 0 = CPU cores / ranks on this node


def use_bf16(precision: str) -> bool:
    """Whether ``precision`` trains in bf16 here ("auto": where the accelerator has it); refuses impossible asks."""
    from deepspeed.accelerator import get_accelerator

    if precision in ("fp32", "fp16"):
        return False
    acc = get_accelerator()
    has = acc.device_name() != "cpu" and bool(acc.is_bf16_supported())
    if precision == "bf16" and not has:
        raise ConfigError(f"precision=bf16 but the {acc.device_name()} accelerator has no bf16 training support")
    if precision not in ("auto", "bf16"):
        raise ConfigError(f"precision must be auto, bf16, fp32 or fp16, not {precision!r}")
    return has


def ds_config(cfg: EngineConfig) -> dict:
    """The DeepSpeed JSON of ``cfg.zero_stage`` with its "auto" entries filled from ``cfg``."""
    path = Path(cfg.ds_config) if cfg.ds_config else DS_DIR / f"zero{cfg.zero_stage}.json"
    if not path.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found (zero_stage={cfg.zero_stage})")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    auto = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip}
    for k, v in auto.items():
        if conf.get(k, "auto") == "auto":
            conf[k] = v
    bf16 = use_bf16(cfg.precision)
    if conf.setdefault("bf16", {}).get("enabled", "auto") == "auto":
        conf["bf16"]["enabled"] = bf16
    if conf["bf16"]["enabled"]:
        conf.pop("fp16", None)
        # DeepSpeed then skips (and counts) a step whose gradients are not finite, as it does for fp16/fp32
        conf["bf16"].setdefault("check_grad_overflow", True)
    if cfg.precision == "fp16":
        if conf["bf16"]["enabled"]:
            raise ConfigError(f"precision=fp16 but {path} enables bf16")
        fp16 = conf.setdefault("fp16", {})
        fp16["enabled"] = True
        fp16.setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
        fp16.setdefault("initial_scale_power", 16)
        fp16.setdefault("loss_scale_window", 1000)
        fp16.setdefault("hysteresis", 2)
        fp16.setdefault("min_loss_scale", 1)
    return conf


def train_dtype(cfg: EngineConfig) -> torch.dtype:
    """The precision DeepSpeed will train in: frozen models are loaded straight into it (no fp32 copy)."""
    conf = ds_config(cfg)
    if conf["bf16"]["enabled"]:
        return torch.bfloat16
    return torch.float16 if conf.get("fp16", {}).get("enabled") is True else torch.float32


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; no weight decay on biases, norms and 1-D weights (fusion logits)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameter")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Engine:
    """A DeepSpeed engine plus what training needs around it."""

    ds: Any  # deepspeed.DeepSpeedEngine
    scheduler: torch.optim.lr_scheduler.LambdaLR
    info: DistInfo
    cfg: EngineConfig
    bf16: bool

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def zero3(self) -> bool:
        return self.ds.zero_optimization_stage() == 3

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @property
    def fp16(self) -> bool:
        return bool(self.ds.fp16_enabled())

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped (fp16 loss-scale overflows, non-finite gradients) since this process began."""
        return int(getattr(self.ds, "skipped_steps", 0))

    @property
    def loss_scale(self) -> float | None:
        """The current fp16 dynamic loss scale (None when not training in fp16)."""
        if not self.fp16:
            return None
        scale = getattr(self.ds.optimizer, "cur_scale", None)
        if scale is None:
            scale = getattr(self.ds.optimizer, "loss_scale", None)
        return float(scale) if scale is not None else None


def build_engine(model: nn.Module, cfg: EngineConfig, total_steps: int, info: DistInfo) -> Engine:
    """Wrap ``model`` (its frozen parts already ``requires_grad_(False)``) in DeepSpeed.

    Only trainable parameters reach the optimizer, so the frozen LLM holds no optimizer state and its
    weights cannot change. The AdamW + warm-up/cosine schedule is stepped by DeepSpeed at every
    optimizer step (every ``grad_accum`` micro-batches) and saved with its checkpoints.
    """
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    conf = ds_config(cfg)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps, cfg.lr_floor)
    trainable = [p for g in groups for p in g["params"]]
    ds, _, _, sched = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=trainable, config=conf)
    return Engine(ds, sched, info, cfg, bool(conf["bf16"]["enabled"]))


def _shape(p: nn.Parameter) -> list[int]:
    return list(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions leave p.shape empty


def trainable_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Name -> full shape of every trainable parameter (what a checkpoint must match to be resumed)."""
    return {n: _shape(p) for n, p in model.named_parameters() if p.requires_grad}


def gathered(params: list[nn.Parameter], engine: Engine):
    """Context in which ZeRO-3-partitioned ``params`` hold their full values (a no-op otherwise)."""
    import deepspeed

    if engine.zero3:
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def frozen_fingerprint(module: nn.Module, engine: Engine | None = None) -> str:
    """sha256 over the frozen parameters of ``module`` (name-sorted, raw bytes): equal = bit-identical.

    Under ZeRO-3 each parameter is gathered in turn (all ranks must call this).
    """
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda x: x[0]):
        if p.requires_grad:
            continue
        with gathered([p], engine) if engine is not None else contextlib.nullcontext():
            h.update(name.encode())
            h.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def nonfinite_parameters(engine: Engine, module: nn.Module | None = None, trainable_only: bool = True) -> list[str]:
    """Names of the parameters of ``module`` (default: the engine's) holding NaN or infinity, on every rank.

    Under ZeRO-3 each rank checks its own partition; the answer is agreed with one all-reduce (all ranks
    call this), and the names are gathered only when there is something to report.
    """
    bad = []
    for name, p in (module if module is not None else engine.module).named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data  # ZeRO-3: this rank's partition
        if t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    if not all_max([1.0 if bad else 0.0])[0]:
        return []
    return sorted({n for names in gather_objects(bad) for n in names})


def check_finite_weights(engine: Engine, what: str, module: nn.Module | None = None,
                         trainable_only: bool = True) -> None:
    """Raise :class:`NonFiniteError` on every rank when weights about to be written are not finite."""
    bad = nonfinite_parameters(engine, module, trainable_only)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(f"refusing to write {what}: non-finite values (NaN/inf) in {', '.join(bad[:5])}{more}; "
                             "the last checkpoint and export on disk are left as they were")
