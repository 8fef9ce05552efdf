"""Convert the offline default models (Whisper base, SmolLM2-135M) into plain HF folders and check them.

    python tools/prepare_models.py [--out DIR] [--force] [--skip-verify] [--threads N]

DIR defaults to speechlm.paths.models_dir() (``SPEECHLM_MODELS`` overrides). A folder that is already
complete is kept. Verification: the LM's perplexity on a plain sentence must be far below that of the
same words scrambled; Whisper must transcribe a synthesized sentence with a low word error rate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from speechlm import paths
from speechlm.errors import SpeechLMError
from speechlm.models.convert import check_smollm2, check_whisper, prepare_model, scramble_words

LM_TEXT = "The children walked to school together on a sunny morning in early spring."
#: Plain perplexity must be at most this fraction of the scrambled one, and below MAX_LM_PPL.
MAX_PPL_RATIO = 0.1
MAX_LM_PPL = 200.0
ASR_TEXT = "Please remember to turn off the lights when you leave the office."
MAX_WER = 0.2


def verify_lm(folder: Path) -> None:
    t0 = time.perf_counter()
    plain, scrambled = check_smollm2(folder, LM_TEXT)
    print(f"  plain     ppl {plain:9.1f}  {LM_TEXT!r}")
    print(f"  scrambled ppl {scrambled:9.1f}  {scramble_words(LM_TEXT)!r}")
    print(f"  ratio {plain / scrambled:.4f} (limit {MAX_PPL_RATIO}); {time.perf_counter() - t0:.1f} s")
    if not (plain < MAX_LM_PPL and plain < MAX_PPL_RATIO * scrambled):
        raise SpeechLMError(f"{folder}: LM check failed: perplexity {plain:.1f} plain vs {scrambled:.1f} scrambled")


def verify_whisper(folder: Path) -> None:
    t0 = time.perf_counter()
    transcript, wer = check_whisper(folder, ASR_TEXT)
    print(f"  reference  {ASR_TEXT!r}")
    print(f"  transcript {transcript!r}")
    print(f"  WER {wer:.3f} (limit {MAX_WER}); {time.perf_counter() - t0:.1f} s")
    if wer > MAX_WER:
        raise SpeechLMError(f"{folder}: Whisper check failed: WER {wer:.3f} > {MAX_WER} ({transcript!r})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help=f"models folder (default {paths.models_dir()})")
    ap.add_argument("--force", action="store_true", help="convert again even if a complete folder exists")
    ap.add_argument("--skip-verify", action="store_true", help="do not load and check the converted models")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else paths.models_dir()
    checks = {paths.WHISPER_BASE: verify_whisper, paths.SMOLLM2_135M: verify_lm}
    try:
        for name, verify in checks.items():
            t0 = time.perf_counter()
            folder, converted = prepare_model(name, out, force=args.force)
            what = "converted" if converted else "already complete, kept"
            print(f"{name}: {what} -> {folder} ({time.perf_counter() - t0:.1f} s)")
            if not args.skip_verify:
                verify(folder)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("all models ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
