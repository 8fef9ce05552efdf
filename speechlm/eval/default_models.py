"""Preparing the offline default models (Whisper base, SmolLM2-135M) for use (tools/prepare_models.py): convert
each into a plain HF folder and check that it behaves (thresholds below)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from speechlm import paths
from speechlm.errors import SpeechLMError
from speechlm.eval.model_checks import check_smollm2, check_whisper, scramble_words
from speechlm.models.convert import prepare_model

LM_TEXT = "The children walked to school together on a sunny morning in early spring."
#: Plain perplexity must be at most this fraction of the scrambled one, and below MAX_LM_PPL.
MAX_PPL_RATIO = 0.1
MAX_LM_PPL = 200.0
ASR_TEXT = "Please remember to turn off the lights when you leave the office."
MAX_WER = 0.2

Log = Callable[[str], None]


def _report(folder: Path, log: Log, t0: float, lines: list[str], verdict: str, failure: str | None) -> None:
    """Log a check's ``lines``, then its ``verdict`` with the seconds since ``t0``; SpeechLMError naming ``folder``
    with ``failure`` when it failed."""
    for line in lines:
        log(f"  {line}")
    log(f"  {verdict}; {time.perf_counter() - t0:.1f} s")
    if failure is not None:
        raise SpeechLMError(f"{folder}: {failure}")


def verify_lm(folder: Path, log: Log = print) -> None:
    """The LM's perplexity on a plain sentence is far below that of the same words scrambled (else SpeechLMError)."""
    t0 = time.perf_counter()
    plain, scrambled = check_smollm2(folder, LM_TEXT)
    ok = plain < MAX_LM_PPL and plain < MAX_PPL_RATIO * scrambled
    _report(folder, log, t0, [f"plain     ppl {plain:9.1f}  {LM_TEXT!r}",
                              f"scrambled ppl {scrambled:9.1f}  {scramble_words(LM_TEXT)!r}"],
            f"ratio {plain / scrambled:.4f} (limit {MAX_PPL_RATIO})",
            None if ok else f"LM check failed: perplexity {plain:.1f} plain vs {scrambled:.1f} scrambled")


def verify_whisper(folder: Path, log: Log = print) -> None:
    """Whisper transcribes a synthesized sentence with a low word error rate (else SpeechLMError)."""
    t0 = time.perf_counter()
    transcript, wer = check_whisper(folder, ASR_TEXT)
    _report(folder, log, t0, [f"reference  {ASR_TEXT!r}", f"transcript {transcript!r}"],
            f"WER {wer:.3f} (limit {MAX_WER})",
            f"Whisper check failed: WER {wer:.3f} > {MAX_WER} ({transcript!r})" if wer > MAX_WER else None)


def prepare_default_models(out: str | Path | None = None, force: bool = False, verify: bool = True,
                           log: Log = print) -> dict[str, Path]:
    """Convert (or keep, when complete) each default model under ``out`` (default ``paths.models_dir()``) and
    check it; returns ``{name: folder}``. A failed conversion or check raises SpeechLMError."""
    out = Path(out) if out is not None else paths.models_dir()
    checks = {paths.WHISPER_BASE: verify_whisper, paths.SMOLLM2_135M: verify_lm}
    folders: dict[str, Path] = {}
    for name, check in checks.items():
        t0 = time.perf_counter()
        folder, converted = prepare_model(name, out, force=force)
        what = "converted" if converted else "already complete, kept"
        log(f"{name}: {what} -> {folder} ({time.perf_counter() - t0:.1f} s)")
        if verify:
            check(folder, log)
        folders[name] = folder
    return folders
