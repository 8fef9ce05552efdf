"""CIF aligner: integration weights, firing frames, loss, free/forced alignment through the Aligner, save/load."""

from __future__ import annotations

import pytest
import torch
from alignment_helpers import byte_level_bpe

from alignment.aligner import Aligner, load_aligner_model
from alignment.cif import (
    CIFAligner,
    cif_config,
    cif_loss,
    cif_spans,
    fire,
    free_token_count,
    integration_weights,
)
from speechlm.errors import AlignmentError


@pytest.fixture(scope="module")
def tok():
    return byte_level_bpe()


def test_integration_weights_split_frames_between_tokens():
    alpha = torch.tensor([[0.2, 0.5, 0.6, 0.3, 0.4, 0.0]])
    w = integration_weights(alpha, 2)[0]
    # running sum 0.2 0.7 1.3 1.6 2.0 2.0: frame 2 gives 0.3 to token 0 and 0.3 to token 1
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.5, 0.3, 0.0, 0.0, 0.0],
                                                [0.0, 0.0, 0.3, 0.3, 0.4, 0.0]]))
    starts, ends = fire(alpha[0].numpy(), 2, start_share=0.05)
    assert ends.tolist() == [2, 4] and starts.tolist() == [0, 2]
    assert free_token_count(alpha[0].numpy(), 0.5) == 2
    assert free_token_count(torch.tensor([0.9, 0.7]).numpy(), 0.5) == 2     # 1.6: tail 0.6 fires
    assert free_token_count(torch.tensor([0.9, 0.4]).numpy(), 0.5) == 1


def _tiny(tok) -> CIFAligner:
    torch.manual_seed(0)
    return CIFAligner(cif_config(tok, input_dim=16, d_model=32, layers=1, heads=2, dropout=0.0,
                                 encoder_name="tiny")).eval()


def test_loss_trains_the_count(tok):
    model = _tiny(tok).train()
    feats, lengths = torch.randn(2, 1, 30, 16), torch.tensor([30, 24])
    ids = [tok("the cat sat", add_special_tokens=False)["input_ids"], tok("a dog", add_special_tokens=False)["input_ids"]]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, parts = cif_loss(model, feats, lengths, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else parts
    assert parts["quantity"] < 0.5 * first["quantity"] and parts["ce"] < first["ce"]
    alpha, _ = model.eval()(feats, lengths)
    assert alpha[1, 24:].abs().sum() == 0                                   # padding never fires


def test_forced_and_free_alignment_through_the_aligner(tok, tmp_path):
    model = _tiny(tok)
    model.save_pretrained(tmp_path / "cif", tokenizer=tok)
    loaded = load_aligner_model(tmp_path / "cif")
    assert isinstance(loaded, CIFAligner) and loaded.config == model.config
    aligner = Aligner.from_pretrained(tmp_path / "cif", llm_tokenizer=tok)
    feats, lengths = torch.randn(1, 1, 40, 16), torch.tensor([40])
    text = "the cat sat."
    forced = aligner.align(feats, lengths, [text], ["c0"])[0]
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    assert forced.mode == "forced" and len(forced.token_boundaries) == n_tokens
    assert all(0 <= b < 40 for b in forced.token_boundaries)
    assert forced.token_boundaries == sorted(forced.token_boundaries)
    out = aligner.frame_outputs(feats, lengths)[0]
    spans, vectors = cif_spans(out, n_tokens, model.config)
    assert vectors.shape == (n_tokens, 32) and spans.end_frames[-1] <= 39
    cat = tok(" the", add_special_tokens=False)["input_ids"]
    assert len(cat) == 1
    with torch.no_grad():        # make the random model fire 40 * sigmoid(-2.5) ~ 3 tokens, all " the"
        model.weight_head.bias.fill_(-2.5)
        model.weight_head.weight.zero_()
        model.token_head.bias[cat[0]] = 100.0
    free = Aligner(model, tok, sub_tokenizer=tok).align(feats, lengths, [None], ["c0"])[0]
    assert free.mode == "free" and free.text == "the the the"
    assert len(free.token_ids) == len(free.token_boundaries) == 3
    with pytest.raises(AlignmentError, match="c-short"):
        aligner.align(feats[:, :, :3], torch.tensor([3]), ["a long transcript here"], ["c-short"])
