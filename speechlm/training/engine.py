"""DeepSpeed setup (frozen parts excluded from the optimizer), checkpoints with exact resume, connector export.

The same code runs under the ``deepspeed`` launcher (any number of ranks) and as a plain ``python``
process, where :func:`init_distributed` makes a 1-rank process group itself.

Checkpoint layout (``ckpt_dir``)::

    step-00000100/   DeepSpeed's files (trainable parameters + optimizer + LR schedule only),
                     trainer_state_rank{r}.pt (step, data position, RNG states of that rank),
                     meta.json (identity of the run + size and sha256 of every file), written last
    latest           name of the newest COMPLETE checkpoint, replaced atomically after meta.json

A checkpoint is written into ``.step-00000100.tmp/`` and renamed to ``step-00000100/`` once every rank's
files and meta.json are there; ``latest`` is replaced last. A failed write (a full disk, an I/O error on
any rank) is agreed on by all ranks, removes the temporary folder and raises :class:`CheckpointWriteError`
on every rank naming the folder, the space the checkpoint needs and the space free: the previous
checkpoint and ``latest`` are left as they were, so a restart resumes from there. Weights that are not
finite are never saved or exported (:class:`NonFiniteError` instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from speechlm.atomic import atomic_write_text
from speechlm.errors import CheckpointError, CheckpointWriteError, ConfigError, NonFiniteError, SpeechLMError
from speechlm.training.schedule import warmup_cosine

log = logging.getLogger(__name__)

CKPT_FORMAT = "speechlm-train-checkpoint-1"
DS_DIR = Path(__file__).resolve().parents[2] / "recipes" / "ds"


@dataclass
class EngineConfig:
    """Optimizer, schedule, precision and parallelism (METHOD.md defaults; recipes scale them down)."""

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


# ------------------------------------------------------------------------------------ processes
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> DistInfo:
    """Join the launcher's process group, or make a 1-rank one for a plain ``python`` run."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # not started by the deepspeed launcher / torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   verbose=False)
        release_shm_buffers()
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    return DistInfo(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")), local_world)


def shutdown_distributed() -> None:
    """Meet at a barrier and tear the process group down in order before the interpreter exits.

    Left to the interpreter's exit, the ranks destroy their process groups in whatever order they happen to
    finish: a rank can then abort in C++ ("terminate called without an active exception", SIGABRT) after its
    work is done, and the launcher reports the whole run as failed. Call it only where every rank gets to:
    a normal end, or a preemption all ranks agreed on.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


def run_main(main: Callable[[], Any]) -> None:
    """The ``__main__`` of a training recipe: run it, exit 75 on an agreed preemption, shut down in order."""
    from speechlm.errors import EXIT_PREEMPTED, Preempted

    try:
        main()
    except Preempted as e:  # SIGTERM/SIGUSR1: the checkpoint is saved; the same command resumes
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        shutdown_distributed()
        sys.exit(EXIT_PREEMPTED)
    # an error leaves the group as it is: the other ranks may never reach a barrier, and the launcher stops them
    shutdown_distributed()


def release_shm_buffers(shm: Path = Path("/dev/shm")) -> list[Path]:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from ``/dev/shm`` once every rank has mapped it.

    DeepSpeed's shared-memory all-reduce (CPU ranks on one node) creates one 66 MiB file per rank, named by user,
    master address, port and rank, and never removes it: every run on a new port (the tests, a killed run) left
    2 x 66 MiB of RAM behind until a reboot. ``init_distributed`` returns on a rank only after it has mapped
    every other rank's buffer, so after a barrier no rank opens them by name any more; the mappings stay valid
    after the unlink and the memory goes back when the processes end, however they end. Returns what it removed.
    """
    from deepspeed.accelerator import get_accelerator

    # Only DeepSpeed's CPU accelerator makes these buffers; on GPUs no barrier is spent here (NCCL would need the
    # device set first).
    if not dist.is_initialized() or not shm.is_dir() or get_accelerator().device_name() != "cpu":
        return []
    dist.barrier()
    pattern = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '*')}_"
               f"{os.environ.get('MASTER_PORT', '*')}_{dist.get_rank()}")
    gone = []
    for f in shm.glob(pattern):
        try:
            f.unlink()
            gone.append(f)
        except OSError:  # another user's, or already gone
            pass
    return gone


def set_threads(threads: int, info: DistInfo) -> int:
    """Torch threads for this rank: ranks on one node share its cores instead of fighting over them."""
    n = threads if threads > 0 else max(1, (os.cpu_count() or 1) // max(1, info.local_world_size))
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; per rank, so dropout differs across ranks but is reproducible."""
    s = seed * 1000 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    """Every RNG's state in plain types and tensors (what ``torch.load(weights_only=True)`` reads back)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where small control tensors go for a collective: the GPU under NCCL (which has no CPU tensors), else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: list[float], op: Any = None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if _distributed():
        t = t.to(_comm_device())
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def all_mean(values: dict[str, float], weights: float = 1.0) -> dict[str, float]:
    """Weighted mean of scalar metrics over ranks (weights: e.g. token counts; one all-reduce)."""
    keys = sorted(values)
    t = _all_reduce([values[k] * weights for k in keys] + [weights])
    total = t[-1] or 1.0
    return {k: t[i] / total for i, k in enumerate(keys)}


def all_sum(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    t = _all_reduce([float(values[k]) for k in keys])
    return {k: t[i] for i, k in enumerate(keys)}


def all_max(flags: list[float]) -> list[float]:
    """Element-wise maximum over ranks (one small all-reduce): how every rank learns that any rank hit something."""
    return _all_reduce([float(f) for f in flags], dist.ReduceOp.MAX)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (pickled; for the rare error paths, not per step)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------ deepspeed
def use_bf16(precision: str) -> bool:
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
    return {n: _shape(p) for n, p in model.named_parameters() if p.requires_grad}


def gathered(params: list[nn.Parameter], engine: Engine):
    """Context in which ZeRO-3-partitioned ``params`` hold their full values (a no-op otherwise)."""
    import contextlib

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
        with gathered([p], engine) if engine is not None else _nullcontext():
            h.update(name.encode())
            h.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


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


def _agree(engine: Engine, err: BaseException | None) -> list[str] | None:
    """One all-reduce: did any rank fail? If so, every rank gets the failures as ["rank r: Type: message", ...]."""
    if not all_max([1.0 if err is not None else 0.0])[0]:
        return None
    mine = None if err is None else f"rank {engine.info.rank}: {type(err).__name__}: {err}"
    return [m for m in gather_objects(mine) if m]


def export_module(engine: Engine, module: nn.Module, folder: str | Path) -> None:
    """``module.save_pretrained(folder)`` on rank 0, gathering ZeRO-3 partitions first (all ranks call it).

    Non-finite weights are refused on every rank; a failed write on rank 0 is raised on every rank."""
    check_finite_weights(engine, f"the export {folder}", module, trainable_only=False)
    err = None
    with gathered(list(module.parameters()), engine):
        if engine.info.is_main:
            try:
                if engine.bf16 or engine.fp16:  # the export is fp32, whatever the training precision
                    import copy

                    module = copy.deepcopy(module).float()
                module.save_pretrained(folder)
            except Exception as e:  # noqa: BLE001 -- any failed write must reach the other ranks
                err = e
    failures = _agree(engine, err)
    if failures:
        raise CheckpointWriteError(f"{folder}: export failed ({'; '.join(failures)}); "
                                   f"{_space_text(Path(folder).parent)}") from err


def export_lora(engine: Engine, peft_model: nn.Module, folder: str | Path) -> None:
    """Save the LoRA adapter of a PEFT-wrapped LLM (only its trainable matrices) atomically on rank 0."""
    from speechlm.atomic import atomic_path

    check_finite_weights(engine, f"the LoRA export {folder}", peft_model)
    err = None
    with gathered([p for p in peft_model.parameters() if p.requires_grad], engine):
        if engine.info.is_main:
            try:
                with atomic_path(folder) as tmp:
                    peft_model.save_pretrained(str(tmp))
            except Exception as e:  # noqa: BLE001
                err = e
    failures = _agree(engine, err)
    if failures:
        raise CheckpointWriteError(f"{folder}: LoRA export failed ({'; '.join(failures)}); "
                                   f"{_space_text(Path(folder).parent)}") from err


def export_encoder_adapt(engine: Engine, encoder: nn.Module, folder: str | Path) -> None:
    """Save an adapted SpeechEncoder's adaptation (config.json + model.safetensors, fp32) atomically on rank 0
    (all ranks call it); non-finite weights are refused and a failed write is raised on every rank."""
    check_finite_weights(engine, f"the encoder adaptation export {folder}", encoder.adaptation, trainable_only=False)
    err = None
    if engine.info.is_main:
        try:
            encoder.save_adaptation(folder)
        except Exception as e:  # noqa: BLE001 -- any failed write must reach the other ranks
            err = e
    failures = _agree(engine, err)
    if failures:
        raise CheckpointWriteError(f"{folder}: encoder adaptation export failed ({'; '.join(failures)}); "
                                   f"{_space_text(Path(folder).parent)}") from err


# ------------------------------------------------------------------------------------ checkpoints
def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())  # on disk before meta.json calls the checkpoint complete
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None when there is none yet."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    path = ckpt_dir / tag
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{pointer} names {tag!r} but {path} is not a complete checkpoint")
    return path


def checkpoint_bytes(path: str | Path) -> int:
    """Size of a complete checkpoint folder, from its meta.json."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    return sum(int(f["size"]) for f in meta["files"].values()) + (Path(path) / "meta.json").stat().st_size


def estimate_checkpoint_bytes(engine: Engine, ckpt_dir: str | Path) -> int:
    """Bytes the next checkpoint will take: the size of the latest one, else trainable parameters x (their
    own size + fp32 master copy + two Adam moments)."""
    with contextlib.suppress(CheckpointError, OSError, ValueError, KeyError):
        latest = latest_checkpoint(ckpt_dir)
        if latest is not None:
            return checkpoint_bytes(latest)
    total = 0
    for p in engine.module.parameters():
        if p.requires_grad:
            n = int(getattr(p, "ds_numel", p.numel()))
            total += n * (p.element_size() + 12)
    return total


def _space_text(folder: Path, needed: int | None = None) -> str:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:,.1f} MiB free on the filesystem of {probe}"
    except OSError as e:
        free = f"free space of {probe} unknown ({e})"
    return (f"the checkpoint needs ~{needed / 2**20:,.1f} MiB, " if needed is not None else "") + free


@contextlib.contextmanager
def _failing_writes(active: bool):
    """Fault injection (SPEECHLM_FAULT=enospc_at_save:N): every torch.save on this rank fails with ENOSPC."""
    if not active:
        yield
        return
    real = torch.save

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by SPEECHLM_FAULT)", str(f))

    torch.save = full_disk
    try:
        yield
    finally:
        torch.save = real


def save_checkpoint(engine: Engine, ckpt_dir: str | Path, step: int, identity: dict, trainer_state: dict,
                    keep: int = 2, fail_writes: bool = False) -> Path:
    """Save a resumable checkpoint (all ranks call this); it becomes ``latest`` only once complete.

    Written into ``.step-N.tmp`` and renamed when every rank's files and meta.json are there. Any rank's
    failure (a full disk: also refused up front when the filesystem has less free space than the last
    checkpoint took) raises :class:`CheckpointWriteError` on every rank; the previous checkpoint and
    ``latest`` stay as they were. ``fail_writes``: fault injection, this rank's writes fail with ENOSPC.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = f"step-{step:08d}"
    path = ckpt_dir / tag
    tmp = ckpt_dir / f".{tag}.tmp"
    check_finite_weights(engine, f"checkpoint {path}")
    needed = estimate_checkpoint_bytes(engine, ckpt_dir)
    previous = None
    with contextlib.suppress(CheckpointError, OSError):
        previous = latest_checkpoint(ckpt_dir)

    def fail(failures: list[str], err: BaseException | None) -> None:
        if engine.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        kept = (f"the previous checkpoint {previous} is untouched and `latest` still names it: a restart "
                "resumes from there" if previous is not None else "there is no earlier checkpoint")
        raise CheckpointWriteError(f"{path}: writing the checkpoint failed ({'; '.join(failures)}); "
                                   f"{_space_text(ckpt_dir, needed)}; {kept}") from err

    err: BaseException | None = None
    if engine.info.is_main:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in ckpt_dir.glob(".step-*.tmp"):  # temporaries of a killed or failed save
                shutil.rmtree(stale, ignore_errors=True)
            free = shutil.disk_usage(ckpt_dir).free
            if free < needed:
                raise OSError(errno.ENOSPC, f"not enough free space: {free / 2**20:,.1f} MiB free, "
                              f"~{needed / 2**20:,.1f} MiB needed", str(ckpt_dir))
            tmp.mkdir()
        except OSError as e:
            err = e
    failures = _agree(engine, err)
    if failures:
        fail(failures, err)

    try:
        with _failing_writes(fail_writes):
            engine.ds.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"step": step}, save_latest=False,
                                      exclude_frozen_parameters=True)
    except Exception as e:  # noqa: BLE001 -- torch.save raises RuntimeError on a failed write, not only OSError
        err = e
        # DeepSpeed's save ends in a barrier that the ranks whose writes worked are waiting in: join it, then agree
        barrier()
    if err is None:
        state = {"step": step, "rank": engine.info.rank, "rng": rng_state(), **trainer_state}
        try:
            with _failing_writes(fail_writes):
                torch.save(state, tmp / f"trainer_state_rank{engine.info.rank}.pt")
        except Exception as e:  # noqa: BLE001
            err = e
    failures = _agree(engine, err)
    if failures:
        fail(failures, err)

    if engine.info.is_main:
        try:
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            meta = {"format": CKPT_FORMAT, "step": step, "world_size": engine.info.world_size,
                    "zero_stage": engine.ds.zero_optimization_stage(), "identity": identity,
                    "trainable": trainable_shapes(engine.module), "files": files}
            atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
            _fsync_dir(tmp)
            old = ckpt_dir / f".{tag}.old"
            if path.exists():  # an earlier save of this step (another run into the same out_dir)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(ckpt_dir)
            atomic_write_text(ckpt_dir / "latest", tag + "\n")
            shutil.rmtree(old, ignore_errors=True)
            complete = sorted(p for p in ckpt_dir.glob("step-*") if (p / "meta.json").is_file())
            for stale in complete[:-keep] if keep > 0 else []:
                if stale != path:
                    shutil.rmtree(stale, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            err = e
            old = ckpt_dir / f".{tag}.old"
            if not path.exists() and old.exists():
                with contextlib.suppress(OSError):
                    os.replace(old, path)  # put back what was there
    failures = _agree(engine, err)
    if failures:
        fail(failures, err)
    return path


def _with_new_defaults(identity: dict) -> dict:
    """A saved run identity with connector-config fields added since it was written set to their defaults, so a
    checkpoint from before a new (off by default) connector option still resumes."""
    from speechlm.models.connectors.base import connector_config_from_dict

    cfg = identity.get("connector")
    if not isinstance(cfg, dict) or "name" not in cfg:
        return identity
    try:
        return {**identity, "connector": dataclasses.asdict(connector_config_from_dict(cfg))}
    except SpeechLMError:  # a field this code does not know: reported as a mismatch below
        return identity


def _check_meta(path: Path, engine: Engine, identity: dict) -> dict:
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{meta_path}: not a {CKPT_FORMAT} checkpoint")
    for name, f in meta["files"].items():
        p = path / name
        if not p.is_file() or p.stat().st_size != f["size"] or _sha256(p) != f["sha256"]:
            raise CheckpointError(f"{p}: checkpoint file missing or corrupt (size/sha256 differ from {meta_path})")
    problems = []
    if meta["world_size"] != engine.info.world_size:
        problems.append(f"saved with {meta['world_size']} ranks, resuming with {engine.info.world_size} "
                        "(exact resume needs the same number)")
    if meta["zero_stage"] != engine.ds.zero_optimization_stage():
        problems.append(f"saved under ZeRO-{meta['zero_stage']}, resuming under "
                        f"ZeRO-{engine.ds.zero_optimization_stage()}")
    saved = _with_new_defaults(meta["identity"])
    for k in sorted(set(saved) | set(identity)):
        if saved.get(k) != identity.get(k):
            problems.append(f"{k}: checkpoint has {saved.get(k)!r}, this run {identity.get(k)!r}")
    mine = trainable_shapes(engine.module)
    if meta["trainable"] != mine:
        diff = sorted(k for k in set(meta["trainable"]) | set(mine) if meta["trainable"].get(k) != mine.get(k))
        problems.append(f"trainable parameters differ ({len(diff)}: {', '.join(diff[:5])})")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match this run (use another out_dir or "
                              "loop.resume=false): " + "; ".join(problems))
    return meta


#: The non-tensor objects DeepSpeed pickles into its optimizer states ("module:qualname"), allowed for
#: :func:`safe_torch_load`. Any other object in a checkpoint is refused rather than unpickled.
SAFE_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


def _safe_globals() -> list:
    import importlib

    found = []
    for spec in SAFE_CHECKPOINT_GLOBALS:
        module, _, name = spec.partition(":")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: it does not store that class
            continue
    return found


@contextlib.contextmanager
def safe_torch_load():
    """Within the block, every ``torch.load`` (DeepSpeed's own included, which asks for ``weights_only=False``)
    runs with ``weights_only=True`` and :data:`SAFE_CHECKPOINT_GLOBALS` allowed: loading a checkpoint never
    executes code from it. A file holding any other object raises ``pickle.UnpicklingError``."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        torch.load = original


def _unpickling_reason(e: BaseException) -> str:
    """The line of torch's weights-only refusal that names the object (its message starts with advice)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    named = [x for x in lines if "Unsupported" in x or "GLOBAL" in x]
    return (named or lines or [type(e).__name__])[0].split(". Please use")[0][:300]


def _unsafe_object_error(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: the checkpoint holds objects that a safe load (torch.load(weights_only=True)) refuses to run "
        f"({_unpickling_reason(e)}). A checkpoint from before speechlm loaded checkpoints safely (numpy arrays in "
        "its RNG state) cannot be resumed: start again with loop.resume=false or another out_dir. If it names a "
        "DeepSpeed class and you wrote the checkpoint yourself, add that class to SAFE_CHECKPOINT_GLOBALS in "
        "speechlm/training/engine.py; never load an untrusted one")


def load_checkpoint(engine: Engine, ckpt_dir: str | Path, identity: dict, path: str | Path | None = None
                    ) -> dict | None:
    """Restore the newest complete checkpoint (or ``path``): weights, optimizer, schedule, RNG.

    Returns this rank's trainer state (``step``, data position ...) or None when there is nothing
    to resume. A corrupt, incomplete or mismatched checkpoint raises :class:`CheckpointError`.
    """
    path = Path(path) if path is not None else latest_checkpoint(ckpt_dir)
    if path is None:
        return None
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
    _check_meta(path, engine, identity)
    import pickle

    try:
        with safe_torch_load():
            load_path, _ = engine.ds.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    except pickle.UnpicklingError as e:
        raise _unsafe_object_error(path, e) from None
    except Exception as e:  # noqa: BLE001 -- DeepSpeed raises assertion/pickle/runtime errors on bad files
        raise CheckpointError(f"{path}: DeepSpeed could not load the checkpoint ({type(e).__name__}: {e})") from None
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load")
    state_path = path / f"trainer_state_rank{engine.info.rank}.pt"
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe_object_error(state_path, e) from None
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types on a damaged file
        raise CheckpointError(f"{state_path}: unreadable trainer state ({e})") from None
    set_rng_state(state["rng"])
    return state
