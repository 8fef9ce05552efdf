"""The learning-rate rule: linear warm-up, then cosine decay to a floor (a fraction of the peak).

A pure function (no torch) on the lowest floor, so the trainer (``speechlm.training.schedule.warmup_cosine``) and
the aligner trainer (``alignment.training``) apply the same rule."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.2) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Warm-up reaches 1.0 at step ``warmup_steps - 1``; cosine decay then ends at ``floor`` at
    ``total_steps`` and stays there.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
