"""Inside one rank of the ZeRO benchmark's launcher run: the ``speechlm`` logger on (its step lines open and close
the measuring window), then the training recipe named by ``--rank-of``, unchanged, as ``__main__``."""

from __future__ import annotations

import sys


def rank_main(argv: list[str]) -> None:
    """Inside a rank (``--rank-of RECIPE``): the ``speechlm`` logger on stderr, then the recipe as __main__."""
    import logging
    import runpy

    i = argv.index("--rank-of")
    recipe = argv[i + 1]
    rest = argv[:i] + argv[i + 2:]
    lg = logging.getLogger("speechlm")
    lg.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    lg.addHandler(handler)
    sys.argv = [recipe, *rest]
    runpy.run_path(recipe, run_name="__main__")


if __name__ == "__main__":  # deepspeed --module speechlm.perf.zero_rank --rank-of RECIPE ...
    rank_main(sys.argv[1:])
