"""The optional objectives of issue 26: stage 1's sampled-softmax term and stage 2's behaviour distillation (KL)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from training_helpers import make_llm, make_tokenizer
from transformers import AutoModelForCausalLM

from speechlm.config import load_config
from speechlm.data.batching import Batch
from speechlm.errors import ConfigError
from speechlm.models.connectors.base import build_connector
from speechlm.models.speechlm import SpeechLM
from speechlm.training.configs import Stage1Config, Stage2Config
from speechlm.training.factory import stage1_module, stage2_module
from speechlm.training.losses import IGNORE, behaviour_kl, sampled_softmax_loss
from speechlm.training.stages import Stage1Distill, Stage2Finetune, TokenEmbedding


# ---------------------------------------------------------------------------------- sampled softmax
def test_sampled_softmax_with_every_row_drawn_is_the_full_softmax():
    torch.manual_seed(0)
    table, pred = torch.randn(40, 8), torch.randn(2, 5, 8)
    ids = torch.randint(0, 40, (2, 5))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    # 4,000 uniform draws out of 40 rows: every row is a candidate (P(a row is missed) ~ 1e-44).
    loss, parts = sampled_softmax_loss(pred, table, ids, mask, negatives=4000, temperature=0.1)
    logits = F.normalize(pred[mask], dim=-1) @ F.normalize(table, dim=-1).T / 0.1
    assert loss.item() == pytest.approx(F.cross_entropy(logits, ids[mask]).item(), rel=1e-5)
    assert parts["sampled_acc"].item() == pytest.approx((logits.argmax(-1) == ids[mask]).float().mean().item())


def test_sampled_softmax_is_small_on_the_rows_themselves_and_ignores_padding():
    torch.manual_seed(1)
    table = torch.randn(500, 16)
    ids = torch.randint(0, 500, (3, 4))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 2:] = False
    perfect, parts = sampled_softmax_loss(table[ids], table, ids, mask, negatives=64, temperature=0.05)
    assert parts["sampled_acc"].item() == 1.0 and perfect.item() < 0.05
    noisy = table[ids].clone()
    noisy[2, 2:] = torch.randn(2, 16) * 100  # padding: must not count
    assert sampled_softmax_loss(noisy, table, ids, mask, 64, 0.05)[0].item() < 0.05
    empty, _ = sampled_softmax_loss(table[ids], table, ids, torch.zeros_like(mask), 64, 0.05)
    assert empty.item() == 0.0


def test_sampled_softmax_gradient_moves_a_vector_towards_its_row_and_away_from_its_rival():
    torch.manual_seed(2)
    table = F.normalize(torch.randn(50, 8), dim=-1)
    ids = torch.tensor([[7]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    pred = (0.6 * table[7] + 0.8 * table[9])[None, None].clone().requires_grad_(True)  # nearer row 9: wrong
    opt = torch.optim.SGD([pred], lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        sampled_softmax_loss(pred, table, ids, mask, negatives=200, temperature=0.1)[0].backward()
        opt.step()
    sims = F.normalize(pred.detach()[0, 0], dim=-1) @ table.T
    assert int(sims.argmax()) == 7  # the nearest row is now its own


# ------------------------------------------------------------------------------------- behaviour KL
def test_behaviour_kl_is_zero_for_equal_logits_and_counts_only_trained_positions():
    torch.manual_seed(3)
    teacher = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), IGNORE)
    labels[0, 2:5] = 1
    labels[1, 3] = 4  # trained targets: positions 1-3 of row 0 predict them, position 2 of row 1
    assert behaviour_kl(teacher.clone(), teacher, labels).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 6, 11)
    kl = behaviour_kl(student, teacher, labels)
    keep = [(0, 1), (0, 2), (0, 3), (1, 2)]
    by_hand = sum(F.kl_div(F.log_softmax(student[b, p], -1), F.log_softmax(teacher[b, p], -1), log_target=True,
                           reduction="sum") for b, p in keep) / len(keep)
    assert kl.item() == pytest.approx(by_hand.item(), rel=1e-5)
    moved = student.clone()
    moved[0, 5] += 10  # a position that predicts nothing
    moved[1, 0] -= 3
    assert behaviour_kl(moved, teacher, labels).item() == pytest.approx(kl.item(), rel=1e-6)
    t2 = behaviour_kl(student, teacher, labels, temperature=2.0)
    assert t2.item() != pytest.approx(kl.item()) and t2.item() > 0
    assert behaviour_kl(student, teacher, torch.full((2, 6), IGNORE)).item() == 0.0


# --------------------------------------------------------------------------- configs and stage modules
def test_config_keys_are_typed_and_checked(tmp_path):
    cfg = load_config(Stage1Config, None, ["contrastive.weight=1", "contrastive.negatives=128"])
    assert cfg.contrastive.weight == 1.0 and cfg.contrastive.negatives == 128 and cfg.contrastive.temperature == 0.05
    assert load_config(Stage1Config, None, []).contrastive.weight == 0.0  # off by default
    with pytest.raises(ConfigError, match="temperature"):
        load_config(Stage1Config, None, ["contrastive.temperature=0"])
    with pytest.raises(ConfigError, match="contrastive"):
        load_config(Stage1Config, None, ["contrastive.wieght=1"])
    cfg2 = load_config(Stage2Config, None, ["kl.weight=0.5", "kl.temperature=2"])
    assert (cfg2.kl.weight, cfg2.kl.temperature) == (0.5, 2.0)
    with pytest.raises(ConfigError, match="kl"):
        load_config(Stage2Config, None, ["kl.weight=-1"])


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    tok = make_tokenizer(root)
    make_llm(root, vocab=len(tok))
    return AutoModelForCausalLM.from_pretrained(root)


def _connector(llm, name: str = "ssr"):
    size = {"d_model": 16, "n_heads": 2, "n_layers": 1} if name in ("ssr", "qformer") else {"hidden": 32}
    extra = {"mask": "causal"} if name == "ssr" else {}
    return build_connector({"name": name, "d_enc": 16, "d_llm": llm.config.hidden_size, **size, **extra})


def _batch(vocab: int) -> Batch:
    torch.manual_seed(3)
    ids = torch.randint(4, vocab, (2, 5))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    bnd = torch.tensor([[3, 7, 12, 20, 29], [4, 9, 14, 14, 14]])
    return Batch(["a", "b"], ids, mask, bnd, torch.randn(2, 1, 30, 16), torch.tensor([30, 15]))


def test_stage1_with_the_contrastive_term(llm):
    table = llm.get_input_embeddings().weight
    batch = _batch(table.shape[0])
    torch.manual_seed(0)
    conn = _connector(llm)
    plain = Stage1Distill(conn, TokenEmbedding(table)).train()
    base, m0 = plain(batch)
    assert "contrastive" not in m0
    cfg = load_config(Stage1Config, None, ["contrastive.weight=2", "contrastive.negatives=16"])
    module = stage1_module(cfg, conn, table).train()
    loss, m = module(batch)
    assert m["contrastive"] > 0 and 0 <= m["sampled_acc"] <= 1
    assert loss.item() == pytest.approx(base.item() + 2 * m["contrastive"], rel=1e-5)
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in conn.parameters() if p.requires_grad)
    assert module.embedding.weight.grad is None


def test_stage2_behaviour_kl_trains_the_connector_and_only_the_connector(llm):
    vocab = llm.get_input_embeddings().weight.shape[0]
    batch = _batch(vocab)
    slm = SpeechLM(_connector(llm), llm)
    plain = Stage2Finetune(slm, bos_id=1).train()
    base, m0 = plain(batch)
    cfg = load_config(Stage2Config, None, ["kl.weight=0.5"])
    module = stage2_module(cfg, slm, bos_id=1).train()
    loss, m = module(batch)
    assert m["loss_speech"] == pytest.approx(m0["loss_speech"], rel=1e-5) and m["kl"] > 0
    assert loss.item() == pytest.approx(base.item() + 0.5 * m["kl"], rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in slm.connector.parameters())
    assert all(p.grad is None for p in llm.parameters())


def test_stage2_kl_is_zero_when_the_speech_vectors_are_the_transcript_embeddings(llm):
    vocab = llm.get_input_embeddings().weight.shape[0]
    batch = _batch(vocab)
    module = Stage2Finetune(SpeechLM(_connector(llm), llm), bos_id=1, kl_weight=1.0).eval()
    with torch.no_grad():
        embeds = module.speechlm.llm_embed(batch.token_ids)
        loss, n, kl = module.speech_loss_and_kl(embeds, batch.token_ids, batch.token_mask)
    assert n == 4 + 2 and kl.item() == pytest.approx(0.0, abs=1e-5) and math.isfinite(loss.item())


def test_stage2_kl_refuses_a_connector_without_one_vector_per_token(llm):
    with pytest.raises(ConfigError, match="kl.weight"):
        Stage2Finetune(SpeechLM(_connector(llm, "stack"), llm), bos_id=1, kl_weight=1.0)
    with pytest.raises(ConfigError, match="kl.weight"):
        Stage2Finetune(SpeechLM(_connector(llm), llm), bos_id=1, kl_weight=1.0, objective="supervised")
