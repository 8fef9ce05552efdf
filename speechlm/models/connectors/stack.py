"""Ultravox-style baseline: stack k encoder frames into one and map them with a 2-layer MLP.

    features (B, L, T, D_enc) -> fusion (B, T, D_enc) -> stack (B, ceil(T/k), k*D_enc) -> MLP (B, N, d_llm)

With k=8 at 50 Hz this gives 6.25 vectors a second. Boundaries are ignored. ``partition_groups`` > 1 makes the
MLP a partition-and-fusion block (partition.py) grouped over the encoder channels.
"""

from __future__ import annotations

import torch
from torch import nn

from speechlm.models.connectors.base import (
    Connector,
    ConnectorOutput,
    StackConfig,
    frame_mask,
    stack_frames,
)
from speechlm.models.connectors.fusion import make_layer_fusion
from speechlm.models.connectors.partition import PartitionFusion, uses_partition


class StackConnector(Connector, name="stack"):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.fusion = make_layer_fusion(cfg)  # layer_fusion: weighted | hierarchical (fusion.py)
        d_in = cfg.d_enc * cfg.stack
        if uses_partition(cfg.partition_groups):  # groups over the encoder channels of all k frames
            self.mlp = nn.Sequential(
                nn.RMSNorm(d_in),
                PartitionFusion(d_in, cfg.hidden, cfg.d_llm, cfg.partition_groups, "gelu", bias=True,
                                frames=cfg.stack),
            )
        else:
            self.mlp = nn.Sequential(
                nn.RMSNorm(d_in),
                nn.Linear(d_in, cfg.hidden),
                nn.GELU(),
                nn.Linear(cfg.hidden, cfg.d_llm),
            )

    @property
    def output_rate_hz(self) -> float:
        return self.cfg.frame_rate_hz / self.cfg.stack

    def forward(self, features: torch.Tensor, frame_lengths: torch.Tensor, boundaries: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> ConnectorOutput:
        x, lengths = stack_frames(self.fusion(features, frame_lengths), frame_lengths, self.cfg.stack)  # (B, N, k*D_enc)
        mask = frame_mask(lengths, x.shape[1])  # (B, N)
        embeds = self.mlp(x) * mask[:, :, None].to(x.dtype)  # (B, N, d_llm)
        return ConnectorOutput(embeds=embeds, mask=mask)
