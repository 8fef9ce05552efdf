"""SALMONN-style baseline: a window-level Q-Former, a few learned queries per ~0.33 s window of frames.

    features (B, L, T, D_enc) -> fusion + adapter (B, T, d_model) -> windows (B*W, w, d_model)
    -> queries (B*W, n_q, d_model) cross-attend to their window, n_layers times
    -> (B, W*n_q, d_model) -> norm + proj (B, N, d_llm)

w = round(window_s * frame_rate_hz) frames (17 at 50 Hz), so ~3 vectors a second with one query.
Boundaries are ignored. ``partition_groups`` > 1 makes each block's MLP a partition-and-fusion block (partition.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechlm.models.connectors.base import Connector, ConnectorOutput, QFormerConfig, frame_mask
from speechlm.models.connectors.fusion import make_layer_fusion
from speechlm.models.connectors.partition import PartitionFusion, uses_partition


class CrossAttentionBlock(nn.Module):
    """Pre-norm: queries self-attend, cross-attend to the window's frames, then an MLP; residuals."""

    def __init__(self, d: int, n_heads: int, ffn_mult: float, dropout: float, partition_groups: int = 0):
        super().__init__()
        self.self_norm = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.mlp_norm = nn.LayerNorm(d)
        if uses_partition(partition_groups):
            self.mlp: nn.Module = PartitionFusion(d, int(ffn_mult * d), d, partition_groups, "gelu", bias=True)
        else:
            self.mlp = nn.Sequential(nn.Linear(d, int(ffn_mult * d)), nn.GELU(), nn.Linear(int(ffn_mult * d), d))

    def forward(self, q: torch.Tensor, frames: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        # q (B*W, n_q, d); frames (B*W, w, d); key_padding (B*W, w) True = ignore
        h = self.self_norm(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.cross_norm(q), frames, frames, key_padding_mask=key_padding,
                                need_weights=False)[0]
        return q + self.mlp(self.mlp_norm(q))


class QFormerConnector(Connector, name="qformer"):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.window = max(1, int(cfg.window_s * cfg.frame_rate_hz + 0.5))  # frames per window
        self.fusion = make_layer_fusion(cfg)  # layer_fusion: weighted | hierarchical (fusion.py)
        self.adapter = nn.Linear(cfg.d_enc, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(self.window, cfg.d_model) * 0.02)  # position inside a window
        self.queries = nn.Parameter(torch.randn(cfg.n_queries, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(CrossAttentionBlock(cfg.d_model, cfg.n_heads, cfg.ffn_mult, cfg.dropout,
                                                        cfg.partition_groups)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_llm)

    @property
    def output_rate_hz(self) -> float:
        return self.cfg.frame_rate_hz / self.window * self.cfg.n_queries

    def forward(self, features: torch.Tensor, frame_lengths: torch.Tensor, boundaries: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> ConnectorOutput:
        w, nq = self.window, self.cfg.n_queries
        x = self.adapter(self.fusion(features, frame_lengths))  # (B, T, d_model)
        b, t, d = x.shape
        pad = (-t) % w
        x = F.pad(x, (0, 0, 0, pad))
        n_win = (t + pad) // w
        frames = x.view(b * n_win, w, d) + self.pos  # (B*W, w, d_model)
        key_padding = ~frame_mask(frame_lengths, t + pad).view(b * n_win, w)  # (B*W, w)
        # A window that is all padding keeps its first key, so its (unused) output is not NaN.
        key_padding[:, 0] = False
        q = self.queries.expand(b * n_win, nq, d)
        for block in self.blocks:
            q = block(q, frames, key_padding)
        h = q.reshape(b, n_win * nq, d)  # (B, W*n_q, d_model)
        win_lengths = torch.div(frame_lengths + w - 1, w, rounding_mode="floor")  # windows holding audio
        mask = frame_mask(win_lengths * nq, n_win * nq)  # (B, N)
        embeds = self.proj(self.norm(h)) * mask[:, :, None].to(h.dtype)  # (B, N, d_llm)
        return ConnectorOutput(embeds=embeds, mask=mask)
