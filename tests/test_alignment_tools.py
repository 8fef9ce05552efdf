"""recipes/train_aligner.py -> tools/align.py -> tools/eval_alignment.py on a tiny random Whisper and tiny audio."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from alignment_helpers import byte_level_bpe
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from speechlm.data.audio import save_audio
from speechlm.data.manifest import Utterance, WordTiming, read_manifest, write_manifest
from speechlm.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]


def _load(rel: str):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _tiny_whisper(folder: Path) -> str:
    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=1500, vocab_size=100, max_target_positions=32, pad_token_id=1,
                        bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    WhisperForConditionalGeneration(cfg).save_pretrained(folder)
    WhisperFeatureExtractor().save_pretrained(folder)
    return str(folder)


def _corpus(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    rows = []
    texts = ["the cat sat", "a dog ran far", "we sing", "it is here", "hello there", "good night all"]
    for i, text in enumerate(texts):
        dur = 1.0 + 0.1 * i
        t = np.arange(int(16000 * dur)) / 16000
        wave = (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32)
        save_audio(folder / f"u{i}.wav", wave, 16000)
        words = [WordTiming(w, 0.1 + 0.25 * k, 0.3 + 0.25 * k) for k, w in enumerate(text.split())]
        rows.append(Utterance(f"u{i}", f"u{i}.wav", 16000, dur, text, "train", words=words))
    # 0.1 s of audio (5 frames) cannot hold this transcript: a bad row for --skip-bad
    save_audio(folder / "short.wav", np.zeros(1600, dtype=np.float32), 16000)
    bad = Utterance("short", "short.wav", 16000, 0.1, "a transcript far too long for its audio", "train",
                    words=[WordTiming("a", 0.0, 0.05)])
    train, valid = folder / "train.jsonl", folder / "valid.jsonl"
    write_manifest(train, rows[:4])
    write_manifest(valid, rows[4:] + [bad])
    return train, valid


def test_train_align_eval_round_trip(tmp_path, capsys):
    encoder = _tiny_whisper(tmp_path / "whisper")
    tok_dir = tmp_path / "tok"
    byte_level_bpe().save_pretrained(tok_dir)
    train, valid = _corpus(tmp_path)
    out = tmp_path / "aligner"
    rc = _load("recipes/train_aligner.py").main([
        "--config", str(ROOT / "recipes/configs/aligner_tiny.yaml"), f"train_manifest={train}",
        f"valid_manifest={train}", f"out_dir={out}", f"encoder={encoder}", "steps=4", "valid_every=2",
        "batch_size=2", "model.d_model=32", "model.layers=1", "model.heads=2", "threads=1", "max_minutes=0"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "charCTC" and cfg["input_dim"] == 32 and cfg["frame_rate_hz"] == 50.0
    assert cfg["encoder_name"] == encoder and (out / "model.safetensors").is_file()
    state = json.loads((tmp_path / "aligner.train_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [2, 4]
    cal = state["calibration"]                     # offsets fitted on the valid rows' reference words
    assert (cfg["start_offset_frames"], cfg["end_offset_frames"]) == (cal["start_offset_frames"], cal["end_offset_frames"])

    # continue from the trained weights; a different model size is refused
    train_args = ["--config", str(ROOT / "recipes/configs/aligner_tiny.yaml"), f"train_manifest={train}",
                  f"valid_manifest={train}", f"encoder={encoder}", "steps=2", "valid_every=2", "batch_size=2",
                  "model.layers=1", "model.heads=2", "threads=1", f"init_from={out}"]
    recipe = _load("recipes/train_aligner.py")
    assert recipe.main([*train_args, f"out_dir={tmp_path / 'more'}", "model.d_model=32"]) == 0
    assert recipe.main([*train_args, f"out_dir={tmp_path / 'other'}", "model.d_model=48"]) == 1
    assert "do not match" in capsys.readouterr().err

    align = _load("tools/align.py")
    aligned = tmp_path / "valid.aligned.jsonl"
    assert align.main(["--manifest", str(valid), "--aligner", str(out), "--tokenizer", str(tok_dir),
                       "--out", str(aligned), "--decoder", "forced_align", "--skip-bad", "--threads", "1"]) == 0
    assert "short" in capsys.readouterr().err
    rows = read_manifest(aligned)
    tok = byte_level_bpe()
    assert [r.id for r in rows] == ["u4", "u5"]
    for r in rows:
        assert r.boundary_frame_rate_hz == 50.0
        assert len(r.token_boundaries) == len(tok(r.text, add_special_tokens=False)["input_ids"])
        assert r.token_boundaries[-1] < round(r.duration_s * 50)
    # without --skip-bad the short row stops the run and nothing is written
    failed = tmp_path / "failed.jsonl"
    assert align.main(["--manifest", str(valid), "--aligner", str(out), "--tokenizer", str(tok_dir),
                       "--out", str(failed)]) == 1
    assert "short" in capsys.readouterr().err and not failed.exists()

    report_path = tmp_path / "report.json"
    assert _load("tools/eval_alignment.py").main([
        "--manifest", str(train), "--aligner", str(out), "--tokenizer", str(tok_dir), "--out", str(report_path),
        "--threads", "1"]) == 0
    report = json.loads(report_path.read_text())
    assert report["utterances"] == 4
    forced = report["results"]["ctc_segmentation/forced"]
    assert forced["words_ref"] == forced["words_matched"] == 12
    assert forced["boundaries"] == 24 and forced["mae_ms"] >= 0 and 0 <= forced["within_50ms"] <= 1
    # Per engine of the rows' speakers: the same figures, over the rows of that engine only.
    engines = report["by_engine"]
    assert sum(e["utterances"] for e in engines.values()) == 4
    assert sum(e["ctc_segmentation/forced"]["boundaries"] for e in engines.values()) == 24
    if len(engines) == 1:
        only = next(iter(engines.values()))
        assert only["cer"] == forced["cer"] and only["ctc_segmentation/forced"]["mae_ms"] == forced["mae_ms"]
    plots = tmp_path / "plots"
    assert _load("tools/plot_alignment.py").main([
        "--manifest", str(train), "--aligner", str(out), "--tokenizer", str(tok_dir), "--out-dir", str(plots),
        "--ids", "u1"]) == 0
    assert (plots / "u1.forced.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["results"]) == {f"{d}/{m}" for d in ("ctc_segmentation", "forced_align")
                                      for m in ("forced", "free")}


def test_aligner_refuses_another_encoder(tmp_path):
    from alignment.aligner import Aligner
    from alignment.ctc_model import CTCAligner, char_ctc_config
    from alignment.features import open_frame_source

    encoder = _tiny_whisper(tmp_path / "whisper")
    model = CTCAligner(char_ctc_config(input_dim=48, d_model=32, layers=1, heads=2, encoder_name=encoder))
    with pytest.raises(ModelError, match="48-dim"):
        open_frame_source(Aligner(model, None))


@pytest.mark.parametrize("kind", ["CIF", "subCTC"])
def test_subword_aligners_train_and_align(tmp_path, kind):
    encoder = _tiny_whisper(tmp_path / "whisper")
    tok_dir = tmp_path / "tok"
    byte_level_bpe().save_pretrained(tok_dir)
    train, _ = _corpus(tmp_path)
    out = tmp_path / kind
    assert _load("recipes/train_aligner.py").main([
        f"train_manifest={train}", f"valid_manifest={train}", f"out_dir={out}", f"encoder={encoder}",
        f"model.kind={kind}", f"tokenizer={tok_dir}", "steps=2", "valid_every=2", "batch_size=2",
        "model.d_model=32", "model.layers=1", "model.heads=2", "threads=1"]) == 0
    assert json.loads((out / "config.json").read_text())["kind"] == kind
    assert (out / "tokenizer").is_dir()
    aligned = tmp_path / "aligned.jsonl"
    assert _load("tools/align.py").main(["--manifest", str(train), "--aligner", str(out), "--tokenizer",
                                         str(tok_dir), "--out", str(aligned), "--target-frame-rate", "12.5"]) == 0
    tok = byte_level_bpe()
    for r in read_manifest(aligned):
        assert r.boundary_frame_rate_hz == 12.5
        assert len(r.token_boundaries) == len(tok(r.text, add_special_tokens=False)["input_ids"])
        assert 0 <= r.token_boundaries[-1] < r.duration_s * 12.5 + 1
