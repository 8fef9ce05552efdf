"""Named points of the training loop where something outside it may step in (fault drills, tests).

The loop calls every installed :class:`TrainHooks` at each point, in order; the base class does nothing at
any of them, and a production run installs none (see :func:`speechlm.training.loop.train_loop`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any


class TrainHooks:
    """One hook per point of a training step; override the ones you need. ``step`` counts from 1 (the step
    being trained)."""

    def start_of_step(self, step: int) -> None:
        """Before the step loads its first batch (every rank calls it; a hook may meet the others at a barrier)."""

    def before_forward(self, step: int) -> None:
        """Before each micro-batch's forward pass. An exception raised here is treated as the forward pass's
        own error, agreed on by the ranks (even under ZeRO-3: no collective has started)."""

    def after_forward(self, step: int, loss: Any, metrics: dict) -> tuple[Any, dict]:
        """After each forward pass that worked; returns the (possibly changed) loss and metrics."""
        return loss, metrics

    def after_step(self, step: int, engine: Any) -> None:
        """After the optimizer step is taken and logged, before validation and checkpoint."""

    def saving(self, step: int) -> contextlib.AbstractContextManager:
        """The context the checkpoint of ``step`` is written in."""
        return contextlib.nullcontext()

    def end_of_step(self, step: int) -> None:
        """Last thing of a step: after its validation and checkpoint, before the stop check."""


class HookList(TrainHooks):
    """Several hooks called in order (``after_forward`` passes each one's loss and metrics to the next)."""

    def __init__(self, hooks: Iterable[TrainHooks] = ()):
        self.hooks = list(hooks)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def start_of_step(self, step: int) -> None:
        for h in self.hooks:
            h.start_of_step(step)

    def before_forward(self, step: int) -> None:
        for h in self.hooks:
            h.before_forward(step)

    def after_forward(self, step: int, loss: Any, metrics: dict) -> tuple[Any, dict]:
        for h in self.hooks:
            loss, metrics = h.after_forward(step, loss, metrics)
        return loss, metrics

    def after_step(self, step: int, engine: Any) -> None:
        for h in self.hooks:
            h.after_step(step, engine)

    @contextlib.contextmanager
    def saving(self, step: int) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for h in self.hooks:
                stack.enter_context(h.saving(step))
            yield

    def end_of_step(self, step: int) -> None:
        for h in self.hooks:
            h.end_of_step(step)
