"""Loading the frozen LLM: stage 1 reads only the input-embedding table; stage 2 loads in the training precision."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from training_helpers import make_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel

from speechlm.models.connectors.base import llm_identity
from speechlm.training import build
from speechlm.training.deepspeed_engine import EngineConfig, train_dtype

VOCAB = 29  # the helpers' word-level tokenizer: 4 specials + 25 words


def _config(tied: bool) -> LlamaConfig:
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)


def _save(folder: Path, tied: bool, shard: str | None = None, model_cls=LlamaForCausalLM,
          safe: bool = True) -> Path:
    torch.manual_seed(0)
    make_tokenizer(folder)
    model = model_cls(_config(tied))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, safe_serialization=safe, **kw)
    return folder


def _full_table(folder: Path) -> torch.Tensor:
    llm, _ = build.load_llm(str(folder))
    return llm.get_input_embeddings().weight.detach()


def _forbid_full_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the full LLM was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_embedding_only_load_equals_the_full_models_table(tmp_path, monkeypatch, tied, shard):
    folder = _save(tmp_path / "llm", tied, shard)
    if shard:  # really split over several files, found through model.safetensors.index.json
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*.safetensors"))) > 2
    full = _full_table(folder)
    full_llm, _ = build.load_llm(str(folder))
    if tied:
        assert full_llm.get_output_embeddings().weight is full_llm.get_input_embeddings().weight
    _forbid_full_load(monkeypatch)
    stub, tokenizer = build.load_llm_embeddings(str(folder))
    table = stub.get_input_embeddings().weight
    assert table.shape == (VOCAB, 32) and not table.requires_grad
    assert torch.equal(table.float(), full) and table.float().view(torch.int32).equal(full.view(torch.int32))
    assert llm_identity(stub) == llm_identity(full_llm)  # what the connector records about its LLM
    assert len(tokenizer) == VOCAB


def test_tied_checkpoint_holding_only_the_output_head_name(tmp_path, monkeypatch):
    """A tied checkpoint may keep the shared table under lm_head.weight: it is the input table too."""
    from safetensors.torch import load_file, save_file

    folder = _save(tmp_path / "llm", tied=True)
    full = _full_table(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _forbid_full_load(monkeypatch)
    stub, _ = build.load_llm_embeddings(str(folder))
    assert torch.equal(stub.get_input_embeddings().weight, full)


def test_base_model_checkpoint_without_the_prefix(tmp_path, monkeypatch):
    folder = _save(tmp_path / "llm", tied=False, model_cls=LlamaModel)  # keys "embed_tokens.weight", ...
    want = LlamaModel.from_pretrained(folder).get_input_embeddings().weight.detach()
    _forbid_full_load(monkeypatch)
    stub, _ = build.load_llm_embeddings(str(folder))
    assert torch.equal(stub.get_input_embeddings().weight, want)


def test_non_safetensors_folder_falls_back_to_the_full_load_and_says_so(tmp_path, caplog):
    folder = _save(tmp_path / "llm", tied=False, safe=False)  # pytorch_model.bin
    assert not list(folder.glob("*.safetensors"))
    full = _full_table(folder)
    with caplog.at_level(logging.WARNING, logger="speechlm.training.build"):
        stub, _ = build.load_llm_embeddings(str(folder))
    assert torch.equal(stub.get_input_embeddings().weight, full)
    assert any("loading the whole LLM" in r.getMessage() for r in caplog.records)


def test_stage1_connector_from_the_table_equals_the_one_from_the_full_model(tmp_path, monkeypatch):
    """Same seed, same config: the connector made from the stand-in is bit-identical (mean-embedding init)."""
    from speechlm.training.configs import ModelConfig

    folder = _save(tmp_path / "llm", tied=False, shard="20KB")
    enc = build.EncoderFacts("enc", [2], 16, 50.0, 16_000)
    cfg = ModelConfig(llm=str(folder))
    full, _ = build.load_llm(str(folder))
    torch.manual_seed(3)
    want = build.make_connector(cfg, enc, full).state_dict()
    _forbid_full_load(monkeypatch)
    stub, _ = build.load_llm_embeddings(str(folder))
    torch.manual_seed(3)
    got = build.make_connector(cfg, enc, stub).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_load_llm_in_the_training_precision(tmp_path):
    folder = _save(tmp_path / "llm", tied=False)
    assert train_dtype(EngineConfig()) == torch.float32  # CPU: no bf16 training, the LLM stays fp32
    full, _ = build.load_llm(str(folder))
    half, _ = build.load_llm(str(folder), torch.bfloat16)
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in half.parameters()) and not half.training
    # stored fp32 -> bf16 is one rounding of the same weights
    assert torch.equal(half.get_input_embeddings().weight, full.get_input_embeddings().weight.bfloat16())
