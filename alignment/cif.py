"""CIF aligner (continuous integrate-and-fire, Dong & Xu 2020) on frozen encoder frames, over LLM subword tokens.

A firing weight ``alpha_t`` in (0, 1) is predicted for every frame; the weights are summed left to
right and a token "fires" each time the running sum crosses the next integer. Token i integrates
the frames (weighted by their share of alpha) between its predecessor's firing and its own; its
boundary is the frame where it fires. Training: cross-entropy of a token classifier on the
integrated vectors (alphas scaled to sum to the true token count, teacher forcing) plus the
*quantity loss* ``|sum(alpha) - N|``. Free mode fires ``round(sum alpha)`` tokens and classifies
them; forced mode scales alpha to the known transcript's token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alignment.ctc_model import FrameAligner, FrameAlignerConfig, load_model_folder
from alignment.decoders import LabelSpans
from speechlm.errors import AlignmentError, ModelError


@dataclass
class CIFAlignerConfig(FrameAlignerConfig):
    kind: str = "CIF"
    layers: int = 3
    tail_threshold: float = 0.5        # free mode: a leftover weight >= this fires one more token
    start_share: float = 0.05          # a token "starts" once it has integrated this share of its weight

    def __post_init__(self) -> None:
        if self.kind != "CIF":
            raise ModelError(f"CIF aligner config has kind {self.kind!r}")


def cif_config(tokenizer, **kw) -> CIFAlignerConfig:
    return CIFAlignerConfig(vocab_size=len(tokenizer), tokenizer=str(getattr(tokenizer, "name_or_path", "")), **kw)


class CIFAligner(FrameAligner):
    """Frames ``(B, L, T, D)`` -> firing weights ``(B, T)`` and hidden states ``(B, T, d_model)``."""

    def __init__(self, config: CIFAlignerConfig):
        super().__init__(config)
        c = config
        # weights from a little local context: conv over time, then one sigmoid unit per frame
        self.weight_conv = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, padding=1)
        self.weight_head = nn.Linear(c.d_model, 1)
        self.token_head = nn.Linear(c.d_model, c.vocab_size)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(features, lengths)                                       # (B, T, d)
        a = torch.relu(self.weight_conv(h.transpose(1, 2))).transpose(1, 2)
        alpha = torch.sigmoid(self.weight_head(a)).squeeze(-1)                 # (B, T)
        if lengths is not None:
            t = torch.arange(h.shape[1], device=h.device)
            alpha = alpha * (t[None, :] < lengths.to(h.device)[:, None])
        return alpha, h

    def frame_outputs(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, 1 + d_model)``: firing weight then hidden state per frame (what the Aligner keeps)."""
        alpha, h = self(features, lengths)
        return torch.cat([alpha.unsqueeze(-1), h], dim=-1)

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str = "cpu") -> CIFAligner:
        return load_model_folder(cls, CIFAlignerConfig, folder, map_location)


def integration_weights(alpha: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``alpha (B, T)`` -> ``W (B, N, T)``: the share of frame t's weight that token i integrates.

    With ``c = cumsum(alpha)``, token i owns the interval [i, i+1) of the running sum, so
    ``W[i, t] = |[c_{t-1}, c_t] ∩ [i, i+1]|``. Differentiable; no Python loop over frames.
    """
    cum = alpha.cumsum(-1)                                                  # (B, T)
    prev = cum - alpha
    i = torch.arange(num_tokens, device=alpha.device, dtype=alpha.dtype)[None, :, None]
    return (torch.minimum(cum[:, None, :], i + 1) - torch.maximum(prev[:, None, :], i)).clamp(min=0)


def scale_to_count(alpha: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Scale each row of ``alpha (B, T)`` to sum to ``counts (B,)`` (teacher forcing / forced mode)."""
    total = alpha.sum(-1, keepdim=True).clamp(min=1e-6)
    return alpha * (counts.to(alpha.dtype)[:, None] / total)


def cif_loss(model: CIFAligner, features: torch.Tensor, lengths: torch.Tensor, token_ids: list[list[int]],
             quantity_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Token cross-entropy on integrated vectors (alphas scaled to the true count) + quantity loss."""
    alpha, h = model(features, lengths)
    counts = torch.tensor([len(t) for t in token_ids], device=h.device)
    n_max = int(counts.max())
    w = integration_weights(scale_to_count(alpha, counts), n_max)            # (B, N, T)
    c = w @ h                                                               # (B, N, d)
    logits = model.token_head(c)                                            # (B, N, V)
    target = torch.full((len(token_ids), n_max), -100, dtype=torch.long, device=h.device)
    for b, ids in enumerate(token_ids):
        target[b, : len(ids)] = torch.tensor(ids, device=h.device)
    ce = nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)
    quantity = (alpha.sum(-1) - counts.to(alpha.dtype)).abs().mean()
    return ce + quantity_weight * quantity, {"ce": ce.item(), "quantity": quantity.item()}


def fire(alpha: np.ndarray, num_tokens: int, start_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Start and fire (end) frame of each of ``num_tokens`` tokens from (already scaled) weights ``(T,)``.

    Token i ends at the first frame where the running sum reaches i + 1 (the last frame for a tail
    token that never reaches it) and starts where it has integrated ``start_share`` of its weight.
    """
    cum = np.cumsum(alpha.astype(np.float64))
    last = len(alpha) - 1
    ends = np.minimum(np.searchsorted(cum, np.arange(1, num_tokens + 1) - 1e-4), last)
    starts = np.minimum(np.searchsorted(cum, np.arange(num_tokens) + start_share), ends)
    return starts.astype(np.int64), ends.astype(np.int64)


def free_token_count(alpha: np.ndarray, tail_threshold: float) -> int:
    total = float(alpha.sum())
    n = int(np.floor(total + 1e-6))
    return n + (1 if total - n >= tail_threshold else 0)


def cif_spans(frame_out: torch.Tensor, num_tokens: int | None, config: CIFAlignerConfig, utt_id: str = "?"
              ) -> tuple[LabelSpans, torch.Tensor]:
    """One utterance's ``(T, 1 + d)`` frame outputs -> token spans and integrated vectors ``(N, d)``.

    ``num_tokens`` None: free mode (count from the weights); else forced mode (weights scaled to it).
    """
    alpha, h = frame_out[:, 0].float(), frame_out[:, 1:].float()
    t = alpha.shape[0]
    if num_tokens is None:
        num_tokens = free_token_count(alpha.numpy(), config.tail_threshold)
        if num_tokens == 0:
            raise AlignmentError(f"utterance {utt_id!r}: CIF fired no token (free mode decoded no speech)")
        scaled = alpha
    else:
        if num_tokens > t:
            raise AlignmentError(f"utterance {utt_id!r}: audio is shorter than its text ({t} frames for "
                                 f"{num_tokens} tokens)")
        scaled = scale_to_count(alpha[None], torch.tensor([num_tokens]))[0]
    w = integration_weights(scaled[None], num_tokens)[0]                    # (N, T)
    starts, ends = fire(scaled.numpy(), num_tokens, config.start_share)
    score = float(np.log(np.clip(alpha.numpy(), 1e-6, 1)).mean())
    return LabelSpans([], starts, ends, config.frame_rate_hz, t, score), w @ h
