"""The main of an evaluation recipe (recipes/eval_asr.py, eval_speech_mmlu.py, eval_storycloze.py): its command
line, its config loaded and checked, logging on, the run."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from speechlm.config import load_config


def run_recipe(config_cls: type, run: Callable[[Any], dict], argv: list[str] | None, doc: str) -> dict:
    """``--config`` (optional YAML) and ``key=value`` overrides into ``config_cls``, then ``run(config)``;
    ``doc``: the recipe's docstring, whose first line describes it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(config_cls, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("ctc_segmentation").setLevel(logging.WARNING)  # one INFO line per utterance otherwise
    return run(cfg)
