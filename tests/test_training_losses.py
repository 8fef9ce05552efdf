"""Losses and the LR schedule against hand computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from speechlm.training.losses import (
    IGNORE,
    distill_loss,
    nearest_token_accuracy,
    next_token_loss,
    prefix_ntp_loss,
    speech_ntp_loss,
    text_ntp_loss,
)
from speechlm.training.schedule import lr_factor, warmup_cosine


def test_distill_loss_matches_hand_computation():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # third token is padding
    target = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [-9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    loss, parts = distill_loss(pred, target, mask)
    # token 0: squared error 1, cosine 1/sqrt(2); token 1: squared error 1, cosine 1
    mse = (1.0 + 1.0) / 2
    cos = (1 / math.sqrt(2) + 1.0) / 2
    assert parts["mse"].item() == pytest.approx(mse)
    assert parts["cosine"].item() == pytest.approx(cos)
    assert loss.item() == pytest.approx(mse + 5 * (1 - cos))
    loss2, _ = distill_loss(pred, target, mask, mse_weight=0.5, cosine_weight=2.0)
    assert loss2.item() == pytest.approx(0.5 * mse + 2 * (1 - cos))


def test_distill_loss_gradient_ignores_padding():
    pred = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    loss, _ = distill_loss(pred, torch.randn(2, 4, 8), mask)
    loss.backward()
    assert pred.grad[0, 2:].abs().sum() == 0
    assert pred.grad[1].abs().sum() > 0


def test_next_token_loss_is_shifted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10)
    labels = torch.tensor([[1, 2, 3, IGNORE], [IGNORE, 5, 6, 7]])
    loss, n = next_token_loss(logits, labels)
    # position p predicts labels[p + 1]
    terms = [(0, 0, 2), (0, 1, 3), (1, 0, 5), (1, 1, 6), (1, 2, 7)]
    manual = sum(-F.log_softmax(logits[b, p], -1)[t] for b, p, t in terms) / len(terms)
    assert n == 5
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


def _recording_logits(vocab: int):
    seen = {}

    def fn(inputs_embeds, attention_mask):
        seen["inputs"], seen["mask"] = inputs_embeds, attention_mask
        torch.manual_seed(1)
        return torch.randn(*inputs_embeds.shape[:2], vocab)

    return fn, seen


def test_speech_ntp_position_i_predicts_token_i_plus_1_with_bos_context():
    vocab, d = 12, 4
    embeds = torch.randn(1, 3, d)
    ids = torch.tensor([[4, 7, 9]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    bos = torch.randn(1, d)
    fn, seen = _recording_logits(vocab)
    loss, n = speech_ntp_loss(fn, embeds, ids, mask, prefix_embeds=bos)
    assert torch.equal(seen["inputs"][0, 0], bos[0]) and torch.equal(seen["inputs"][0, 1:], embeds[0])
    logits = fn(seen["inputs"], seen["mask"])
    # positions: 0 = BOS (predicts nothing), 1 = token 0's vector -> predicts 7, 2 = token 1's -> 9
    manual = -(F.log_softmax(logits[0, 1], -1)[7] + F.log_softmax(logits[0, 2], -1)[9]) / 2
    assert n == 2
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_text_ntp_scores_the_same_targets_as_speech():
    vocab, d = 12, 4
    table = torch.randn(vocab, d)
    ids = torch.tensor([[4, 7, 9, 0]])
    mask = torch.tensor([[True, True, True, False]])
    fn, seen = _recording_logits(vocab)
    loss_t, n_t = text_ntp_loss(fn, lambda x: table[x], ids, mask)
    assert torch.equal(seen["inputs"][0, :3], table[[4, 7, 9]])
    loss_s, n_s = speech_ntp_loss(fn, table[ids], ids, mask)
    assert n_t == n_s == 2
    assert loss_t.item() == pytest.approx(loss_s.item())


def test_prefix_ntp_packs_speech_then_transcript_and_matches_per_row_losses():
    """Baselines: [BOS][real speech vectors][transcript]; padding of either part never sits between them."""
    vocab, d = 12, 4
    table = torch.randn(vocab, d)
    speech = torch.randn(2, 3, d)
    smask = torch.tensor([[True, True, True], [True, False, False]])
    ids = torch.tensor([[4, 7, 9], [5, 6, 0]])
    tmask = torch.tensor([[True, True, True], [True, True, False]])
    bos = torch.randn(1, d)
    lm = torch.nn.Linear(d, vocab)  # a "causal LM" that looks at one position: enough to check the wiring

    def fn(inputs, attn):
        fn.inputs, fn.attn = inputs, attn
        return lm(inputs)

    loss, n, rest = prefix_ntp_loss(fn, speech, smask, ids, tmask, bos, lambda x: table[x])
    assert n == 5
    # row 1: BOS, one speech vector, tokens 5, 6, then padding
    assert torch.equal(fn.inputs[1, :4], torch.cat([bos, speech[1, :1], table[[5, 6]]]))
    assert fn.attn[1].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert fn.attn[0].tolist() == [1] * 7

    def nll(x, t):
        return -F.log_softmax(lm(x), -1)[t]

    rows = [(torch.cat([bos, speech[0], table[[4, 7, 9]]]), [4, 7, 9], 4), (fn.inputs[1, :4], [5, 6], 2)]
    terms, later = [], []
    for x, toks, start in rows:  # position start-1+j predicts token j
        for j, t in enumerate(toks):
            terms.append(nll(x[start - 1 + j], t))
            if j:
                later.append(terms[-1])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert rest.item() == pytest.approx(torch.stack(later).mean().item(), rel=1e-5)
    loss.backward()
    assert lm.weight.grad is not None


def test_nearest_token_accuracy_uses_cosine():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    vectors = torch.tensor([[[0.1, 0.0], [5.0, 4.0], [0.0, -1.0]]])  # nearest by cosine: 0, 2, none right
    ids = torch.tensor([[0, 2, 1]])
    correct, total = nearest_token_accuracy(vectors, table, ids, torch.ones(1, 3, dtype=torch.bool))
    assert (correct, total) == (2, 3)
    correct, total = nearest_token_accuracy(vectors, table, ids, torch.tensor([[True, False, False]]), chunk=1)
    assert (correct, total) == (1, 1)


def test_schedule_warmup_cosine_floor():
    assert lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110) == pytest.approx(0.2 + 0.8 * 0.5)  # half-way through the cosine
    assert lr_factor(110, 10, 110) == pytest.approx(0.2)
    assert lr_factor(500, 10, 110) == pytest.approx(0.2)
    assert lr_factor(0, 0, 100, floor=0.0) == pytest.approx(1.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = warmup_cosine(opt, 2, 10)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])
    assert lrs[10] == pytest.approx(2e-4) and lrs[11] == pytest.approx(2e-4)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))  # non-increasing after the warm-up
