"""A failed batch or step, recognised and reported: out of memory, a batch described for the error message, and
one rank's error raised on every rank (so none waits forever in a collective for a failed one)."""

from __future__ import annotations

import gc

import torch

from speechlm.data.batching import Batch
from speechlm.errors import RankError
from speechlm.training.distributed import gather_objects

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


def free_memory() -> None:
    """Give back what a batch that ran out of memory held (its graph is already dropped by the caller)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def raise_everywhere(err: BaseException | None, step: int, what: str) -> None:
    """Every rank raises: the failed one its own error, the others :class:`RankError` quoting it (``what``: the
    stage the failed rank was in)."""
    msgs = gather_objects(None if err is None else (what, f"{type(err).__name__}: {err}"))
    if err is not None:
        raise err
    rank, (stage, msg) = next((r, m) for r, m in enumerate(msgs) if m)
    raise RankError(f"rank {rank} stopped the run at step {step} ({stage}): {msg}")
