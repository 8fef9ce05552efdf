"""Exports of what training made (the connector, a LoRA adapter, an encoder adaptation) as plain model folders:
written on rank 0 with ZeRO-3 partitions gathered first, refused when not finite, a failed write raised on every
rank."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from speechlm.errors import CheckpointWriteError
from speechlm.training.checkpoint import space_text
from speechlm.training.deepspeed_engine import Engine, check_finite_weights, gathered
from speechlm.training.distributed import agree_failures


def export_module(engine: Engine, module: nn.Module, folder: str | Path) -> None:
    """``module.save_pretrained(folder)`` on rank 0, gathering ZeRO-3 partitions first (all ranks call it).

    Non-finite weights are refused on every rank; a failed write on rank 0 is raised on every rank."""
    check_finite_weights(engine, f"the export {folder}", module, trainable_only=False)
    err = None
    with gathered(list(module.parameters()), engine):
        if engine.info.is_main:
            try:
                if engine.bf16 or engine.fp16:  # the export is fp32, whatever the training precision
                    import copy

                    module = copy.deepcopy(module).float()
                module.save_pretrained(folder)
            except Exception as e:  # noqa: BLE001 -- any failed write must reach the other ranks
                err = e
    failures = agree_failures(engine.info.rank, err)
    if failures:
        raise CheckpointWriteError(f"{folder}: export failed ({'; '.join(failures)}); "
                                   f"{space_text(Path(folder).parent)}") from err


def export_lora(engine: Engine, peft_model: nn.Module, folder: str | Path) -> None:
    """Save the LoRA adapter of a PEFT-wrapped LLM (only its trainable matrices) atomically on rank 0."""
    from speechlm.atomic import atomic_path

    check_finite_weights(engine, f"the LoRA export {folder}", peft_model)
    err = None
    with gathered([p for p in peft_model.parameters() if p.requires_grad], engine):
        if engine.info.is_main:
            try:
                with atomic_path(folder) as tmp:
                    peft_model.save_pretrained(str(tmp))
            except Exception as e:  # noqa: BLE001
                err = e
    failures = agree_failures(engine.info.rank, err)
    if failures:
        raise CheckpointWriteError(f"{folder}: LoRA export failed ({'; '.join(failures)}); "
                                   f"{space_text(Path(folder).parent)}") from err


def export_encoder_adapt(engine: Engine, encoder: nn.Module, folder: str | Path) -> None:
    """Save an adapted SpeechEncoder's adaptation (config.json + model.safetensors, fp32) atomically on rank 0
    (all ranks call it); non-finite weights are refused and a failed write is raised on every rank."""
    check_finite_weights(engine, f"the encoder adaptation export {folder}", encoder.adaptation, trainable_only=False)
    err = None
    if engine.info.is_main:
        try:
            encoder.save_adaptation(folder)
        except Exception as e:  # noqa: BLE001 -- any failed write must reach the other ranks
            err = e
    failures = agree_failures(engine.info.rank, err)
    if failures:
        raise CheckpointWriteError(f"{folder}: encoder adaptation export failed ({'; '.join(failures)}); "
                                   f"{space_text(Path(folder).parent)}") from err
