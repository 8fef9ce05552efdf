"""Exports of what training made (the connector, a LoRA adapter, an encoder adaptation) as plain model folders:
written on rank 0 with ZeRO-3 partitions gathered first, refused when not finite, a failed write raised on every
rank."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from torch import nn

from speechlm.errors import CheckpointWriteError
from speechlm.training.checkpoint import space_text
from speechlm.training.deepspeed_engine import Engine, check_finite_weights, gathered
from speechlm.training.distributed import agree_failures


def _write_on_main(engine: Engine, folder: str | Path, what: str, write: Callable[[], None],
                   params: list[nn.Parameter] | None = None) -> None:
    """``write()`` on rank 0 (all ranks call it), inside ``gathered(params)`` when ``params`` is given; a failed
    write is raised on every rank as :class:`CheckpointWriteError` naming ``folder``, ``what`` and the free space."""
    err = None
    with gathered(params, engine) if params is not None else contextlib.nullcontext():
        if engine.info.is_main:
            try:
                write()
            except Exception as e:  # noqa: BLE001 -- any failed write must reach the other ranks
                err = e
    failures = agree_failures(engine.info.rank, err)
    if failures:
        raise CheckpointWriteError(f"{folder}: {what} failed ({'; '.join(failures)}); "
                                   f"{space_text(Path(folder).parent)}") from err


def export_module(engine: Engine, module: nn.Module, folder: str | Path) -> None:
    """``module.save_pretrained(folder)`` on rank 0, gathering ZeRO-3 partitions first (all ranks call it).

    Non-finite weights are refused on every rank; a failed write on rank 0 is raised on every rank."""
    check_finite_weights(engine, f"the export {folder}", module, trainable_only=False)

    def write() -> None:
        out = module
        if engine.bf16 or engine.fp16:  # the export is fp32, whatever the training precision
            import copy

            out = copy.deepcopy(module).float()
        out.save_pretrained(folder)

    _write_on_main(engine, folder, "export", write, list(module.parameters()))


def export_lora(engine: Engine, peft_model: nn.Module, folder: str | Path) -> None:
    """Save the LoRA adapter of a PEFT-wrapped LLM (only its trainable matrices) atomically on rank 0."""
    from speechlm.atomic import atomic_path

    check_finite_weights(engine, f"the LoRA export {folder}", peft_model)

    def write() -> None:
        with atomic_path(folder) as tmp:
            peft_model.save_pretrained(str(tmp))

    _write_on_main(engine, folder, "LoRA export", write, [p for p in peft_model.parameters() if p.requires_grad])


def export_encoder_adapt(engine: Engine, encoder: nn.Module, folder: str | Path) -> None:
    """Save an adapted SpeechEncoder's adaptation (config.json + model.safetensors, fp32) atomically on rank 0
    (all ranks call it); non-finite weights are refused and a failed write is raised on every rank."""
    check_finite_weights(engine, f"the encoder adaptation export {folder}", encoder.adaptation, trainable_only=False)
    _write_on_main(engine, folder, "encoder adaptation export", lambda: encoder.save_adaptation(folder))
