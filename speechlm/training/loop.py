"""The training loop both stages share: steps, validation, checkpoints, TensorBoard, progress, curves.

It survives the faults of a shared cluster (docs/PERFORMANCE.md, "Reliability: faults tried"):

* **non-finite loss or gradients**: the step makes no optimizer update on any rank (a non-finite loss on
  any rank, agreed by an all-reduce before the backward pass, makes every rank back-propagate NaN, so
  DeepSpeed's overflow check drops the whole step; a bare optimizer under ZeRO-0 is guarded by our own
  check), is counted (``nonfinite_steps``), logged and shown in TensorBoard and the progress bar;
  ``loop.max_bad_steps`` such steps in a row stop the run with :class:`NonFiniteError` naming the step
  and the batch's utterance ids. fp16 runs report DeepSpeed's loss-scale skips (``loss_scale_skips``,
  ``ds_skipped_steps``, ``loss_scale``); those are normal and not counted as bad.
* **SIGTERM / SIGUSR1** (preemption): every rank finishes its step, the ranks agree (all-reduce) to stop
  at the same step, save a checkpoint there and raise :class:`Preempted`; the recipes exit with
  :data:`EXIT_PREEMPTED` (75). The same command resumes exactly.
* **out of memory on a batch**: :class:`BatchMemoryError` naming the batch's frames, tokens, utterance
  ids and the ``data.max_frames`` / ``data.max_tokens`` budget, on every rank; with
  ``loop.skip_oom_batches`` the batch is dropped on every rank, memory freed, and the step takes the next
  batch instead (counted: ``oom_batches``; ``loop.max_bad_steps`` in a row stop the run). Needs ZeRO-0/1/2
  (under ZeRO-3 the forward pass gathers parameters collectively, so an OOM inside it stops the run), and
  an OOM in the backward pass always stops the run (the other ranks are in gradient collectives).
* **a file gone at training time**: with ``data.skip_bad`` the row is skipped (logged, ``rows_skipped``),
  else every rank stops: the failing rank with the error naming the file, the others with
  :class:`RankError` quoting it. Errors while loading or in the forward pass are agreed on before the
  next collective, so no rank waits forever for a failed one.
* **a failed checkpoint write** (full disk): see :func:`speechlm.training.engine.save_checkpoint`.

Fault injection (tests, drills): ``SPEECHLM_FAULT``, see :func:`parse_faults`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from speechlm.atomic import atomic_path, atomic_write_text
from speechlm.data.batching import Batch, TextBatches, encode_batch, uses_text_batch
from speechlm.errors import (
    EXIT_PREEMPTED,
    BatchMemoryError,
    ConfigError,
    NonFiniteError,
    Preempted,
    RankError,
    SpeechLMError,
)
from speechlm.training.engine import (
    Engine,
    all_max,
    all_mean,
    all_sum,
    barrier,
    gather_objects,
    save_checkpoint,
)

log = logging.getLogger(__name__)

#: Metrics that are counts: summed over batches and ranks, never averaged.
COUNT_KEYS = ("tokens", "targets", "acc_correct", "acc_total")
#: Batches in a row whose every row failed to load (data.skip_bad) before the run stops: the data is gone.
MAX_EMPTY_BATCHES = 50


@dataclass
class LoopConfig:
    max_steps: int = 1000  # optimizer steps
    log_every: int = 10
    eval_every: int = 200  # 0 = validate only at the end
    save_every: int = 200  # 0 = checkpoint only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in <out_dir>/checkpoints
    progress: bool = True  # tqdm bar on rank 0
    crash_after: int = 0  # tests: the process dies right after this step (after any checkpoint), 0 = never
    # Stop the run after this many bad steps in a row: steps skipped for a non-finite loss or gradients, or
    # batches skipped for running out of memory (0 = never stop)
    max_bad_steps: int = 5
    # A batch that runs out of memory is skipped on every rank and the step takes the next batch (else the
    # run stops with an error naming the batch and the data.max_frames / data.max_tokens budget)
    skip_oom_batches: bool = False


# ------------------------------------------------------------------------------------ fault injection
FAULT_ENV = "SPEECHLM_FAULT"
FAULT_KINDS = ("nan_at_step", "nan_weights_at_step", "oom_at_step", "sigterm_at_step", "rm_at_step",
               "enospc_at_save")


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    rank: int | None = None  # None: every rank (rm_at_step: rank 0)
    path: str = ""

    def hits(self, kind: str, step: int, rank: int) -> bool:
        default = 0 if self.kind == "rm_at_step" else rank
        return (self.kind == kind and self.first <= step <= self.last
                and (self.rank if self.rank is not None else default) == rank)


def parse_faults(spec: str) -> list[Fault]:
    """Faults to inject, from ``SPEECHLM_FAULT``: comma-separated ``KIND:STEP[-LAST][@RANK][=PATH]``.

    Steps count from 1 (the step being trained); ``@RANK`` limits a fault to one rank (default: every rank).

    * ``nan_at_step:3``: the loss of step 3 is NaN (as if the batch or the weights overflowed);
    * ``nan_weights_at_step:3``: a trainable weight is set to NaN after step 3's update (the save must refuse);
    * ``oom_at_step:3@1``: rank 1's forward pass of step 3 raises ``torch.OutOfMemoryError``;
    * ``sigterm_at_step:3@1``: rank 1 sends itself SIGTERM in the middle of step 3 (after the forward pass);
    * ``rm_at_step:3=/data/a.wav``: rank 0 (or ``@RANK``) deletes that file as step 3 begins (all ranks wait);
    * ``enospc_at_save:4@1``: rank 1's writes of the checkpoint at step 4 fail with ENOSPC (a full disk).
    """
    faults = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\w+):(\d+)(?:-(\d+))?(?:@(\d+))?(?:=(.+))?", item)
        if not m or m.group(1) not in FAULT_KINDS:
            raise ConfigError(f"{FAULT_ENV}: cannot parse {item!r} (KIND:STEP[-LAST][@RANK][=PATH], "
                              f"KIND one of {', '.join(FAULT_KINDS)})")
        kind, first, last, rank, path = m.groups()
        if (kind == "rm_at_step") != bool(path):
            raise ConfigError(f"{FAULT_ENV}: {item!r}: rm_at_step and only it takes =PATH")
        faults.append(Fault(kind, int(first), int(last or first), None if rank is None else int(rank), path or ""))
    return faults


class _Faults:
    def __init__(self, spec: str, rank: int):
        self.items = parse_faults(spec)
        self.rank = rank
        self.fired: set[tuple[str, int]] = set()

    def at(self, kind: str, step: int) -> bool:
        """Whether ``kind`` strikes this rank at ``step``: once (a batch taken instead of a skipped one is spared)."""
        if (kind, step) in self.fired or not any(f.hits(kind, step, self.rank) for f in self.items):
            return False
        self.fired.add((kind, step))
        return True

    def start_of_step(self, step: int) -> None:
        """rm_at_step: the chosen rank deletes the file(s); every rank waits, so all read after the deletion."""
        deletes = [f for f in self.items if f.kind == "rm_at_step" and f.first <= step <= f.last]
        if not deletes:
            return
        for f in deletes:
            if f.hits("rm_at_step", step, self.rank):
                log.warning("%s: deleting %s at step %d", FAULT_ENV, f.path, step)
                Path(f.path).unlink(missing_ok=True)
        barrier()


# ------------------------------------------------------------------------------------------ preemption
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_stop: dict[str, Any] = {"signum": None, "pid": None}


def _on_stop_signal(signum: int, frame: Any) -> None:
    first = _stop["signum"] is None
    if first:
        _stop["signum"] = signum
    if first and os.getpid() == _stop["pid"]:  # not in DataLoader workers, which inherit the handler
        name = signal.Signals(signum).name
        os.write(2, f"[rank {os.environ.get('RANK', '0')}] {name}: finishing the current step, then a checkpoint "
                    f"and exit {EXIT_PREEMPTED}\n".encode())


def install_stop_handlers() -> None:
    """SIGTERM and SIGUSR1 ask the training loop to checkpoint at the end of the current step and stop.

    Idempotent. Call it before DataLoader workers start: they inherit the handler (and so ignore the signal
    instead of dying under the rank that still needs them to finish its step).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    _stop["pid"] = os.getpid()
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not _on_stop_signal:
            signal.signal(s, _on_stop_signal)


def stop_requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _stop["signum"]


# ---------------------------------------------------------------------------------- out of memory
_OOM_TEXT = ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(e: BaseException) -> bool:
    """torch.OutOfMemoryError, a Python MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in _OOM_TEXT)


def describe_batch(batch: Batch, limits: dict[str, int] | None = None) -> str:
    """Size and rows of a batch, for error messages: rows, padded frames and tokens, ids, the budget keys."""
    b = len(batch.utt_ids)
    parts = [f"{b} utterance(s)"]
    if batch.features is not None:
        t = int(batch.features.shape[2])
        parts.append(f"{b} x {t} = {b * t} padded encoder frames")
    elif batch.waves:
        longest = max(int(w.numel()) for w in batch.waves)
        parts.append(f"longest clip {longest} samples")
    n = int(batch.token_mask.shape[1]) if batch.token_mask.ndim == 2 else 0
    parts.append(f"{b} x {n} = {b * n} padded tokens ({batch.num_tokens} real)")
    ids = ", ".join(batch.utt_ids[:8]) + (f" and {b - 8} more" if b > 8 else "")
    text = f"{'; '.join(parts)}; ids: {ids}"
    if limits:
        text += "; its size is bounded by " + ", ".join(f"{k}={v}" for k, v in limits.items())
    return text


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _skipped_optimizer_step(engine: Engine) -> None:
    """``engine.ds.step()`` without the update, for a bare torch optimizer (ZeRO-0 in fp32) with non-finite
    gradients: its ``step`` does nothing and it reports an overflow, so DeepSpeed counts a skipped step, leaves
    the LR schedule where it is and clears the gradients, as its own optimizers do."""
    opt = engine.ds.optimizer
    opt.step = lambda *args, **kwargs: None  # the instance attribute hides the method for this one call
    opt.overflow = True
    try:
        engine.ds.step()
    finally:
        del opt.step, opt.overflow


def _raise_everywhere(err: BaseException | None, step: int, what: str) -> None:
    """Every rank raises: the failed one its own error, the others :class:`RankError` quoting it (``what``: the
    stage the failed rank was in)."""
    msgs = gather_objects(None if err is None else (what, f"{type(err).__name__}: {err}"))
    if err is not None:
        raise err
    rank, (stage, msg) = next((r, m) for r, m in enumerate(msgs) if m)
    raise RankError(f"rank {rank} stopped the run at step {step} ({stage}): {msg}")


# --------------------------------------------------------------------------------------- validation
@dataclass
class BatchPrep:
    """What happens to a loaded batch before the forward pass (same on every rank)."""

    device: torch.device
    dtype: torch.dtype | None = None  # features cast to the training precision (bf16)
    encoder: Any = None  # on-the-fly path: a SpeechEncoder (frozen), run on the training device
    text: TextBatches | None = None  # multitask: text-only LM batches
    text_ratio: float = 0.0  # fraction of steps that also get a text batch
    seed: int = 0
    # An adapted encoder runs inside the trained module (its parameters need gradients): leave the waves as they are
    encode_in_module: bool = False

    def __call__(self, batch: Batch, step: int | None = None) -> Batch:
        if batch.features is None and not self.encode_in_module:
            if self.encoder is None:
                raise ValueError("batch has no features and no encoder was given to compute them")
            batch = encode_batch(batch, self.encoder)
        batch = batch.to(self.device, self.dtype)
        if step is not None and self.text is not None and uses_text_batch(step, self.text_ratio, self.seed):
            ids, mask = self.text.batch(step)
            batch = replace(batch, text_ids=ids.to(self.device), text_mask=mask.to(self.device))
        return batch


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r if k not in COUNT_KEYS}
    return {k: sum(r[k] for r in rows if k in r) / max(1, sum(1 for r in rows if k in r)) for k in sorted(keys)}


@torch.no_grad()
def validate(engine: Engine, batches: Iterable[Batch], prep: BatchPrep) -> dict[str, float]:
    """Token-weighted validation metrics over every rank's share (filler batches not counted).

    Float metrics are weighted by the batch's ``tokens`` (stage 1) or ``targets`` (stage 2) count;
    ``acc_correct / acc_total`` becomes ``token_acc``. With several ranks, each batch's loading is agreed
    on first: an error on one rank is raised on all, and a batch left empty by ``data.skip_bad`` on one
    rank is skipped on all (their forward passes must pair up under ZeRO-3).
    """
    engine.ds.eval()
    multi = engine.info.world_size > 1
    sums: dict[str, float] = {}
    it = iter(batches)
    while True:
        batch, err, done = None, None, False
        try:
            raw = next(it)
            batch = None if raw.empty else prep(raw)
        except StopIteration:
            done = True
        except Exception as e:  # noqa: BLE001 -- every rank must hear of it
            err = e
        if multi:
            failed, empty, done_any = all_max([err is not None, batch is None and not done, done])
            if failed:
                _raise_everywhere(err, 0, "validation data")
            if done_any:
                break
            if empty:
                continue
        else:
            if err is not None:
                raise err
            if done:
                break
            if batch is None:
                continue
        _, m = engine.ds(batch)
        # Filler batches count zero but still add their keys: every rank must all-reduce the same keys.
        use = 1.0 if batch.counted else 0.0
        w = float(m.get("tokens", m.get("targets", 1))) * use
        for k, v in m.items():
            if k in COUNT_KEYS:
                sums[k] = sums.get(k, 0.0) + float(v) * use
            else:
                sums[k] = sums.get(k, 0.0) + float(v) * w
                sums["_w_" + k] = sums.get("_w_" + k, 0.0) + w
    keys = sorted(sums)
    total = all_sum({k: sums[k] for k in keys}) if keys else {}
    out = {k: total[k] / total["_w_" + k] for k in keys if not k.startswith("_w_") and k not in COUNT_KEYS
           and total.get("_w_" + k)}
    if total.get("acc_total"):
        out["token_acc"] = total["acc_correct"] / total["acc_total"]
    for k in ("tokens", "targets"):
        if k in total:
            out[k] = total[k]
    engine.ds.train()
    return out


class RunLog:
    """Train/valid history (kept in checkpoints so resumed curves are whole) + TensorBoard on rank 0."""

    def __init__(self, out_dir: Path, is_main: bool, history: dict | None = None):
        self.is_main = is_main
        self.history = history or {"train": [], "valid": []}
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def add(self, kind: str, step: int, values: dict[str, float]) -> None:
        self.history[kind].append({"step": step, **values})
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(history: dict, path: Path, title: str) -> None:
    """PNG of the training loss and every validation metric against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = ("step", "tokens", "targets", "leakage_targets", "time_s")
    valid_keys = sorted({k for r in history["valid"] for k in r if k not in skip})
    n = 1 + len(valid_keys)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    flat = list(axes.flat)
    tr = history["train"]
    flat[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=1)
    flat[0].set_title("train loss")
    for ax, k in zip(flat[1:], valid_keys):
        pts = [r for r in history["valid"] if k in r]
        ax.plot([r["step"] for r in pts], [r[k] for r in pts], marker="o")
        ax.set_title(f"valid {k}")
    for ax in flat[n:]:
        ax.axis("off")
    for ax in flat[:n]:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train_loop(engine: Engine, batches: Iterator[Batch], prep: BatchPrep, run_validation: Callable[[], dict],
               cfg: LoopConfig, out_dir: Path, identity: dict, export: Callable[[Path], None],
               start: dict | None = None, title: str = "training",
               frozen_check: Callable[[], str] | None = None,
               batch_limits: dict[str, int] | None = None) -> dict:
    """Train to ``cfg.max_steps``; returns the final metrics (also written to ``out_dir/metrics.json``).

    ``start`` is the trainer state of a resumed checkpoint (step, data position, history, fault counts).
    Each step runs ``grad_accum`` micro-batches; logged losses are averaged over micro-batches and ranks.
    ``frozen_check`` (a fingerprint of the frozen weights) runs before and after: the result says
    whether they stayed bit-identical. ``batch_limits`` (config key -> value, e.g. ``data.max_frames``)
    are quoted when a batch runs out of memory. Raises :class:`Preempted` after checkpointing when
    SIGTERM/SIGUSR1 arrived (see the module docstring for the other faults).
    """
    info = engine.info
    install_stop_handlers()
    faults = _Faults(os.environ.get(FAULT_ENV, ""), info.rank)
    if faults.items and info.is_main:
        log.warning("%s=%s: fault injection is on", FAULT_ENV, os.environ[FAULT_ENV])
    step = int(start["step"]) if start else 0
    runlog = RunLog(out_dir, info.is_main, start.get("history") if start else None)
    position = start.get("position", (0, 0)) if start else (0, 0)
    counts = {"nonfinite_steps": 0, "oom_batches": 0, "rows_skipped": 0, "loss_scale_skips": 0, "updates": 0}
    counts.update((start or {}).get("faults") or {})
    bad_run = int((start or {}).get("bad_run", 0))  # bad steps/batches in a row (reset by an applied update)
    bad_steps: list[int] = []  # the steps of the current run of bad ones
    skipped_rows: list[dict] = list((start or {}).get("skipped_rows") or [])  # this rank's, first 100
    step_times: list[float] = []
    wall_start = time.perf_counter()
    frozen_start = frozen_check() if frozen_check else None
    accum = engine.cfg.grad_accum
    # A bare torch optimizer (ZeRO-0 in fp32) has no overflow check of its own: the loop checks the gradients.
    own_grad_check = not hasattr(engine.ds.optimizer, "overflow")
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (info.is_main and cfg.progress), desc=title,
               dynamic_ncols=True)
    engine.ds.train()

    def valid_row() -> dict:
        t = time.perf_counter()
        row = run_validation()
        return {**row, "time_s": time.perf_counter() - t}

    def checkpoint(done: int) -> None:
        state = {"position": position, "history": runlog.history if info.is_main else None, "faults": dict(counts),
                 "bad_run": bad_run, "skipped_rows": skipped_rows}
        save_checkpoint(engine, out_dir / "checkpoints", done, identity, state, keep=cfg.keep_checkpoints,
                        fail_writes=faults.at("enospc_at_save", done))
        export(out_dir / "connector")

    def next_batch(now: int) -> tuple[Batch | None, BaseException | None, int]:
        """This rank's next batch with at least one row, prepared: (batch, error while loading, rows skipped)."""
        nonlocal position
        skipped, empties = 0, 0
        while True:
            try:
                raw = next(batches)
            except Exception as e:  # noqa: BLE001 -- agreed on with the other ranks before anything collective
                return None, e, skipped
            position = (raw.epoch, raw.index + 1)
            for utt_id, why in raw.skipped:
                skipped += 1
                if len(skipped_rows) < 100:
                    skipped_rows.append({"id": utt_id, "error": why, "rank": info.rank, "step": now})
            if not raw.empty:
                break
            empties += 1
            if empties >= MAX_EMPTY_BATCHES:
                last = raw.skipped[-1][1] if raw.skipped else "?"
                return None, SpeechLMError(f"rank {info.rank}: every row of {empties} batches in a row failed to "
                                           f"load (data.skip_bad): is the data gone? Last: {last}"), skipped
        try:
            return prep(raw, now - 1), None, skipped
        except Exception as e:  # noqa: BLE001 -- e.g. the on-the-fly encoder running out of memory
            return raw, e, skipped

    def on_oom(now: int, batch: Batch | None, mine: bool, where: str) -> None:
        """Every rank, once some rank ran out of memory (``mine``: this one): raise BatchMemoryError everywhere,
        or (loop.skip_oom_batches) drop the batch on every rank and count it."""
        nonlocal bad_run
        desc = None if not mine else (describe_batch(batch, batch_limits) if batch is not None else "(no batch)")
        texts = [f"rank {r}: {d}" for r, d in enumerate(gather_objects(desc)) if d]
        stage = "preparation of the batch" if where == "loading a batch" else where
        what = f"out of memory in the {stage} of step {now} on " + " | ".join(texts)
        _free_memory()
        if not cfg.skip_oom_batches:
            raise BatchMemoryError(f"{what}. Lower data.max_frames / data.max_tokens (or data.max_batch), or set "
                                   "loop.skip_oom_batches=true to skip such outlier batches")
        counts["oom_batches"] += 1
        bad_run += 1
        if cfg.max_bad_steps and bad_run >= cfg.max_bad_steps:
            raise BatchMemoryError(f"{bad_run} batches in a row without an update ran out of memory "
                                   f"(loop.max_bad_steps={cfg.max_bad_steps}); last: {what}. The batches are too "
                                   "big for this device: lower data.max_frames / data.max_tokens")
        if info.is_main:
            log.warning("%s: batch skipped on every rank (loop.skip_oom_batches); the step takes the next one", what)

    while step < cfg.max_steps:
        now = step + 1  # the step being trained
        t0 = time.perf_counter()
        lr = engine.lr
        micro: list[dict] = []
        ids_this_step: list[str] = []
        poisoned = own_skip = False
        rows_skipped = 0
        faults.start_of_step(now)
        k = 0
        while k < accum:
            batch, err, skipped = next_batch(now)
            rows_skipped += skipped
            where = "loading a batch"
            if engine.zero3:  # the forward pass gathers parameters collectively: agree on the loading first
                oom = err is not None and is_out_of_memory(err)
                failed, any_oom = all_max([err is not None and not oom, oom])
                if failed:
                    _raise_everywhere(None if oom else err, now, where)
                if any_oom:
                    err = None  # drop the exception (its traceback holds the batch's tensors)
                    on_oom(now, batch, oom, where)
                    batch = None
                    continue
            loss = metrics = None
            if err is None:
                where = "forward pass"
                injected_oom = faults.at("oom_at_step", now)
                try:
                    if injected_oom:  # before the forward pass: safe to agree on even under ZeRO-3
                        raise torch.OutOfMemoryError(f"out of memory (injected by {FAULT_ENV})")
                    loss, metrics = engine.ds(batch)
                    if faults.at("nan_at_step", now):
                        loss = loss * float("nan")
                        metrics = {**metrics, "loss": float("nan")}
                    if faults.at("sigterm_at_step", now):
                        os.kill(os.getpid(), signal.SIGTERM)
                except Exception as e:
                    if engine.zero3 and not injected_oom:
                        raise  # the other ranks may be inside the forward's parameter gathers: nothing to agree with
                    err = e
            # One small all-reduce per micro-batch, before the backward pass's collectives: did any rank fail to
            # load its batch or run its forward pass, run out of memory, or get a non-finite loss?
            oom = err is not None and is_out_of_memory(err)
            bad_loss = err is None and not bool(torch.isfinite(loss.detach()).all())
            failed, any_oom, any_bad_loss = all_max([err is not None and not oom, oom, bad_loss])
            if failed:
                _raise_everywhere(None if oom else err, now, where)
            if any_oom:
                loss = metrics = err = None  # free the graph and the exception's frames before anything else
                on_oom(now, batch, oom, where)
                batch = None
                continue
            ids_this_step += batch.utt_ids
            if any_bad_loss:
                poisoned = True
            if poisoned:  # NaN gradients on every rank: DeepSpeed's overflow check drops the whole step
                loss = loss * float("nan")
            try:
                engine.ds.backward(loss)
            except Exception as e:
                if is_out_of_memory(e):
                    raise BatchMemoryError(f"out of memory in the backward pass of step {now} on rank {info.rank}: "
                                           f"{describe_batch(batch, batch_limits)}. An OOM here cannot be skipped "
                                           "(the other ranks are in gradient collectives): lower data.max_frames / "
                                           "data.max_tokens") from None
                raise
            if k == accum - 1 and own_grad_check:
                grads_bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all())
                                for p in engine.module.parameters() if p.requires_grad)
                own_skip = bool(all_max([grads_bad])[0])
            if own_skip:
                _skipped_optimizer_step(engine)
            else:
                engine.ds.step()
            micro.append(metrics)
            k += 1
        step += 1
        step_times.append(time.perf_counter() - t0)
        applied = not own_skip and bool(engine.ds.was_step_applied())
        if poisoned and applied:
            raise NonFiniteError(f"step {step}: DeepSpeed applied an update from non-finite gradients (its overflow "
                                 "check is off in this DeepSpeed config: bf16.check_grad_overflow?); the weights are "
                                 "no longer finite and will not be saved")
        reason = None
        if applied:
            counts["updates"] += 1
            bad_run, bad_steps = 0, []
        elif poisoned:
            reason = "non-finite loss"
        elif engine.fp16 and not own_skip:
            counts["loss_scale_skips"] += 1  # dynamic loss scaling at work: normal, not a bad step
        else:
            reason = "non-finite gradients"
        # the metrics' all-reduce also carries the rows skipped and whether a stop was asked for (mean x ranks = sum)
        values = all_mean({**_mean(micro), "_rows_skipped": rows_skipped, "_stop": 1.0 if stop_requested() else 0.0})
        counts["rows_skipped"] += round(values.pop("_rows_skipped") * info.world_size)
        stop_asked = values.pop("_stop") > 0
        values["lr"] = lr
        if reason is not None:
            counts["nonfinite_steps"] += 1
            bad_run += 1
            bad_steps.append(step)
            where = "; ".join(f"rank {r}: {', '.join(ids[:8])}" for r, ids in enumerate(gather_objects(ids_this_step)))
            if info.is_main:
                log.warning("step %d skipped on every rank (no optimizer update): %s; batches %s", step, reason, where)
            if cfg.max_bad_steps and bad_run >= cfg.max_bad_steps:
                bar.close()
                raise NonFiniteError(f"{bad_run} steps in a row without an update (loop.max_bad_steps="
                                     f"{cfg.max_bad_steps}): steps {', '.join(map(str, bad_steps))} had a {reason}; "
                                     f"the last, step {step}, trained on {where}. No checkpoint holds non-finite "
                                     "weights: check those rows, lower engine.lr, or raise loop.max_bad_steps")
        if any(counts[k] for k in ("nonfinite_steps", "oom_batches", "rows_skipped")):
            values.update(nonfinite_steps=counts["nonfinite_steps"], oom_batches=counts["oom_batches"],
                          rows_skipped=counts["rows_skipped"], skipped=0.0 if applied else 1.0)
        if engine.fp16:
            values.update(loss_scale=engine.loss_scale or 0.0, ds_skipped_steps=engine.skipped_steps)
        runlog.add("train", step, values)
        bar.update(1)
        if faults.at("nan_weights_at_step", step):
            p = next(p for p in engine.module.parameters() if p.requires_grad)
            with torch.no_grad():
                (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).fill_(float("nan"))
        if step % max(1, cfg.log_every) == 0 or step == cfg.max_steps or reason is not None:
            post = {"loss": f"{values['loss']:.4f}", "lr": f"{lr:.2e}"}
            bad = counts["nonfinite_steps"] + counts["oom_batches"]
            if bad or counts["rows_skipped"]:
                post["skipped"] = f"{bad}+{counts['rows_skipped']}rows"
            bar.set_postfix(post)
            if not cfg.progress and info.is_main:
                log.info("step %d loss %.4f lr %.3g%s", step, values["loss"], lr,
                         f" (skipped: {counts['nonfinite_steps']} non-finite steps, {counts['oom_batches']} OOM "
                         f"batches, {counts['rows_skipped']} rows)" if bad or counts["rows_skipped"] else "")
        busy = False
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            runlog.add("valid", step, valid_row())
            busy = True
        saved = False
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
            if step == cfg.max_steps:
                runlog.add("valid", step, valid_row())
            checkpoint(step)
            busy = saved = True
        if cfg.crash_after and step == cfg.crash_after:
            bar.close()
            os._exit(17)  # simulates a crash: no cleanup, no final files
        stop = stop_asked or (busy and all_max([1.0 if stop_requested() else 0.0])[0] > 0)
        if stop and step < cfg.max_steps:
            if not saved:
                checkpoint(step)
            bar.close()
            runlog.close()
            names = ", ".join(sorted({signal.Signals(s).name for s in gather_objects(stop_requested()) if s}))
            raise Preempted(f"stopped by {names} after step {step} of {cfg.max_steps}: checkpoint "
                            f"{out_dir / 'checkpoints'}/step-{step:08d} saved; run the same command again to resume "
                            f"(exit status {EXIT_PREEMPTED})", step, names)
    bar.close()
    if not runlog.history["valid"] or runlog.history["valid"][-1]["step"] != step:
        runlog.add("valid", step, valid_row())  # a resumed run that had already finished
    final = runlog.history["valid"][-1]
    times = sorted(step_times)
    all_rows = [r for rows in gather_objects(skipped_rows) for r in rows]
    result = {
        "steps": step,
        "world_size": info.world_size,
        "final_valid": {k: v for k, v in final.items() if k != "step"},
        "final_train_loss": runlog.history["train"][-1]["loss"] if runlog.history["train"] else None,
        "step_time_s_median": times[len(times) // 2] if times else None,
        "step_time_s_mean": sum(times) / len(times) if times else None,
        "loop_wall_s": time.perf_counter() - wall_start,  # this process: steps + validation + checkpoints
        "train_losses": [r["loss"] for r in runlog.history["train"]],
        # faults survived (all runs of this out_dir): steps without an update for a non-finite loss/gradients,
        # batches skipped for running out of memory, rows skipped as unreadable (data.skip_bad)
        "nonfinite_steps": counts["nonfinite_steps"],
        "oom_batches": counts["oom_batches"],
        "rows_skipped": counts["rows_skipped"],
        "skipped_rows": all_rows,
        "optimizer_updates": counts["updates"],
        "ds_skipped_steps": engine.skipped_steps,
    }
    if engine.fp16:
        result.update(loss_scale=engine.loss_scale, loss_scale_skips=counts["loss_scale_skips"])
    if frozen_check is not None:
        frozen_end = frozen_check()
        result.update(frozen_sha256_start=frozen_start, frozen_sha256_end=frozen_end,
                      frozen_unchanged=frozen_start == frozen_end)
    if info.is_main:
        plot_curves(runlog.history, out_dir / "curves.png", title)
        atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1))
        atomic_write_text(out_dir / "history.json", json.dumps(runlog.history))
    runlog.close()
    return result
