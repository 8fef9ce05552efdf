"""Connector forward+backward time on the CPU for a synthetic batch of clips (tools/benchmarks/bench_connector.py);
its batch and timer are shared with bench_partition."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from speechlm.models.connectors import build_connector

#: (label, connector config) of every connector timed
RUNS = (
    ("ssr blockwise k=1", {"name": "ssr", "stack": 1, "mask": "blockwise"}),
    ("ssr blockwise k=4", {"name": "ssr", "stack": 4, "mask": "blockwise"}),
    ("ssr causal    k=1", {"name": "ssr", "stack": 1, "mask": "causal"}),
    ("ssr causal    k=4", {"name": "ssr", "stack": 4, "mask": "causal"}),
    ("stack k=8", {"name": "stack"}),
    ("conv k=5", {"name": "conv"}),
    ("qformer 0.33 s", {"name": "qformer"}),
)


def make_batch(clips: int, seconds: float, rate_hz: float, d_enc: int, tokens_per_s: float, seed: int = 0):
    """Random features (B, 1, T, d_enc) and evenly spread, slightly jittered token boundaries (B, N)."""
    g = torch.Generator().manual_seed(seed)
    t = int(seconds * rate_hz)
    n = int(seconds * tokens_per_s)
    feats = torch.randn(clips, 1, t, d_enc, generator=g)
    base = torch.linspace(0, t - 1, n + 1)[1:]
    jitter = torch.randint(-3, 4, (clips, n), generator=g)
    bnd = (base[None] + jitter).clamp(0, t - 1).long().sort(1).values
    bnd[:, -1] = t - 1
    return feats, torch.full((clips,), t), bnd, torch.ones(clips, n, dtype=torch.bool)


def time_fwd_bwd(conn: torch.nn.Module, batch, repeats: int) -> float:
    """Median seconds of one forward+backward (after one warm-up)."""
    times = []
    for i in range(repeats + 1):
        conn.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = conn(*batch)
        out.embeds.square().mean().backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> None:
    """Time every connector of :data:`RUNS` on one batch; print a line each."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = make_batch(args.clips, args.seconds, args.rate_hz, args.d_enc, args.tokens_per_s)
    common = {"d_enc": args.d_enc, "d_llm": args.d_llm, "frame_rate_hz": args.rate_hz}
    print(f"batch: {args.clips} clips x {args.seconds} s at {args.rate_hz} Hz = {batch[0].shape[2]} frames, "
          f"{batch[2].shape[1]} tokens/clip, d_enc {args.d_enc} -> d_llm {args.d_llm}, {args.threads} thread(s)")
    for label, cfg in RUNS:
        conn = build_connector({**common, **cfg}).train()
        n_params = sum(p.numel() for p in conn.parameters())
        sec = time_fwd_bwd(conn, batch, args.repeats)
        print(f"{label:20s} params {n_params / 1e6:6.2f} M   fwd+bwd {sec * 1000:8.1f} ms")
