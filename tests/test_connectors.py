"""Connectors: shapes and masks, the SSR blockwise mask and read-out, stacking, layer fusion."""

import math

import pytest
import torch

from speechlm.errors import AlignmentError
from speechlm.models.connectors import LayerFusion, build_connector
from speechlm.models.connectors.base import stack_frames
from speechlm.models.connectors.ssr import attention_mask

D_ENC, D_LLM = 16, 24


def small(name, **kw):
    extra = {"d_model": 32, "n_heads": 4} if name in ("ssr", "qformer") else {"hidden": 32}
    return build_connector({"name": name, "d_enc": D_ENC, "d_llm": D_LLM, **extra, **kw})


def batch(t=60, lengths=(60, 37), n_layers=1):
    feats = torch.randn(len(lengths), n_layers, t, D_ENC)
    lengths = torch.tensor(lengths)
    for b, n in enumerate(lengths):
        feats[b, :, n:] = 0  # zero-padded in T, as the encoder gives them
    # Row 0: a zero-length segment (10, 10) and a trailing segment after 52; row 1: two padded tokens.
    bnd = torch.tensor([[5, 10, 10, 30, 52], [3, 20, 36, 0, 0]])
    tmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return feats, lengths, bnd, tmask


@pytest.mark.parametrize("name,per_out", [("stack", 8), ("conv", 5), ("qformer", 17)])
def test_baseline_shapes_and_masks(name, per_out):
    conn = small(name).eval()
    feats, lengths, bnd, tmask = batch()
    out = conn(feats, lengths, bnd, tmask)
    n = math.ceil(60 / per_out)
    assert out.embeds.shape == (2, n, D_LLM)
    assert out.mask.tolist() == [[True] * n, [i < math.ceil(37 / per_out) for i in range(n)]]
    assert torch.all(out.embeds[~out.mask] == 0) and torch.isfinite(out.embeds).all()
    assert abs(conn.output_rate_hz - 50 / per_out) < 1e-9


@pytest.mark.parametrize("name", ["ssr", "stack", "conv", "qformer"])
def test_padding_does_not_change_outputs(name):
    conn = small(name, n_enc_layers=2).eval()
    feats, lengths, bnd, tmask = batch(n_layers=2)
    out = conn(feats, lengths, bnd, tmask)
    alone = conn(feats[1:, :, :37], lengths[1:], bnd[1:, :3], tmask[1:, :3])
    n = int(alone.mask.sum())
    assert torch.allclose(out.embeds[1, :n], alone.embeds[0, :n], atol=1e-5)
    assert out.mask[1].sum() == n


def test_ssr_shapes_and_masks():
    conn = small("ssr").eval()
    feats, lengths, bnd, tmask = batch()
    out = conn(feats, lengths, bnd, tmask)
    assert out.embeds.shape == (2, 5, D_LLM)
    assert torch.equal(out.mask, tmask)
    assert torch.all(out.embeds[1, 3:] == 0) and torch.isfinite(out.embeds).all()
    # A zero-length segment reads the same frame as its predecessor: identical vectors.
    assert torch.equal(out.embeds[0, 1], out.embeds[0, 2])


def brute_force_blockwise(bnd, tmask, lengths, t):
    allowed = torch.zeros(len(lengths), t, t, dtype=torch.bool)
    for b in range(len(lengths)):
        ends = [int(x) for x, m in zip(bnd[b], tmask[b]) if m]
        # Segments (b_{i-1}, b_i], then the trailing one; remember each segment's previous boundary.
        segs, start, prev = [], 0, None
        for e in ends:
            segs.append((start, e, prev))
            start, prev = e + 1, e
        segs.append((start, t - 1, prev))
        for q in range(t):
            for lo, hi, p in segs:
                if lo <= q <= hi:
                    for k in range(int(lengths[b])):
                        if lo <= k <= hi or k == p:
                            allowed[b, q, k] = True
            allowed[b, q, q] = True
    return allowed


def test_blockwise_mask_equals_brute_force():
    _, lengths, bnd, tmask = batch()
    t = 60
    padded = torch.where(tmask, bnd, torch.full_like(bnd, t))
    assert torch.equal(attention_mask("blockwise", lengths, t, padded, tmask),
                       brute_force_blockwise(bnd, tmask, lengths, t))


def test_causal_mask_equals_brute_force():
    lengths = torch.tensor([7, 4])
    expected = torch.zeros(2, 7, 7, dtype=torch.bool)
    for b in range(2):
        for q in range(7):
            for k in range(q + 1):
                expected[b, q, k] = k < lengths[b] or k == q
    assert torch.equal(attention_mask("causal", lengths, 7), expected)


def test_readout_picks_boundary_frames():
    # No compressor layers: output i must be proj(norm(adapter(frame b_i))) exactly.
    conn = small("ssr", n_layers=0).eval()
    feats, lengths, bnd, tmask = batch()
    out = conn(feats, lengths, bnd, tmask)
    for b in range(2):
        for i in range(int(tmask[b].sum())):
            frame = feats[b, 0, bnd[b, i]]
            assert torch.allclose(out.embeds[b, i], conn.proj(conn.norm(conn.adapter(frame))), atol=1e-6)


def test_mean_readout_averages_the_segment():
    conn = small("ssr", n_layers=0, readout="mean").eval()
    feats, lengths, bnd, tmask = batch()
    out = conn(feats, lengths, bnd, tmask)
    h = conn.adapter(feats[0, 0])
    spans = [(0, 5), (6, 10), (10, 10), (11, 30), (31, 52)]  # the zero-length token uses frame 10
    for i, (lo, hi) in enumerate(spans):
        assert torch.allclose(out.embeds[0, i], conn.proj(conn.norm(h[lo:hi + 1].mean(0))), atol=1e-5)


@pytest.mark.parametrize("mask", ["blockwise", "causal"])
def test_outputs_depend_only_on_allowed_frames(mask):
    conn = small("ssr", n_layers=1, mask=mask).eval()
    feats, lengths, bnd, tmask = batch()
    feats.requires_grad_(True)
    out = conn(feats, lengths, bnd, tmask)
    ends = bnd[0].tolist()
    for i, e in enumerate(ends):
        (g,) = torch.autograd.grad(out.embeds[0, i].sum(), feats, retain_graph=True)
        used = (g[0, 0].abs().sum(-1) > 0).nonzero().squeeze(1).tolist()
        if mask == "causal":
            expected = list(range(e + 1))
        else:
            start = ends[i - 1] + 1 if i else 0
            expected = sorted(set(range(start, e + 1)) | ({ends[i - 1]} if i else set()))
            if start > e:  # zero-length segment: the predecessor's read frame and its inputs
                expected = sorted(set(range(ends[i - 2] + 1 if i > 1 else 0, e + 1)) | ({ends[i - 2]} if i > 1 else set()))
        assert used == expected, (i, used, expected)
        assert g[1].abs().sum() == 0  # other rows of the batch never leak in


def test_stacking_converts_boundaries():
    k = 4
    conn = small("ssr", n_layers=0, stack=k).eval()
    feats, lengths, bnd, tmask = batch()
    out = conn(feats, lengths, bnd, tmask)
    for b in range(2):
        for i in range(int(tmask[b].sum())):
            j = int(bnd[b, i]) // k  # the stacked frame holding the boundary
            frame = torch.cat([feats[b, 0, j * k + r] for r in range(k)])  # brute-force concatenation
            assert torch.allclose(out.embeds[b, i], conn.proj(conn.norm(conn.adapter(frame))), atol=1e-6)
    x, new_len = stack_frames(torch.randn(2, 10, 3), torch.tensor([10, 5]), 4)
    assert x.shape == (2, 3, 12) and new_len.tolist() == [3, 2]


def test_ssr_with_rope_and_dropout_runs():
    conn = small("ssr", rope=True, dropout=0.1)
    feats, lengths, bnd, tmask = batch()
    out = conn(feats, lengths, bnd, tmask)
    out.embeds.sum().backward()
    assert all(p.grad is not None for p in conn.parameters())


def test_layer_fusion():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(LayerFusion(1)(x[:, :1]), x[:, 0])
    fusion = LayerFusion(3)
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    w = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0)
    assert torch.allclose(fusion(x), w[0] * x[:, 0] + w[1] * x[:, 1] + w[2] * x[:, 2], atol=1e-6)
    with pytest.raises(ValueError):
        fusion(x[:, :2])


def test_bad_boundaries_raise():
    conn = small("ssr")
    feats, lengths, _, tmask = batch()
    with pytest.raises(AlignmentError, match="row 1"):
        conn(feats, lengths, torch.tensor([[5, 10, 10, 30, 52], [3, 20, 37, 0, 0]]), tmask)  # 37 >= 37 frames
    with pytest.raises(AlignmentError, match="decreasing"):
        conn(feats, lengths, torch.tensor([[5, 4, 10, 30, 52], [3, 20, 36, 0, 0]]), tmask)
    with pytest.raises(ValueError):
        conn(feats, lengths, None, None)


def test_slot_readout_separates_tokens_sharing_a_frame():
    # Stack 4: boundaries 9 and 10 both fall in stacked frame 2, 10 and 10 share exactly.
    feats, lengths, _, tmask = batch()
    bnd = torch.tensor([[5, 9, 10, 10, 52], [3, 20, 36, 0, 0]])
    plain = small("ssr", n_layers=1, stack=4).eval()
    out = plain(feats, lengths, bnd, tmask).embeds
    assert torch.equal(out[0, 1], out[0, 2]) and torch.equal(out[0, 2], out[0, 3])  # the defect: one vector
    conn = small("ssr", n_layers=1, stack=4, slot_readout=True).eval()
    rank, shared_next, offset = conn.slots(bnd, torch.div(bnd, 4, rounding_mode="floor"), tmask)
    assert rank[0].tolist() == [0, 0, 1, 2, 0] and shared_next[0].tolist() == [0, 1, 1, 0, 0]
    assert offset[0].tolist() == [1, 1, 2, 2, 0]
    assert rank[1].tolist() == [0, 0, 0, 0, 0]  # padding never counts as sharing
    out = conn(feats, lengths, bnd, tmask).embeds
    for i, j in ((1, 2), (2, 3), (1, 3)):
        assert not torch.allclose(out[0, i], out[0, j], atol=1e-4)
    # Tokens that share nothing still depend only on their own read-out frame.
    feats2 = feats.clone()
    feats2[0, :, 56:] += 1.0  # frames after the last read-out frame (52 // 4 = 13 covers 52-55)
    out2 = conn(feats2, lengths, bnd, tmask).embeds
    assert torch.allclose(out[0], out2[0], atol=1e-6)
    # Trainable: the slot parameters get gradients.
    conn.train()
    conn(feats, lengths, bnd, tmask).embeds.sum().backward()
    assert conn.slot_rank.weight.grad.abs().sum() > 0 and conn.head.down.weight.grad.abs().sum() > 0
