"""Fault drills for the training loop: the faults of a shared cluster, injected through its hooks.

``SPEECHLM_FAULT`` (see :func:`parse_faults`) and ``loop.crash_after`` are the two ways to ask for them; both
are off by default, and then :func:`drill_hooks` installs nothing. docs/PERFORMANCE.md ("Reliability: faults
tried") lists what each fault shows.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speechlm.errors import ConfigError
from speechlm.training.distributed import barrier
from speechlm.training.hooks import TrainHooks

log = logging.getLogger(__name__)

FAULT_ENV = "SPEECHLM_FAULT"
FAULT_KINDS = ("nan_at_step", "nan_weights_at_step", "oom_at_step", "sigterm_at_step", "rm_at_step",
               "enospc_at_save")
#: Exit status of a process that ``loop.crash_after`` kills.
CRASH_EXIT = 17


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


@contextlib.contextmanager
def failing_writes() -> Iterator[None]:
    """Within the block every ``torch.save`` of this process (DeepSpeed's included) fails with ENOSPC."""
    real = torch.save

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENV})", str(f))

    torch.save = full_disk
    try:
        yield
    finally:
        torch.save = real


class FaultInjector(TrainHooks):
    """The faults of a ``SPEECHLM_FAULT`` spec, struck on this rank at their steps."""

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

    def before_forward(self, step: int) -> None:
        if self.at("oom_at_step", step):
            raise torch.OutOfMemoryError(f"out of memory (injected by {FAULT_ENV})")

    def after_forward(self, step: int, loss: Any, metrics: dict) -> tuple[Any, dict]:
        if self.at("nan_at_step", step):
            loss = loss * float("nan")
            metrics = {**metrics, "loss": float("nan")}
        if self.at("sigterm_at_step", step):
            os.kill(os.getpid(), signal.SIGTERM)
        return loss, metrics

    def after_step(self, step: int, engine: Any) -> None:
        if self.at("nan_weights_at_step", step):
            p = next(p for p in engine.module.parameters() if p.requires_grad)
            with torch.no_grad():
                (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).fill_(float("nan"))

    def saving(self, step: int) -> contextlib.AbstractContextManager:
        return failing_writes() if self.at("enospc_at_save", step) else contextlib.nullcontext()


class CrashAfter(TrainHooks):
    """``loop.crash_after``: the process dies right after that step (after any checkpoint): no cleanup, no final
    files, as a killed machine leaves them."""

    def __init__(self, step: int):
        self.step = step

    def end_of_step(self, step: int) -> None:
        if step == self.step:
            sys.stderr.flush()
            os._exit(CRASH_EXIT)


def drill_hooks(crash_after: int = 0, rank: int = 0, is_main: bool = True,
                spec: str | None = None) -> list[TrainHooks]:
    """The fault drills asked for: ``spec`` (default: the ``SPEECHLM_FAULT`` environment variable) and
    ``crash_after`` (``loop.crash_after``). Empty (nothing installed) when neither asks for one."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    hooks: list[TrainHooks] = []
    injector = FaultInjector(spec, rank)
    if injector.items:
        if is_main:
            log.warning("%s=%s: fault injection is on", FAULT_ENV, spec)
        hooks.append(injector)
    if crash_after:
        hooks.append(CrashAfter(crash_after))
    return hooks
