"""The main of a training stage recipe (recipes/stage1_distill.py, stage_mid_supervised.py, stage2_finetune.py):
its command line, the stop handlers, its config loaded and checked, the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from speechlm.config import load_config
from speechlm.training.preemption import install_stop_handlers
from speechlm.training.stage_runs import stage_arguments


def stage_main(config_cls: type, run: Callable[..., dict], argv: list[str] | None, doc: str, **run_kwargs: Any) -> dict:
    """``--config`` and ``key=value`` overrides into ``config_cls`` (``stage_arguments``), then
    ``run(config, **run_kwargs)``; ``doc``: the recipe's docstring, whose first line describes it."""
    args = stage_arguments(argv, doc)
    install_stop_handlers()  # SIGTERM/SIGUSR1: checkpoint at the end of the step, exit 75 (before any worker forks)
    return run(load_config(config_cls, args.config, args.overrides), **run_kwargs)
