"""Inside one rank of the ZeRO benchmark's launcher run: the ``speechlm`` logger on (its step lines open and close
the measuring window), then stage 2 exactly as recipes/stage2_finetune.py runs it (same arguments, same library
calls), without loading the recipe file."""

from __future__ import annotations

import sys


def rank_main(argv: list[str]) -> None:
    """Stage 2's command line (``--config ... key=value ...``) with the ``speechlm`` logger on stderr."""
    import logging

    from speechlm.training.configs import Stage2Config
    from speechlm.training.distributed import run_main
    from speechlm.training.recipe_main import stage_main
    from speechlm.training.stage_runs import run_stage2

    lg = logging.getLogger("speechlm")
    lg.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    lg.addHandler(handler)
    run_main(lambda: stage_main(Stage2Config, run_stage2, argv, "Stage 2 inside a ZeRO benchmark rank."))


if __name__ == "__main__":  # deepspeed --module speechlm.perf.zero.rank --config ... key=value ...
    rank_main(sys.argv[1:])
