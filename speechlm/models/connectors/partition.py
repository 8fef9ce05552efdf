"""Partition-and-fusion feed-forward block: G small per-group MLPs that see a summary of all groups.

The idea comes from lightweight speaker verification with feature partition and fusion: instead of one
wide MLP over all d channels, the channels are split into G groups of d/G, every group is updated with
information fused across the groups, and each group goes through its own block of width hidden/G::

    x (..., d_in) -> groups (..., G, c_in), c_in = d_in / G
    fused  = mean over the G groups                       (..., 1, c_in)   pooling across groups
    u_g    = RMSNorm(concat(x_g, fused))                  (..., G, 2 c_in) concatenation + normalisation
    h_g    = act(u_g W_in[g] (+ b_in[g]))                 (..., G, hidden/G)   SwiGLU: silu(gate) * up
    y_g    = h_g W_out[g] (+ b_out[g])                    (..., G, c_out)
    out_g  = y_g + mean over groups of y                  (..., G, c_out)  element-wise sum with the fused output
    -> (..., d_out)

Weights per group are separate (one batched matmul over G), so the block has about 1/G of the dense
MLP's weights, times 2 on the input side for the concatenated context (exact counts: ``param_count``).
``frames=k`` is for inputs that are k stacked frames of D channels (``stack_frames``): the groups are then
taken over the channels of every frame (group g holds channels g*D/G..(g+1)*D/G of all k frames), not
over whole frames.

Used, when a connector config sets ``partition_groups`` > 1, as the SSR Transformer's feed-forward, the
Q-Former's feed-forward and the stack/conv connectors' MLP (see their modules); 0 or 1 keeps the dense
blocks exactly as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("swiglu", "gelu", "relu")


def check_groups(groups: int, where: str, **dims: int) -> None:
    """Raise ValueError unless ``groups`` >= 2 divides every named width (clear message for configs)."""
    if groups < 2:
        raise ValueError(f"{where}: partition_groups must be >= 2 for a partition-and-fusion block "
                         f"(0 or 1 = the dense block), got {groups}")
    for name, d in dims.items():
        if d % groups:
            raise ValueError(f"{where}: partition_groups={groups} must divide {name}={d}")


class PartitionFusion(nn.Module):
    """(..., d_in) -> (..., d_out) through G fused, grouped MLPs of hidden width ``hidden // G`` each."""

    def __init__(self, d_in: int, hidden: int, d_out: int, groups: int, act: str = "swiglu", bias: bool = False,
                 frames: int = 1):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown partition-and-fusion activation {act!r} ({' | '.join(ACTIVATIONS)})")
        if frames < 1 or d_in % frames:
            raise ValueError(f"partition-and-fusion: d_in={d_in} is not {frames} stacked frames")
        check_groups(groups, "partition-and-fusion", channels=d_in // frames, d_out=d_out)
        if hidden < groups:
            raise ValueError(f"partition-and-fusion: hidden={hidden} is smaller than partition_groups={groups}")
        self.groups, self.act, self.frames = groups, act, frames
        self.d_in, self.d_out = d_in, d_out
        self.c_in, self.c_out, self.h = d_in // groups, d_out // groups, hidden // groups
        n_in = 2 if act == "swiglu" else 1  # SwiGLU: gate and up halves
        self.norm = nn.RMSNorm(2 * self.c_in)
        self.w_in = nn.Parameter(torch.empty(groups, 2 * self.c_in, n_in * self.h))
        self.w_out = nn.Parameter(torch.empty(groups, self.h, self.c_out))
        self.b_in = nn.Parameter(torch.zeros(groups, n_in * self.h)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(groups, self.c_out)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, per group.
        for w, b in ((self.w_in, self.b_in), (self.w_out, self.b_out)):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    @staticmethod
    def param_count(d_in: int, hidden: int, d_out: int, groups: int, act: str = "swiglu", bias: bool = False) -> int:
        """The block's parameters by formula (what the tests check the module against)."""
        g = groups
        c_in, c_out, h = d_in // g, d_out // g, hidden // g
        n_in = 2 if act == "swiglu" else 1
        return 2 * c_in + g * (2 * c_in * n_in * h + h * c_out) + (g * (n_in * h + c_out) if bias else 0)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., G, c_in); with stacked frames, group g collects its channels of every frame."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"partition-and-fusion expects {self.d_in} input channels, got {tuple(x.shape)}")
        if self.frames == 1:
            return x.unflatten(-1, (self.groups, self.c_in))
        x = x.unflatten(-1, (self.frames, self.groups, self.c_in // self.frames))  # (..., k, G, D/G)
        return x.transpose(-3, -2).flatten(-2)  # (..., G, k*D/G)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xg = self.split(x)  # (..., G, c_in)
        fused = xg.mean(-2, keepdim=True).expand_as(xg)  # pooling across groups
        u = self.norm(torch.cat((xg, fused), dim=-1))  # (..., G, 2 c_in)
        h = torch.einsum("...gi,gio->...go", u, self.w_in)  # (..., G, n_in*h)
        if self.b_in is not None:
            h = h + self.b_in
        if self.act == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.act == "gelu":
            h = F.gelu(h)
        else:
            h = F.relu(h)
        y = torch.einsum("...gh,gho->...go", h, self.w_out)  # (..., G, c_out)
        if self.b_out is not None:
            y = y + self.b_out
        y = y + y.mean(-2, keepdim=True)  # element-wise sum with the fused output of all groups
        return y.flatten(-2)  # (..., d_out)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, hidden={self.h * self.groups}, d_out={self.d_out}, groups={self.groups}, "
                f"act={self.act}, bias={self.b_in is not None}, frames={self.frames}")


def uses_partition(groups: int) -> bool:
    """True when a config's ``partition_groups`` turns the block on (0 and 1 mean the dense block); < 0 raises."""
    if groups < 0:
        raise ValueError(f"partition_groups must be 0 (off), 1 (off) or >= 2, got {groups}")
    return groups > 1
