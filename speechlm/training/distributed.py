"""Processes and ranks: the process group (launcher or a 1-rank one of our own), threads, seeds and RNG state,
and the small collectives every rank meets in (means, sums, maxima, gathered objects, agreed failures).

The same code runs under the ``deepspeed`` launcher (any number of ranks) and as a plain ``python``
process, where :func:`init_distributed` makes a 1-rank process group itself.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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
    was_distributed = dist.is_initialized()
    shutdown_distributed()
    if was_distributed:
        # Even after an orderly teardown, a rank still aborted now and then while the interpreter exited (a C++
        # thread of the process group destroyed while joinable: "terminate called without an active exception"),
        # and the launcher failed the finished run. Everything is written and closed by now: flush and leave
        # without the interpreter's teardown.
        _exit_now(0)


def _exit_now(code: int) -> None:
    """Flush the logs and standard streams, then end the process at once (no atexit handlers, no destructors)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to save
            pass
    os._exit(code)


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


def agree_failures(rank: int, err: BaseException | None) -> list[str] | None:
    """One all-reduce: did any rank fail? If so, every rank gets the failures as ["rank r: Type: message", ...]
    (None when no rank failed). Every rank calls it, ``err`` being its own error or None."""
    if not all_max([1.0 if err is not None else 0.0])[0]:
        return None
    mine = None if err is None else f"rank {rank}: {type(err).__name__}: {err}"
    return [m for m in gather_objects(mine) if m]
