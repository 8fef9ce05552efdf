"""Convert the offline default models (Whisper base, SmolLM2-135M) into plain HF folders and check them.

    python tools/prepare_models.py [--out DIR] [--force] [--skip-verify] [--threads N]

DIR defaults to speechlm.paths.models_dir() (``SPEECHLM_MODELS`` overrides). A folder that is already
complete is kept. Verification: the LM's perplexity on a plain sentence must be far below that of the
same words scrambled; Whisper must transcribe a synthesized sentence with a low word error rate
(speechlm/eval/default_models.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from speechlm import paths
from speechlm.errors import SpeechLMError
from speechlm.eval.default_models import prepare_default_models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help=f"models folder (default {paths.models_dir()})")
    ap.add_argument("--force", action="store_true", help="convert again even if a complete folder exists")
    ap.add_argument("--skip-verify", action="store_true", help="do not load and check the converted models")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        prepare_default_models(args.out, force=args.force, verify=not args.skip_verify)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("all models ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
