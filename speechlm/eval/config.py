"""The evaluation recipes' shared configuration: one base dataclass each task's config extends, checked on load.

The YAML keys and ``key=value`` overrides are the fields' names (``recipes/run_cpu.sh`` passes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechlm.errors import ConfigError
from speechlm.eval.scoring import BOUNDARY_MODES
from speechlm.models.encoder import DTYPES

#: LLM precisions an evaluation accepts (``auto``: bf16 on a CUDA device that has it, else fp32).
EVAL_DTYPES = ("auto", *DTYPES)


@dataclass
class EvalConfig:
    """Fields every evaluation recipe (StoryCloze, Speech-MMLU, ASR) has."""

    llm: str = ""  # LLM folder ("" = embedded SmolLM2-135M)
    connectors: list[str] = field(default_factory=list)  # saved connector folders; empty = no speech condition
    aligner: str = ""  # aligner folder (needed for SSR)
    encoder: str = ""  # encoder folder ("" = the one each connector names, in the models cache)
    boundaries: str = "free"  # "free" (honest test-time) | "forced" (reference transcript aligned)
    limit: int = 0  # first N items only (0 = all)
    whisper: str = ""  # Whisper folder for the cascade / baseline ("" = embedded whisper-base)
    # Whisper's transcripts kept by clip and model ("" = <cache>/transcripts; "none" = transcribe every time)
    transcripts: str = ""
    batch_size: int = 8
    threads: int = 0  # torch threads (0 = leave as is)
    device: str = "cpu"
    dtype: str = "auto"  # LLM precision: auto (bf16 on a CUDA device that has it, else fp32), fp32, bf16, fp16
    out_dir: str = "runs/eval"
    name: str = "eval"  # report file stem and summary key
    summary: str = ""  # JSON file to merge this run's headline figures into (under ``name``)

    def __post_init__(self) -> None:
        # Refused here, when the config loads, not after the LLM and encoder are read.
        if self.boundaries not in BOUNDARY_MODES:
            raise ConfigError(f"boundaries must be one of {', '.join(BOUNDARY_MODES)}, got {self.boundaries!r}")
        if self.dtype not in EVAL_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(EVAL_DTYPES)}, got {self.dtype!r}")
        if self.limit < 0 or self.batch_size < 1:
            raise ConfigError(f"need limit >= 0 and batch_size >= 1, got limit={self.limit}, "
                              f"batch_size={self.batch_size}")


@dataclass
class SpokenEvalConfig(EvalConfig):
    """A task whose items are spoken with TTS at run time (or read from a spoken set): StoryCloze, Speech-MMLU."""

    text_only: bool = False  # the LLM alone on the texts
    data: str = ""  # the task's text data ("" = the embedded mini set)
    voices: list[str] = field(default_factory=list)  # TTS voices ("engine:name"), or [natural] / [hard] ([] = natural)
    rate_wpm: int = 175
    cascade: bool = False  # Whisper transcribes the spoken items, the LLM reads the transcripts


def prepare_run(cfg: EvalConfig) -> None:
    """What every evaluation does before loading a model: torch threads."""
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)


def load_eval_llm(cfg: EvalConfig) -> tuple[Any, Any]:
    """(LLM on ``cfg.device`` in ``cfg.dtype``, tokenizer)."""
    from speechlm.training.build import eval_dtype, load_llm

    llm, tok = load_llm(cfg.llm, eval_dtype(cfg.dtype, cfg.device))
    llm.to(cfg.device)
    return llm, tok


def load_whisper(cfg: EvalConfig) -> Any:
    """The Whisper of the cascade / baseline: ``cfg.whisper`` or the embedded whisper-base, on ``cfg.device``."""
    from speechlm.eval import asr
    from speechlm.paths import WHISPER_BASE, default_model

    # looked up on the module at call time, so a test can put a stand-in there
    return asr.WhisperCascade(cfg.whisper or default_model(WHISPER_BASE), cfg.device, transcripts=transcripts_dir(cfg))


def transcripts_dir(cfg: EvalConfig) -> Path | None:
    """Where the cascade's transcripts are kept (None: nowhere)."""
    from speechlm.paths import cache_dir

    if cfg.transcripts == "none":
        return None
    return Path(cfg.transcripts).expanduser() if cfg.transcripts else cache_dir() / "transcripts"


def config_path(cfg: EvalConfig) -> Path:
    """Where a run records the config it ran with: ``<out_dir>/<name>.config.yaml``."""
    return Path(cfg.out_dir) / f"{cfg.name}.config.yaml"
