"""Finding the self-attention modules of a Hugging Face model and their q/k/v/o projections (used by attention
merging, speechlm.models.merging, and by the encoder's LoRA adaptation, speechlm.models.encoder_adapt)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from speechlm.errors import ConfigError, ModelError

#: What each projection is called, by its short name (first match wins).
PROJECTION_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "linear_q", "query"),
    "k": ("k_proj", "linear_k", "key"),
    "v": ("v_proj", "linear_v", "value"),
    "o": ("out_proj", "o_proj", "linear_out"),
}
#: Names of self-attention modules (the last component of their dotted name).
ATTENTION_NAMES = ("self_attn", "attention", "self_attention", "attn", "self")
PARTS = ("auto", "encoder", "decoder", "all")


@dataclass
class AttentionLayer:
    """One self-attention module and its projections (short name -> (child name, linear module))."""

    name: str
    module: nn.Module
    projections: dict[str, tuple[str, nn.Module]] = field(default_factory=dict)

    def projection(self, p: str) -> nn.Module:
        if p not in self.projections:
            wanted = "/".join(PROJECTION_NAMES[p])
            raise ModelError(f"attention module {self.name!r} has no {p!r} projection (looked for {wanted}; "
                             f"its children: {', '.join(n for n, _ in self.module.named_children())})")
        return self.projections[p][1]


def _has_weight(m: nn.Module) -> bool:
    return isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2


def find_attention_layers(model: nn.Module, part: str = "auto", prefer: str = "encoder") -> list[AttentionLayer]:
    """The self-attention modules of ``model`` in layer order.

    ``part``: "encoder" / "decoder" keeps the modules under a submodule of that name (or all of them
    when ``model`` itself is one, e.g. a ``WhisperEncoder``); "all" keeps everything; "auto" takes
    ``prefer``'s part when the model has both an encoder and a decoder stack (Whisper, T5-style), else all.
    """
    if part not in PARTS:
        raise ConfigError(f"attention part must be one of {PARTS}, not {part!r}")
    found: list[AttentionLayer] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in ATTENTION_NAMES:
            continue
        children = dict(module.named_children())
        layer = AttentionLayer(name, module)
        for short, candidates in PROJECTION_NAMES.items():
            for c in candidates:
                if c in children and _has_weight(children[c]):
                    layer.projections[short] = (c, children[c])
                    break
        if all(p in layer.projections for p in ("q", "k", "v")):
            found.append(layer)
    if not found:
        raise ModelError(f"{type(model).__name__}: no self-attention module with q/k/v projections found "
                         f"(looked for modules named {'/'.join(ATTENTION_NAMES)} with children "
                         f"{'/'.join(PROJECTION_NAMES['q'])}, ...; fused projections are not supported)")

    def under(layer: AttentionLayer, stack: str) -> bool:
        return stack in layer.name.split(".")

    if part == "auto":
        has = {s: any(under(lay, s) for lay in found) for s in ("encoder", "decoder")}
        part = prefer if has["encoder"] and has["decoder"] else "all"
    if part == "all":
        return found
    picked = [lay for lay in found if under(lay, part)]
    if not picked and part in type(model).__name__.lower():  # the model is the stack itself
        picked = found
    if not picked:
        raise ModelError(f"{type(model).__name__}: no self-attention under a submodule named {part!r} "
                         f"(attention modules: {', '.join(lay.name for lay in found[:4])}...)")
    return picked
