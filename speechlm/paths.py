"""Where the project keeps what it must never commit: converted models, generated audio, caches."""

from __future__ import annotations

import os
from pathlib import Path

#: Folder names of the embedded default models inside :func:`models_dir`.
WHISPER_BASE = "whisper-base"
SMOLLM2_135M = "smollm2-135m"


def cache_dir() -> Path:
    """Root of all generated artefacts; ``SPEECHLM_CACHE`` overrides ``~/.cache/speechlm``."""
    return Path(os.environ.get("SPEECHLM_CACHE", Path.home() / ".cache" / "speechlm")).expanduser()


def models_dir() -> Path:
    """Converted offline models; ``SPEECHLM_MODELS`` overrides ``<cache_dir>/models``."""
    env = os.environ.get("SPEECHLM_MODELS")
    return Path(env).expanduser() if env else cache_dir() / "models"


def default_model(name: str) -> Path:
    """Path of one embedded default model folder (``whisper-base`` or ``smollm2-135m``)."""
    return models_dir() / name
