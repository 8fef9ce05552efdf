"""Partition-and-fusion block: shapes, exact parameter counts, gradients per group, the off switch, save/load."""

import pytest
import torch
from torch import nn

from speechlm.models.connectors import build_connector, load_connector
from speechlm.models.connectors.partition import PartitionFusion
from speechlm.models.connectors.ssr import SwiGLU

D_ENC, D_LLM = 16, 24


def small(name, **kw):
    extra = {"d_model": 32, "n_heads": 4} if name in ("ssr", "qformer") else {"hidden": 32}
    return build_connector({"name": name, "d_enc": D_ENC, "d_llm": D_LLM, **extra, **kw})


def batch(t=60, lengths=(60, 37)):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(lengths), 1, t, D_ENC, generator=g)
    for b, n in enumerate(lengths):
        feats[b, :, n:] = 0
    bnd = torch.tensor([[5, 10, 10, 30, 52], [3, 20, 36, 0, 0]])
    tmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return feats, torch.tensor(lengths), bnd, tmask


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("act,bias,frames", [("swiglu", False, 1), ("gelu", True, 1), ("relu", True, 4)])
def test_block_shapes_and_exact_parameter_count(act, bias, frames):
    d_in, hidden, d_out, g = 32 * frames, 64, 24, 4
    pf = PartitionFusion(d_in, hidden, d_out, g, act, bias=bias, frames=frames)
    assert pf(torch.randn(3, 7, d_in)).shape == (3, 7, d_out)
    assert pf(torch.randn(d_in)).shape == (d_out,)
    # By hand: norm over [group, fused] (2 c_in), per group W_in (2 c_in x n_in h) and W_out (h x c_out), biases.
    c_in, c_out, h, n_in = d_in // g, d_out // g, hidden // g, (2 if act == "swiglu" else 1)
    expected = 2 * c_in + g * (2 * c_in * n_in * h + h * c_out) + (g * (n_in * h + c_out) if bias else 0)
    assert n_params(pf) == expected == PartitionFusion.param_count(d_in, hidden, d_out, g, act, bias)
    dense = (SwiGLU(d_in, hidden) if act == "swiglu" else
             nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, d_out, bias=bias)))
    assert n_params(pf) < n_params(dense)


def test_ssr_block_count_against_the_swiglu_it_replaces():
    d, g = 32, 4
    hidden = int(8 / 3 * d)  # 85: the per-group width floors to 21
    plain, pf = small("ssr", n_layers=1), small("ssr", n_layers=1, partition_groups=g)
    c, h = d // g, hidden // g
    assert n_params(plain.blocks[0].mlp) == 3 * d * hidden
    assert n_params(pf.blocks[0].mlp) == 2 * c + g * (2 * c * 2 * h + h * c) == 2 * 8 + 4 * (2 * 8 * 42 + 21 * 8)
    assert n_params(plain) - n_params(pf) == 3 * d * hidden - n_params(pf.blocks[0].mlp)


def test_groups_exchange_information_and_every_group_gets_gradients():
    torch.manual_seed(0)
    pf = PartitionFusion(16, 32, 16, 4, "swiglu")
    x = torch.randn(5, 16, requires_grad=True)
    y = pf(x)
    # Output group 0 depends on every input group (fused context), not only on its own channels.
    (gx,) = torch.autograd.grad(y[:, :4].sum(), x, retain_graph=True)
    assert all(gx[:, 4 * i:4 * (i + 1)].abs().sum() > 0 for i in range(4))
    y.square().sum().backward()
    for p in (pf.w_in, pf.w_out):
        assert all(p.grad[i].abs().sum() > 0 for i in range(4))  # every group's own weights learn
    assert pf.norm.weight.grad.abs().sum() > 0


def test_stacked_frames_are_grouped_by_channel():
    pf = PartitionFusion(2 * 8, 8, 8, 2, "relu", frames=2)
    x = torch.arange(16.0).view(1, 16)  # frame 0: 0..7, frame 1: 8..15
    groups = pf.split(x)
    assert groups[0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and groups[0, 1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


@pytest.mark.parametrize("name", ["ssr", "stack", "conv", "qformer"])
def test_off_reproduces_the_dense_connector(name):
    torch.manual_seed(0)
    ref = small(name).eval()
    for off in (0, 1):
        torch.manual_seed(0)
        conn = small(name, partition_groups=off).eval()
        assert {k: v.shape for k, v in conn.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert torch.equal(conn(*batch()).embeds, ref(*batch()).embeds)
        assert not any(isinstance(m, PartitionFusion) for m in conn.modules())


@pytest.mark.parametrize("name", ["ssr", "stack", "conv", "qformer"])
def test_connectors_with_partition_keep_shapes_shrink_and_train(name):
    plain = small(name).eval()
    conn = small(name, partition_groups=4).eval()
    assert any(isinstance(m, PartitionFusion) for m in conn.modules())
    feats, lengths, bnd, tmask = batch()
    a, b = plain(feats, lengths, bnd, tmask), conn(feats, lengths, bnd, tmask)
    assert a.embeds.shape == b.embeds.shape and torch.equal(a.mask, b.mask)
    assert torch.all(b.embeds[~b.mask] == 0) and torch.isfinite(b.embeds).all()
    assert n_params(conn) < n_params(plain)
    # Padding still changes nothing (row 1 alone gives the same vectors).
    alone = conn(feats[1:, :, :37], lengths[1:], bnd[1:, :3], tmask[1:, :3])
    n = int(alone.mask.sum())
    assert torch.allclose(b.embeds[1, :n], alone.embeds[0, :n], atol=1e-5)
    conn.train()
    conn(feats, lengths, bnd, tmask).embeds.square().mean().backward()
    missing = [k for k, p in conn.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("name", ["ssr", "stack", "qformer"])
def test_saved_connector_with_partition_loads_back(tmp_path, name):
    conn = small(name, partition_groups=2, n_enc_layers=1).eval()
    conn.save_pretrained(tmp_path / "c")
    back = load_connector(tmp_path / "c").eval()
    assert back.cfg.partition_groups == 2
    assert torch.equal(conn(*batch()).embeds, back(*batch()).embeds)


def test_bad_group_counts_raise_clearly():
    with pytest.raises(ValueError, match="partition_groups=3 must divide"):
        small("ssr", partition_groups=3)
    with pytest.raises(ValueError, match="must be 0"):
        small("stack", partition_groups=-2)
    with pytest.raises(ValueError, match="activation"):
        PartitionFusion(8, 8, 8, 2, "tanh")
