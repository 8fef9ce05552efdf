"""Multimodal attention merging (speechlm.models.merging, tools/merge_attention.py) on tiny random models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize
from transformers import (
    LlamaConfig,
    LlamaModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from speechlm.errors import ConfigError, ModelError
from speechlm.models.encoder import SpeechEncoder
from speechlm.models.merging import (
    LearnableMerge,
    find_attention_layers,
    interpolate,
    layer_map,
    merge_attention,
    train_merge_factors,
    whisper_asr_loss,
    whisper_collate,
    whisper_label_ids,
)
from speechlm.training.whisper_merge import learn_whisper_merge

ROOT = Path(__file__).resolve().parents[1]
POSITIONS = 50  # encoder input: 2 * 50 = 100 mel frames (1 s)
QKV = ("q_proj", "k_proj", "v_proj")


def tiny_whisper(d_model: int = 16, enc_layers: int = 2, dec_layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = WhisperConfig(d_model=d_model, encoder_layers=enc_layers, decoder_layers=dec_layers,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        num_mel_bins=80, max_source_positions=POSITIONS, vocab_size=100, max_target_positions=32,
                        pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
                        suppress_tokens=None, begin_suppress_tokens=None)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF initialises biases to zero: random ones make the bias checks mean something
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.1)
    return model


def mel(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 80, 2 * POSITIONS, generator=torch.Generator().manual_seed(seed))


def enc_out(model) -> torch.Tensor:
    with torch.no_grad():
        return model.get_encoder()(mel()).last_hidden_state


def attn(model, stack: str, i: int):
    return getattr(model.model, stack).layers[i].self_attn


def formula(t: torch.Tensor, s: torch.Tensor | None, a: float) -> torch.Tensor:
    s = torch.zeros_like(t) if s is None else s
    return ((1 - a) * t.double() + a * s.double()).to(t.dtype)


# ---------------------------------------------------------------------------------------------- layer map, math
def test_layer_map_rules():
    assert layer_map(6, 6, "same") == list(range(6))
    assert layer_map(2, 3, "same") == [0, 1]
    assert layer_map(2, 3, "spread") == [0, 2]
    assert layer_map(3, 5, "spread") == [0, 2, 4]
    assert layer_map(4, 2, "spread") == [0, 0, 1, 1]  # 0, 1/3, 2/3, 1 rounded half up
    assert layer_map(5, 3, "spread") == [0, 1, 1, 2, 2]  # 0, .5, 1, 1.5, 2
    assert layer_map(1, 4, "spread") == [0]
    with pytest.raises(ModelError, match="spread"):
        layer_map(3, 2, "same")
    with pytest.raises(ConfigError):
        layer_map(2, 2, "nearest")


def test_interpolate_exact_on_small_tensors():
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    s = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    assert torch.equal(interpolate(t, s, 0.25), torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    assert torch.equal(interpolate(t, None, 0.5), t / 2)  # a missing bias counts as zero
    assert interpolate(t, s, 0.0) is t
    assert torch.equal(interpolate(t, s, 1.0), s)
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    for a in (0.1, 0.3, 0.77):
        out = interpolate(t, s, a)
        assert out.dtype == torch.float32
        assert torch.equal(out, formula(t, s, a))
    h = t.half()
    assert interpolate(h, s, 0.3).dtype == torch.float16


# ---------------------------------------------------------------------------------------------- fixed merge
def test_factor_zero_is_bit_for_bit_identity():
    model = tiny_whisper()
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = enc_out(model)
    report = merge_attention(model, model, 0.0, ("q", "k", "v", "o"))
    assert report["factors"] == [0.0, 0.0]
    assert torch.equal(enc_out(model), before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_sd[k]), k


def test_factor_one_gives_source_weights_and_only_qkv_change():
    model = tiny_whisper()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = merge_attention(model, model, 1.0)
    assert report["target_modules"] == ["model.encoder.layers.0.self_attn", "model.encoder.layers.1.self_attn"]
    assert report["source_modules"] == ["model.decoder.layers.0.self_attn", "model.decoder.layers.1.self_attn"]
    for i in range(2):
        e, d = attn(model, "encoder", i), attn(model, "decoder", i)
        for p in QKV:
            assert torch.equal(getattr(e, p).weight, getattr(d, p).weight)
        assert e.k_proj.bias is None
        assert torch.equal(e.q_proj.bias, d.q_proj.bias) and torch.equal(e.v_proj.bias, d.v_proj.bias)
        assert not torch.equal(e.out_proj.weight, d.out_proj.weight)  # "o" not asked for
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".encoder.layers." in k and any(p in k for p in QKV) for k in changed)


def test_per_layer_factors_follow_the_formula():
    model = tiny_whisper()
    orig = tiny_whisper()  # same seed: same weights
    merge_attention(model, model, [0.0, 0.3], ("q", "k", "v", "o"))
    e0, o0 = attn(model, "encoder", 0), attn(orig, "encoder", 0)
    for p in (*QKV, "out_proj"):
        assert torch.equal(getattr(e0, p).weight, getattr(o0, p).weight)
    e1, o1, d1 = attn(model, "encoder", 1), attn(orig, "encoder", 1), attn(orig, "decoder", 1)
    for p in (*QKV, "out_proj"):
        assert torch.equal(getattr(e1, p).weight, formula(getattr(o1, p).weight, getattr(d1, p).weight, 0.3))
    assert torch.equal(e1.v_proj.bias, formula(o1.v_proj.bias, d1.v_proj.bias, 0.3))
    assert not torch.equal(enc_out(model), enc_out(orig))
    with pytest.raises(ConfigError, match="3 merge factors for 2"):
        merge_attention(model, model, [0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        merge_attention(model, model, 1.5)


def test_spread_rule_and_separate_source():
    target = tiny_whisper(enc_layers=2)
    source = tiny_whisper(enc_layers=4, dec_layers=3, seed=1)
    report = merge_attention(target.model.encoder, source, 1.0, rule="spread")  # auto: the source's decoder
    assert report["layer_map"] == [0, 2]
    assert torch.equal(attn(target, "encoder", 1).q_proj.weight, attn(source, "decoder", 2).q_proj.weight)
    report = merge_attention(target, source, 1.0, rule="spread", source_part="encoder")
    assert report["layer_map"] == [0, 3] and report["source_modules"][1] == "model.encoder.layers.3.self_attn"
    assert torch.equal(attn(target, "encoder", 1).v_proj.weight, attn(source, "encoder", 3).v_proj.weight)


def test_width_mismatch_and_missing_attention_are_clear_errors():
    target, wide = tiny_whisper(), tiny_whisper(d_model=32)
    with pytest.raises(ModelError, match=r"width mismatch: model\.encoder\.layers\.0\.self_attn\.q_proj"):
        merge_attention(target, wide, 0.1)
    with pytest.raises(ModelError, match="no self-attention module"):
        merge_attention(target, torch.nn.Sequential(torch.nn.Linear(16, 16)), 0.1)
    with pytest.raises(ModelError, match="under a submodule named 'decoder'"):
        find_attention_layers(target.model.encoder, "decoder")


def test_generic_discovery_wav2vec2_and_llama():
    torch.manual_seed(0)
    w2v = Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2),
                                       num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2))
    layers = find_attention_layers(w2v)
    assert [lay.name for lay in layers] == ["encoder.layers.0.attention", "encoder.layers.1.attention"]
    llama = LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=50))
    assert set(find_attention_layers(llama)[0].projections) == {"q", "k", "v", "o"}
    whisper = tiny_whisper()
    orig = tiny_whisper()
    report = merge_attention(whisper, llama, 0.5, ("q", "k", "v", "o"), rule="spread")
    assert report["source_modules"] == ["layers.0.self_attn", "layers.2.self_attn"]
    e, o, src = attn(whisper, "encoder", 1), attn(orig, "encoder", 1), llama.layers[2].self_attn
    assert torch.equal(e.out_proj.weight, formula(o.out_proj.weight, src.o_proj.weight, 0.5))
    assert torch.equal(e.q_proj.bias, formula(o.q_proj.bias, None, 0.5))  # Llama has no bias: zero
    merge_attention(w2v, whisper.model.encoder, 0.2)  # wav2vec2 takes from a Whisper encoder of its width
    with pytest.raises(ModelError, match="non-zero one"):  # Llama's q has no bias, Whisper's has
        merge_attention(llama, whisper, 0.2, rule="spread")
    merge_attention(llama, whisper, 0.2, ("k",), rule="spread")  # Whisper's k has none either: fine


# ---------------------------------------------------------------------------------------------- learnable merge
def test_learnable_merge_gradients_reach_only_the_factors():
    model = tiny_whisper()
    encoder = model.get_encoder()
    names_before = set(encoder.state_dict())
    merge = LearnableMerge(encoder, model, init=[0.1, 0.4])
    assert [p is merge.logits for p in merge.parameters()] == [True]
    assert all(not p.requires_grad for p in encoder.parameters())
    assert np.allclose(merge.factor_values(), [0.1, 0.4])
    # at its initial factors the live merge computes what the fixed merge does (up to rounding)
    fixed = tiny_whisper()
    merge_attention(fixed, fixed, [0.1, 0.4])
    out = merge(mel()).last_hidden_state
    assert torch.allclose(out, enc_out(fixed), atol=1e-5)
    out.pow(2).mean().backward()
    assert merge.logits.grad is not None and bool(torch.all(merge.logits.grad != 0))
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in model.model.decoder.parameters())
    # train on a toy loss, then bake: the weights are exactly the formula at the learned factors
    batches = [mel(seed=s) for s in range(2)]
    trained = train_merge_factors(merge, batches, lambda x: encoder(x).last_hidden_state.pow(2).mean(), steps=3, lr=0.5)
    assert len(trained["losses"]) == 3 and trained["factors"] == merge.factor_values()
    a = merge.factor_values()
    assert not np.allclose(a, [0.1, 0.4])
    baked = merge.bake()
    assert baked is encoder
    assert set(encoder.state_dict()) == names_before
    orig = tiny_whisper()
    for i in range(2):
        e, o, d = attn(model, "encoder", i), attn(orig, "encoder", i), attn(orig, "decoder", i)
        for p in QKV:
            lin = getattr(e, p)
            assert not parametrize.is_parametrized(lin)
            assert torch.equal(lin.weight, formula(getattr(o, p).weight, getattr(d, p).weight, a[i]))
        assert torch.equal(e.q_proj.bias, formula(o.q_proj.bias, d.q_proj.bias, a[i]))
        assert torch.equal(e.out_proj.weight, o.out_proj.weight)
    with pytest.raises(ModelError, match="already baked"):
        merge.bake()


_SPECIAL = {"<|startoftranscript|>": 2, "<|en|>": 4, "<|transcribe|>": 5, "<|notimestamps|>": 6}


class _FakeTokenizer:
    """Just what whisper_label_ids needs: Whisper's special tokens and a word-level encoder."""

    unk_token_id, eos_token_id = 0, 3

    def convert_tokens_to_ids(self, tokens):
        return [_SPECIAL.get(t, self.unk_token_id) for t in tokens]

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [10 + len(w) for w in text.split()]})()


def test_whisper_objective_and_learn_whisper_merge(tmp_path):
    from speechlm.data.audio import save_audio
    from speechlm.data.manifest import Utterance

    tok = _FakeTokenizer()
    ids, n = whisper_label_ids(tok, "the cat sat")
    assert ids == [2, 4, 5, 6, 13, 13, 13, 3] and n == 4
    batch = whisper_collate(mel(), [ids, ids[:6]], n, pad_id=3)
    assert batch["decoder_input_ids"][0].tolist() == ids[:-1]
    assert batch["labels"][0].tolist() == [-100, -100, -100, 13, 13, 13, 3]
    assert batch["labels"][1].tolist() == [-100, -100, -100, 13, 13, -100, -100]
    model = tiny_whisper()
    loss = whisper_asr_loss(model)(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ModelError, match="special tokens"):
        whisper_label_ids(tok, "x", language="xx")

    fe = WhisperFeatureExtractor(chunk_length=1)  # 1 s windows: 100 mel frames, what the tiny encoder takes
    processor = type("Proc", (), {"feature_extractor": fe, "tokenizer": tok})()
    utts = []
    for i in range(3):
        wave = 0.1 * np.random.default_rng(i).standard_normal(8000).astype(np.float32)
        save_audio(tmp_path / f"u{i}.wav", wave, 16000)
        utts.append(Utterance(f"u{i}", f"u{i}.wav", 16000, 0.5, "a b c", "train", root=tmp_path))
    orig = tiny_whisper()
    report = learn_whisper_merge(model, processor, utts, steps=2, init=0.2, batch_size=2, lr=0.1)
    assert len(report["losses"]) == 2 and report["learned"] and len(report["factors"]) == 2
    a = report["factors"][0]
    assert a != pytest.approx(0.2)
    assert torch.equal(attn(model, "encoder", 0).k_proj.weight,
                       formula(attn(orig, "encoder", 0).k_proj.weight, attn(orig, "decoder", 0).k_proj.weight, a))
    assert torch.equal(attn(model, "decoder", 0).k_proj.weight, attn(orig, "decoder", 0).k_proj.weight)


# ---------------------------------------------------------------------------------------------- CLI
def _merge_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools/merge_attention.py"), *args], check=False,
                          capture_output=True, text=True, timeout=600)


def test_cli_writes_a_folder_speech_encoder_loads(tmp_path):
    src = tmp_path / "whisper"
    tiny_whisper().save_pretrained(src)
    WhisperFeatureExtractor().save_pretrained(src)
    (src / "speechlm_converted.json").write_text("{}")
    out = tmp_path / "merged"
    done = _merge_cli("--encoder", str(src), "--factors", "0,0.5", "--projections", "q,k,v,o", "--out", str(out),
                      "--threads", "1")
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "merge.json").read_text())
    assert record["factors"] == [0.0, 0.5] and record["projections"] == ["q", "k", "v", "o"]
    assert record["source"] == str(src) and record["layer_map"] == [0, 1] and record["learned"] is False
    assert (out / "preprocessor_config.json").is_file() and not (out / "speechlm_converted.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "whisper"]  # no temporary left behind
    enc = SpeechEncoder.from_pretrained(str(out))
    orig = SpeechEncoder.from_pretrained(str(src))
    assert enc.num_hidden_layers == 2
    e, o = enc.model.layers[1].self_attn, orig.model.layers[1].self_attn
    d = tiny_whisper().model.decoder.layers[1].self_attn
    assert torch.equal(e.out_proj.weight, formula(o.out_proj.weight, d.out_proj.weight, 0.5))
    assert torch.equal(enc.model.layers[0].self_attn.q_proj.weight, orig.model.layers[0].self_attn.q_proj.weight)
    assert enc.weights_fingerprint() != orig.weights_fingerprint()
    assert "merged 2 attention layers" in done.stdout
    # errors are one line on stderr, and the earlier folder stays as it was
    done = _merge_cli("--encoder", str(src), "--factors", "0.1,0.2,0.3", "--out", str(out))
    assert done.returncode == 1 and "3 merge factors for 2" in done.stderr
    assert json.loads((out / "merge.json").read_text()) == record


def test_whisper_label_ids_match_the_real_tokenizer():
    from speechlm.paths import models_dir

    folder = models_dir() / "whisper-base"
    if not (folder / "tokenizer_config.json").is_file():
        pytest.skip("whisper-base not prepared (tools/prepare_models.py)")
    from transformers import WhisperTokenizerFast

    tok = WhisperTokenizerFast.from_pretrained(str(folder))
    ids, n = whisper_label_ids(tok, "Hello world.")
    tok.set_prefix_tokens(language="en", task="transcribe", predict_timestamps=False)
    assert ids == tok(" Hello world.").input_ids and n == 4
