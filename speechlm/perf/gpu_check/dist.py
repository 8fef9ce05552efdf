"""The GPU check's one-rank process group: the library's start-up, with an optional forced backend."""

from __future__ import annotations

import os

from speechlm.perf.gpu_check.context import Ctx


def no_cpu_shm_jit(ctx: Ctx) -> None:
    """CPU only: DeepSpeed's communication backend JIT-compiles its shared-memory all-reduce (C++, for several
    ranks on one host) in every process, after probing every op with the compiler. A one-rank group never
    uses it: mark it incompatible up front (no probe, no build). Nothing changes on a GPU."""
    if ctx.gpu:
        return
    import deepspeed.ops

    ops = vars(deepspeed.ops)
    if "__compatible_ops__" in ops:
        ops["__compatible_ops__"]["deepspeed_shm_comm"] = False
    else:
        ops["__compatible_ops__"] = {"deepspeed_shm_comm": False}  # comm/torch.py reads it with .get(name, False)


def init_dist(ctx: Ctx):
    """One-rank process group without the launcher, through the library's ``init_distributed``. With
    ``--dist-backend nccl|gloo`` the group is made first with that backend (the library takes the
    accelerator's choice), and ``init_distributed`` then joins it."""
    from speechlm.training.distributed import _free_port, init_distributed

    no_cpu_shm_jit(ctx)
    if ctx.args.dist_backend != "auto":
        import torch.distributed as dist

        if not dist.is_initialized():
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
            dist.init_process_group(ctx.args.dist_backend, rank=0, world_size=1)
    return init_distributed()
