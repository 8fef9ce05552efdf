"""Aligner kinds as classes (alignment.kinds): one is picked from the config's ``kind`` and does what differs
between charCTC, subCTC and CIF; saved folders keep their format."""

from __future__ import annotations

import json

import pytest
import torch
from alignment_helpers import byte_level_bpe, peaky_posteriors

from alignment.aligner import Aligner, load_aligner_model
from alignment.cif import CIFAligner
from alignment.ctc_model import CTCAligner
from alignment.kinds import CIF, KINDS, CharCTC, SubCTC, folder_kind, kind_of, model_kind
from speechlm.errors import ModelError

COMMON = {"input_dim": 16, "num_input_layers": 1, "d_model": 32, "layers": 1, "heads": 2, "ff_mult": 2,
          "dropout": 0.0, "encoder_name": "tiny", "encoder_layers": [-1], "frame_rate_hz": 50.0}


@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe()


def test_kinds_by_name():
    assert set(KINDS) == {"charCTC", "subCTC", "CIF"}
    assert isinstance(kind_of("charCTC"), CharCTC) and isinstance(kind_of("subCTC"), SubCTC)
    assert isinstance(kind_of("CIF"), CIF)
    assert [k.uses_tokenizer for k in (kind_of("charCTC"), kind_of("subCTC"), kind_of("CIF"))] == [False, True, True]
    with pytest.raises(ModelError, match="charCTX"):
        kind_of("charCTX")


@pytest.mark.parametrize("name, cls", [("charCTC", CTCAligner), ("subCTC", CTCAligner), ("CIF", CIFAligner)])
def test_each_kind_builds_saves_and_loads_its_model(tmp_path, bpe, name, cls):
    kind = kind_of(name)
    torch.manual_seed(0)
    model = kind.build(bpe, **COMMON).eval()
    assert isinstance(model, cls) and model.config.kind == name and model_kind(model) is kind
    folder = tmp_path / name
    kind.save(model, folder, bpe)
    # the folder format: config.json + model.safetensors, tokenizer/ only for the subword kinds
    assert json.loads((folder / "config.json").read_text())["kind"] == name
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer").is_dir() == kind.uses_tokenizer
    assert folder_kind(folder) is kind
    loaded = load_aligner_model(folder)
    assert type(loaded) is cls and loaded.config == model.config
    feats, lengths = torch.randn(2, 1, 20, 16), torch.tensor([20, 13])
    with torch.no_grad():
        torch.testing.assert_close(kind.frame_outputs(loaded, feats, lengths), kind.frame_outputs(model, feats, lengths))
    assert (kind.load_tokenizer(folder) is None) == (not kind.uses_tokenizer)


def test_a_folder_without_kind_is_a_char_aligner(tmp_path, bpe):
    """Folders written before the kind was recorded (config.json without ``kind``) still load as charCTC."""
    model = kind_of("charCTC").build(None, **COMMON)
    model.save_pretrained(tmp_path / "old")
    cfg_path = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["kind"]
    cfg_path.write_text(json.dumps(cfg))
    assert isinstance(folder_kind(tmp_path / "old"), CharCTC)
    aligner = Aligner.from_pretrained(tmp_path / "old", bpe)
    assert isinstance(aligner.kind, CharCTC) and aligner.sub_tokenizer is None


def test_training_targets_and_losses(bpe):
    text = "the cat sat"
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    char = kind_of("charCTC").build(None, **COMMON)
    assert kind_of("charCTC").targets(char, "The cat, sat!", None) == char.text_to_labels("the cat sat")
    assert kind_of("subCTC").targets(None, text, bpe) == [i + 1 for i in ids]      # 0 is the blank
    assert kind_of("CIF").targets(None, text, bpe) == ids                          # no blank
    torch.manual_seed(0)
    feats, lengths = torch.randn(2, 1, 40, 16), torch.tensor([40, 30])
    for name in KINDS:
        kind = kind_of(name)
        model = kind.build(bpe, **COMMON)
        labels = [kind.targets(model, t, bpe) for t in (text, "we sing")]
        loss = kind.loss(model, feats, lengths, labels, quantity_weight=1.0)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert model.body.in_proj.weight.grad is not None


def test_the_ctc_loss_is_the_mean_ctc_loss(bpe):
    kind = kind_of("charCTC")
    torch.manual_seed(0)
    model = kind.build(None, **COMMON)
    feats, lengths = torch.randn(2, 1, 30, 16), torch.tensor([30, 22])
    labels = [kind.targets(model, "a cat", None), kind.targets(model, "dog", None)]
    lp = model(feats, lengths)
    want = torch.nn.CTCLoss(blank=0, zero_infinity=True)(
        lp.transpose(0, 1), torch.tensor([x for lab in labels for x in lab]), lengths,
        torch.tensor([len(lab) for lab in labels]))
    torch.testing.assert_close(kind.loss(model, feats, lengths, labels, 1.0), want)


def test_the_aligner_decodes_through_its_kind(bpe):
    model = kind_of("charCTC").build(None, **COMMON)
    path = [0]
    for lab in model.text_to_labels("hi yo"):
        path += [lab, 0]
    lp = torch.from_numpy(peaky_posteriors(path, model.config.vocab_size))
    aligner = Aligner(model, bpe)
    assert aligner.decode(lp) == "hi yo"
    assert aligner.align_posteriors(lp, None, "u").text == "hi yo"
    with pytest.raises(ModelError, match="subCTC aligner needs the tokenizer"):
        Aligner(kind_of("subCTC").build(bpe, **COMMON), bpe)
