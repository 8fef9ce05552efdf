"""The SSR connector: a small Transformer over encoder frames, read out at each LLM token's boundary.

    features (B, L, T, D_enc) -> fusion (B, T, D_enc) -> stack k (B, T/k, k*D_enc) -> adapter (B, T/k, d_model)
    -> n_layers pre-norm blocks (causal or blockwise mask) -> read-out (B, N, d_model) -> norm + proj (B, N, d_llm)

Segments are (b_{i-1}, b_i] (the first starts at frame 0); frames after the last boundary form a
trailing segment of their own. A zero-length segment (b_i == b_{i-1}: a token with no audio of its
own, common after stacking) reads the same frame as its predecessor, so every token keeps exactly
one vector; with the "mean" read-out it takes that one frame (b_i) as its mean.

With ``slot_readout`` such tokens still read the same frame but no longer get the same vector: each
read-out adds learned embeddings of (a) its rank among the tokens ending on that frame, (b) whether a
later token ends there too, and (c) its own end offset inside the stacked frame (b_i mod k), then
goes through a residual SwiGLU head, so "word" and "." read from one frame can come out different.
Measured on the tiny run (11.8% of tokens share a frame), see docs/PERFORMANCE.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechlm.errors import AlignmentError
from speechlm.models.connectors.base import (
    Connector,
    ConnectorOutput,
    SSRConfig,
    frame_mask,
    stack_frames,
)
from speechlm.models.connectors.fusion import make_layer_fusion
from speechlm.models.connectors.partition import PartitionFusion, uses_partition


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding over the frame axis: x (B, H, T, dh) with dh even."""
    t, dh = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)  # (dh/2,)
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]  # (T, dh/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float, rope: bool, rope_theta: float):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d_model {d} is not divisible by n_heads {n_heads}")
        self.n_heads, self.dropout, self.rope, self.rope_theta = n_heads, dropout, rope, rope_theta
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x (B, T, d); allowed (B, T_query, T_key) bool
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = rotate(q, self.rope_theta), rotate(k, self.rope_theta)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Llama-style pre-norm block: RMSNorm -> attention, RMSNorm -> SwiGLU, residuals.

    With ``partition_groups`` > 1 the SwiGLU is a partition-and-fusion block; the attention projections stay
    dense (they are what mixes channels across heads, and splitting them would only add per-head groups).
    """

    def __init__(self, cfg: SSRConfig):
        super().__init__()
        hidden = int(cfg.ffn_mult * cfg.d_model)
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.rope, cfg.rope_theta)
        self.mlp_norm = nn.RMSNorm(cfg.d_model)
        if uses_partition(cfg.partition_groups):  # G fused groups of width hidden/G (partition.py)
            self.mlp: nn.Module = PartitionFusion(cfg.d_model, hidden, cfg.d_model, cfg.partition_groups, "swiglu")
        else:
            self.mlp = SwiGLU(cfg.d_model, hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), allowed))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


def segment_ids(boundaries: torch.Tensor, token_mask: torch.Tensor, t: int) -> torch.Tensor:
    """(B, T) index of the segment each frame belongs to: #valid boundaries strictly before the frame."""
    frames = torch.arange(t, device=boundaries.device)
    before = (boundaries[:, None, :] < frames[None, :, None]) & token_mask[:, None, :]  # (B, T, N)
    return before.sum(-1)


def attention_mask(kind: str, lengths: torch.Tensor, t: int, boundaries: torch.Tensor | None = None,
                   token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, T) bool: may query frame q attend to key frame k.

    causal: k <= q. blockwise: k is in q's segment, or k is the boundary frame that ends the
    previous segment. Padding keys are never attended; every frame may attend to itself, so that
    padding queries (whose outputs are never read) do not produce NaN rows.
    """
    frames = torch.arange(t, device=lengths.device)
    valid_key = frame_mask(lengths, t)[:, None, :]  # (B, 1, T)
    if kind == "causal":
        allowed = (frames[None, None, :] <= frames[None, :, None]) & valid_key
    elif kind == "blockwise":
        assert boundaries is not None and token_mask is not None
        seg = segment_ids(boundaries, token_mask, t)  # (B, T)
        prev = torch.gather(boundaries, 1, (seg - 1).clamp(min=0))  # (B, T) previous boundary frame
        prev = torch.where(seg > 0, prev, torch.full_like(prev, -1))
        same = seg[:, :, None] == seg[:, None, :]
        is_prev = frames[None, None, :] == prev[:, :, None]
        allowed = (same | is_prev) & valid_key
    else:
        raise ValueError(f"unknown SSR mask {kind!r} (causal | blockwise)")
    return allowed | torch.eye(t, dtype=torch.bool, device=lengths.device)[None]


def check_boundaries(boundaries: torch.Tensor, token_mask: torch.Tensor, frame_lengths: torch.Tensor) -> None:
    """Raise AlignmentError unless valid tokens come first, lie inside the audio and never go back."""
    n_valid = token_mask.sum(1)
    if not torch.equal(token_mask, torch.arange(token_mask.shape[1], device=token_mask.device)[None] < n_valid[:, None]):
        raise AlignmentError("token_mask must be True for a prefix of each row (padding at the end)")
    bad_range = token_mask & ((boundaries < 0) | (boundaries >= frame_lengths[:, None]))
    going_back = token_mask[:, 1:] & (boundaries[:, 1:] < boundaries[:, :-1])
    for name, bad in (("outside the audio's frames", bad_range), ("decreasing", going_back)):
        if bad.any():
            row = int(bad.any(1).nonzero()[0])
            raise AlignmentError(f"batch row {row}: token boundaries {name}: "
                                 f"{boundaries[row][token_mask[row]].tolist()} for {int(frame_lengths[row])} frames")


class SSRConnector(Connector, name="ssr"):
    """Segmented Speech Representation: one LLM input vector per transcript token."""

    uses_boundaries = True

    def __init__(self, cfg: SSRConfig):
        super().__init__()
        self.cfg = cfg
        self.fusion = make_layer_fusion(cfg)  # layer_fusion: weighted | hierarchical (fusion.py)
        self.adapter = nn.Linear(cfg.d_enc * cfg.stack, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_llm)
        if cfg.slot_readout:
            self.slot_rank = nn.Embedding(self.MAX_SLOTS, cfg.d_model)
            self.slot_shared = nn.Embedding(2, cfg.d_model)
            self.slot_offset = nn.Embedding(cfg.stack, cfg.d_model)
            for emb in (self.slot_rank, self.slot_shared, self.slot_offset):
                nn.init.normal_(emb.weight, std=0.02)
            self.head_norm = nn.RMSNorm(cfg.d_model)
            self.head = SwiGLU(cfg.d_model, int(cfg.ffn_mult * cfg.d_model))

    #: Ranks beyond this many tokens on one read-out frame share the last rank embedding.
    MAX_SLOTS = 4

    def slots(self, boundaries: torch.Tensor, bnd: torch.Tensor, token_mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token (B, N): rank among earlier tokens on its read-out frame, whether a later one shares
        it, and its end offset inside the stacked frame. Boundaries are non-decreasing, so sharers are
        consecutive."""
        same_prev = torch.zeros_like(token_mask)
        same_prev[:, 1:] = (bnd[:, 1:] == bnd[:, :-1]) & token_mask[:, 1:]
        # rank = length of the run of "same as previous" ending at i
        n = bnd.shape[1]
        idx = torch.arange(n, device=bnd.device)[None].expand_as(bnd)
        run_start = torch.where(~same_prev, idx, torch.zeros_like(idx)).cummax(1).values
        rank = (idx - run_start).clamp(max=self.MAX_SLOTS - 1)
        shared_next = torch.zeros_like(token_mask)
        shared_next[:, :-1] = same_prev[:, 1:]
        offset = torch.remainder(boundaries, self.cfg.stack)
        return rank, shared_next.long(), offset

    @torch.no_grad()
    def init_output_bias(self, vector: torch.Tensor) -> None:
        """Start the projection's bias at ``vector`` (d_llm,), e.g. the LLM's mean token embedding."""
        self.proj.bias.copy_(vector.to(self.proj.bias))

    def forward(self, features: torch.Tensor, frame_lengths: torch.Tensor, boundaries: torch.Tensor | None,
                token_mask: torch.Tensor | None = None) -> ConnectorOutput:
        if boundaries is None:
            raise ValueError("the SSR connector needs token boundaries (B, N)")
        if token_mask is None:
            token_mask = torch.ones_like(boundaries, dtype=torch.bool)
        check_boundaries(boundaries, token_mask, frame_lengths)
        k = self.cfg.stack
        x = self.fusion(features, frame_lengths)  # (B, T, D_enc)
        x, lengths = stack_frames(x, frame_lengths, k)  # (B, T', k*D_enc), T' = ceil(T/k)
        t = x.shape[1]
        # Boundaries at the stacked rate; padded tokens point past the end so they end no segment.
        bnd = torch.where(token_mask, torch.div(boundaries, k, rounding_mode="floor"), torch.full_like(boundaries, t))
        x = self.adapter(x)  # (B, T', d_model)
        allowed = attention_mask(self.cfg.mask, lengths, t, bnd, token_mask)  # (B, T', T')
        for block in self.blocks:
            x = block(x, allowed)
        read = bnd.clamp(max=t - 1)  # (B, N)
        if self.cfg.readout == "boundary":
            h = torch.gather(x, 1, read[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, N, d_model)
        elif self.cfg.readout == "mean":
            seg = segment_ids(bnd, token_mask, t)  # (B, T')
            n = bnd.shape[1]
            member = (seg[:, None, :] == torch.arange(n, device=x.device)[None, :, None]) \
                & frame_mask(lengths, t)[:, None, :]  # (B, N, T')
            empty = ~member.any(-1, keepdim=True)  # zero-length segments: use their boundary frame
            member = member | (empty & (torch.arange(t, device=x.device)[None, None, :] == read[:, :, None]))
            w = member.to(x.dtype)
            h = (w @ x) / w.sum(-1, keepdim=True)  # (B, N, d_model)
        else:
            raise ValueError(f"unknown SSR read-out {self.cfg.readout!r} (boundary | mean)")
        if self.cfg.slot_readout:
            rank, shared_next, offset = self.slots(boundaries, bnd, token_mask)
            h = h + self.slot_rank(rank) + self.slot_shared(shared_next) + self.slot_offset(offset)  # (B, N, d_model)
            h = h + self.head(self.head_norm(h))
        embeds = self.proj(self.norm(h)) * token_mask[:, :, None].to(h.dtype)  # (B, N, d_llm)
        return ConnectorOutput(embeds=embeds, mask=token_mask)
