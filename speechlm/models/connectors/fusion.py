"""Layer fusion: how a connector turns the L selected encoder layers (B, L, T, D) into one frame sequence (B, T, D).

Chosen by the connector config's ``layer_fusion`` (every connector: SSR, stack, conv, Q-Former share this input)::

    "weighted"      LayerFusion (base.py): a learned softmax-weighted sum of the L layers (one layer passes
                    through unchanged). The default: the module, its parameter (``fusion.logits``) and its
                    outputs are exactly those of connectors saved before ``layer_fusion`` existed.
    "hierarchical"  HierarchicalFusion (below): hierarchical feature fusion (Huo et al., 2022): adjacent layers
                    are fused group by group, bottom to top, each step by its own small learned module.

Hierarchical fusion cuts the L layers, in the order they are selected (``model.encoder_layers`` / the feature
cache's layers, bottom first), into groups of ``fusion_group`` adjacent layers (the top group keeps the remainder,
so it may be smaller) and folds them upwards::

    h_1 = f_1(group_1)                     group_1 = layers 1..m (m = fusion_group)
    h_k = f_k(h_{k-1}, group_k)            k = 2 .. S, S = ceil(L / m)
    f(x_1 .. x_n) = mean(x_1 .. x_n) + W_2 GELU(W_1 LayerNorm(concat(x_1 .. x_n)) + b_1) + b_2

W_1: n*D -> F, W_2: F -> D, F = ``fusion_dim`` (0 = D). The mean is a residual path (each step starts near the plain
average of its inputs: W_2 starts at a tenth of nn.Linear's scale), the MLP learns what the average loses.
The output is h_S (B, T, D), zero at padding frames (given the frame lengths) as the encoder's padding is, so
stacking and windows downstream see the same zeros as with the weighted sum. Parameters: ``param_count``.

L = 1 with "hierarchical" raises ConfigError (there is nothing to fuse: cache or select more layers, or use
"weighted", which passes a single layer through).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechlm.errors import ConfigError
from speechlm.models.connectors.base import ConnectorConfig, LayerFusion, frame_mask

LAYER_FUSIONS = ("weighted", "hierarchical")
#: W_2 (each step's output layer) starts at this fraction of nn.Linear's default scale.
OUT_INIT_SCALE = 0.1


def layer_groups(n_layers: int, group: int) -> list[list[int]]:
    """Indices (bottom first) of the layers fused at each step: ``group`` adjacent ones, the top group the rest."""
    return [list(range(i, min(i + group, n_layers))) for i in range(0, n_layers, group)]


class FusionStep(nn.Module):
    """f(x_1 .. x_n) = mean(x) + W_2 GELU(W_1 LayerNorm(concat(x)) + b_1) + b_2: n inputs (..., D) -> (..., D)."""

    def __init__(self, n_inputs: int, d: int, hidden: int):
        super().__init__()
        self.n_inputs = n_inputs
        self.norm = nn.LayerNorm(n_inputs * d)
        self.inp = nn.Linear(n_inputs * d, hidden)
        self.out = nn.Linear(hidden, d)
        with torch.no_grad():
            self.out.weight.mul_(OUT_INIT_SCALE)
            self.out.bias.mul_(OUT_INIT_SCALE)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if len(xs) != self.n_inputs:
            raise ValueError(f"fusion step expects {self.n_inputs} inputs, got {len(xs)}")
        mean = torch.stack(xs).mean(0)
        return mean + self.out(F.gelu(self.inp(self.norm(torch.cat(xs, dim=-1)))))


class HierarchicalFusion(nn.Module):
    """(B, L, T, D) -> (B, T, D): groups of ``group`` adjacent layers folded bottom to top by ``FusionStep``s."""

    def __init__(self, n_layers: int, d: int, group: int = 2, fusion_dim: int = 0):
        super().__init__()
        check_hierarchical(n_layers, group, fusion_dim)
        self.n_layers, self.d, self.group = n_layers, d, group
        self.hidden = fusion_dim or d
        self.groups = layer_groups(n_layers, group)
        self.steps = nn.ModuleList(FusionStep(len(g) + (k > 0), d, self.hidden) for k, g in enumerate(self.groups))

    @staticmethod
    def param_count(n_layers: int, d: int, group: int = 2, fusion_dim: int = 0) -> int:
        """The module's parameters by formula: per step of n inputs, LayerNorm 2nD, W_1 nDF + F, W_2 FD + D."""
        f = fusion_dim or d
        total = 0
        for k, g in enumerate(layer_groups(n_layers, group)):
            n = len(g) + (k > 0)
            total += 2 * n * d + (n * d * f + f) + (f * d + d)
        return total

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        # features (B, L, T, D); lengths (B,) valid frames -> (B, T, D), zero after each clip's length
        if features.shape[1] != self.n_layers:
            raise ValueError(f"expected {self.n_layers} encoder layers, got features {tuple(features.shape)}")
        h = None
        for step, g in zip(self.steps, self.groups):
            xs = [features[:, i] for i in g]
            h = step(xs if h is None else [h, *xs])
        assert h is not None
        if lengths is not None:
            h = h * frame_mask(lengths, h.shape[1])[:, :, None].to(h.dtype)
        return h

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, d={self.d}, group={self.group}, fusion_dim={self.hidden}, groups={self.groups}"


def check_hierarchical(n_layers: int, group: int, fusion_dim: int) -> None:
    """Raise ConfigError for settings hierarchical fusion cannot use (with what to change)."""
    if n_layers < 2:
        raise ConfigError(f"layer_fusion='hierarchical' needs at least 2 encoder layers to fuse, the connector gets "
                          f"n_enc_layers={n_layers}: select more layers (model.encoder_layers, and a feature cache "
                          "built with tools/cache_features.py --layers ...) or use layer_fusion='weighted'")
    if group < 1:
        raise ConfigError(f"fusion_group must be >= 1 (layers fused per step), got {group}")
    if fusion_dim < 0:
        raise ConfigError(f"fusion_dim must be >= 0 (0 = d_enc), got {fusion_dim}")


def make_layer_fusion(cfg: ConnectorConfig) -> nn.Module:
    """The connector's layer fusion for ``cfg.layer_fusion``; call it as ``fusion(features, frame_lengths)``."""
    if cfg.layer_fusion == "weighted":
        return LayerFusion(cfg.n_enc_layers)
    if cfg.layer_fusion == "hierarchical":
        return HierarchicalFusion(cfg.n_enc_layers, cfg.d_enc, cfg.fusion_group, cfg.fusion_dim)
    raise ConfigError(f"unknown layer_fusion {cfg.layer_fusion!r} ({' | '.join(LAYER_FUSIONS)})")


def fusion_param_count(cfg: ConnectorConfig) -> int:
    """Parameters of the layer fusion ``cfg`` builds, by formula."""
    if cfg.layer_fusion == "hierarchical":
        return HierarchicalFusion.param_count(cfg.n_enc_layers, cfg.d_enc, cfg.fusion_group, cfg.fusion_dim)
    return cfg.n_enc_layers if cfg.n_enc_layers > 1 else 0

