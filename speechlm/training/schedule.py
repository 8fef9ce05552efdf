"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (a fraction of the peak); the rule itself
is :func:`speechlm.schedule.lr_factor` (re-exported here)."""

from __future__ import annotations

import torch

from speechlm.schedule import lr_factor


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, floor: float = 0.2
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying :func:`lr_factor`; its state (last_epoch) is saved with checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, floor))


__all__ = ["lr_factor", "warmup_cosine"]
