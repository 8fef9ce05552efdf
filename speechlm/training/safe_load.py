"""Loading a checkpoint without running code from it: ``torch.load(weights_only=True)`` everywhere, DeepSpeed's
own loads included, with an explicit allow-list of the few DeepSpeed classes its optimizer states hold."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from speechlm.errors import CheckpointError

#: The non-tensor objects DeepSpeed pickles into its optimizer states ("module:qualname"), allowed for
#: :func:`safe_torch_load`. Any other object in a checkpoint is refused rather than unpickled.
SAFE_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


def _safe_globals() -> list:
    import importlib

    found = []
    for spec in SAFE_CHECKPOINT_GLOBALS:
        module, _, name = spec.partition(":")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: it does not store that class
            continue
    return found


@contextlib.contextmanager
def safe_torch_load():
    """Within the block, every ``torch.load`` (DeepSpeed's own included, which asks for ``weights_only=False``)
    runs with ``weights_only=True`` and :data:`SAFE_CHECKPOINT_GLOBALS` allowed: loading a checkpoint never
    executes code from it. A file holding any other object raises ``pickle.UnpicklingError``."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        torch.load = original


def unpickling_reason(e: BaseException) -> str:
    """The line of torch's weights-only refusal that names the object (its message starts with advice)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    named = [x for x in lines if "Unsupported" in x or "GLOBAL" in x]
    return (named or lines or [type(e).__name__])[0].split(". Please use")[0][:300]


def unsafe_object_error(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: the checkpoint holds objects that a safe load (torch.load(weights_only=True)) refuses to run "
        f"({unpickling_reason(e)}). A checkpoint from before speechlm loaded checkpoints safely (numpy arrays in "
        "its RNG state) cannot be resumed: start again with loop.resume=false or another out_dir. If it names a "
        "DeepSpeed class and you wrote the checkpoint yourself, add that class to SAFE_CHECKPOINT_GLOBALS in "
        "speechlm/training/safe_load.py; never load an untrusted one")
