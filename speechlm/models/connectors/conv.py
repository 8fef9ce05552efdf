"""SLAM-LLM-style baseline: a strided convolution over k frames (= concatenation + linear), then an MLP.

    features (B, L, T, D_enc) -> fusion (B, T, D_enc) -> Conv1d(kernel k, stride k) (B, ceil(T/k), hidden)
    -> ReLU -> Linear (B, N, d_llm)

With k=5 at 50 Hz this gives 10 vectors a second. Boundaries are ignored. ``partition_groups`` > 1 replaces
conv + ReLU + Linear with one partition-and-fusion block over the k stacked frames (partition.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechlm.models.connectors.base import (
    Connector,
    ConnectorOutput,
    ConvConfig,
    frame_mask,
    stack_frames,
)
from speechlm.models.connectors.fusion import make_layer_fusion
from speechlm.models.connectors.partition import PartitionFusion, uses_partition


class ConvConnector(Connector, name="conv"):
    def __init__(self, cfg: ConvConfig):
        super().__init__()
        self.cfg = cfg
        self.fusion = make_layer_fusion(cfg)  # layer_fusion: weighted | hierarchical (fusion.py)
        if uses_partition(cfg.partition_groups):
            # The strided conv is a linear map of k stacked frames: conv + ReLU + out as one grouped block.
            self.pf = PartitionFusion(cfg.d_enc * cfg.stack, cfg.hidden, cfg.d_llm, cfg.partition_groups, "relu",
                                      bias=True, frames=cfg.stack)
        else:
            self.conv = nn.Conv1d(cfg.d_enc, cfg.hidden, kernel_size=cfg.stack, stride=cfg.stack)
            self.out = nn.Linear(cfg.hidden, cfg.d_llm)

    @property
    def output_rate_hz(self) -> float:
        return self.cfg.frame_rate_hz / self.cfg.stack

    def forward(self, features: torch.Tensor, frame_lengths: torch.Tensor, boundaries: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> ConnectorOutput:
        k = self.cfg.stack
        x = self.fusion(features, frame_lengths)  # (B, T, D_enc)
        x = x * frame_mask(frame_lengths, x.shape[1])[:, :, None].to(x.dtype)  # padding frames read as zeros
        if self.cfg.partition_groups > 1:
            x, _ = stack_frames(x, frame_lengths, k)  # (B, N, k*D_enc)
            y = self.pf(x)  # (B, N, d_llm)
        else:
            x = F.pad(x.transpose(1, 2), (0, (-x.shape[1]) % k))  # (B, D_enc, k*ceil(T/k))
            x = F.relu(self.conv(x)).transpose(1, 2)  # (B, N, hidden)
            y = self.out(x)  # (B, N, d_llm)
        mask = frame_mask(torch.div(frame_lengths + k - 1, k, rounding_mode="floor"), y.shape[1])  # (B, N)
        embeds = y * mask[:, :, None].to(y.dtype)  # (B, N, d_llm)
        return ConnectorOutput(embeds=embeds, mask=mask)
