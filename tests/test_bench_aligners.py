"""tools/benchmarks/bench_aligners.py end to end on a tiny world: random tiny Whisper, eSpeak speech, 2 steps."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from alignment_helpers import byte_level_bpe
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from speechlm.data.audio import save_audio
from speechlm.data.manifest import Utterance, read_manifest, write_manifest
from speechlm.data.tts import synthesize
from speechlm.perf.benchmarks import aligners as bench_aligners

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The cat sat on the mat.", "A dog ran far away.", "We sing a zorblax song.", "It is here, eighty-three times."]
VOICES = ["en-us", "en-gb-scotland+f4"]          # engine_of: "espeak" and the held-out "espeak-hard"


def _bench(*argv: str) -> subprocess.CompletedProcess:
    """The benchmark's command line, run as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "tools/benchmarks/bench_aligners.py"), *argv], check=False,
                          capture_output=True, text=True, cwd=ROOT, timeout=1200)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_world")
    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=1500, vocab_size=100, max_target_positions=32, pad_token_id=1,
                        bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    WhisperForConditionalGeneration(cfg).save_pretrained(root / "whisper")
    WhisperFeatureExtractor().save_pretrained(root / "whisper")
    byte_level_bpe().save_pretrained(root / "tok")
    corpus = root / "corpus"
    corpus.mkdir()
    rows = []
    for i, text in enumerate(TEXTS):
        voice = VOICES[i % 2]
        syn = synthesize(text, voice=voice)
        save_audio(corpus / f"u{i}.wav", syn.wave.numpy(), syn.sample_rate)
        rows.append(Utterance(f"u{i}", f"u{i}.wav", syn.sample_rate, syn.wave.numel() / syn.sample_rate, text,
                              "test", speaker=f"{voice}/r175/p50", words=syn.words))
    for split in ("train", "valid", "test"):
        write_manifest(corpus / f"{split}.jsonl", rows)
    return root


def _args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["--corpus", str(world / "corpus"), "--out", str(out), "--tokenizer", str(world / "tok"),
            "--threads", "1", "--encoder-clips", "2", "--batch-size", "2", *extra]


@pytest.fixture(scope="module")
def report(world):
    out = world / "bench" / "report.json"
    proc = _bench(*_args(world, out, "--work-dir", str(world / "work"), "--train-steps", "2",
                         "--train-override", f"encoder={world / 'whisper'}", "model.d_model=32",
                         "model.layers=1", "model.heads=2", "valid_every=2", "batch_size=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (world / "bench" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(out.read_text())


def test_every_kind_and_decoder_has_a_row(report):
    rows = report["rows"]
    seen = {(r["aligner"], r["decoder"]) for r in rows}
    assert seen >= {(k, d) for k in ("charCTC", "subCTC", "CIF")
                    for d in ("ctc_segmentation", "forced_align", "cif_firing")}
    for r in rows:
        if r["aligner"] == "PocketSphinx":
            continue
        applies = (r["decoder"] == "cif_firing") == (r["aligner"] == "CIF")
        assert r["applies"] == applies, r
        if not applies:
            assert r["mode"] == "-" and "CIF" in r["reason"]
            continue
        assert r["mode"] in ("forced", "free")
        assert math.isfinite(r["cer"]) and r["cer"] >= 0
        assert math.isfinite(r["rtf_aligner"]) and r["rtf_with_encoder"] > r["rtf_aligner"] > 0
        assert set(r["by_engine"]) == {"espeak", "espeak-hard"}
        assert sum(e["utterances"] for e in r["by_engine"].values()) == r["utterances"] == 4
        if r["mode"] == "forced":            # every reference word is aligned; free mode may decode nothing yet
            assert r["words_matched"] == r["words_ref"] == 21 and r["failed"] == 0
            assert math.isfinite(r["mae_ms"]) and 0 <= r["within_20ms"] <= r["within_50ms"] <= 1
    for kind in ("charCTC", "subCTC", "CIF"):
        info = report["aligners"][kind]
        assert info["trained_now"] and info["saved_at_step"] == 2 and info["steps_configured"] == 2
    assert report["encoder"]["clips"] == 2 and report["encoder"]["rtf"] > 0
    assert report["corpus"]["engines"] == ["espeak", "espeak-hard"]
    assert len(report["machine"]["load_avg_start"]) == 3


def test_pocketsphinx_row_present_either_way(report):
    (ps,) = [r for r in report["rows"] if r["aligner"] == "PocketSphinx"]
    if importlib.util.find_spec("pocketsphinx") is None:
        assert not ps["applies"] and "not installed" in ps["reason"]
    else:
        assert ps["applies"] and ps["words_ref"] == 21


def test_pocketsphinx_aligns_espeak_speech(world):
    pytest.importorskip("pocketsphinx")
    bench = bench_aligners
    utts = read_manifest(world / "corpus" / "test.jsonl")
    args = type("A", (), {"no_pocketsphinx": False})()
    row = bench.pocketsphinx_row(utts, args)
    assert row["applies"] and row["failed"] == 0
    assert row["words_matched"] == row["words_ref"] == 21
    assert "zorblax" in row["oov_words"]              # a crude pronunciation, still aligned
    # real speech with the engine's own timings: boundaries land near them
    assert row["mae_ms"] < 120 and row["within_50ms"] > 0.3 and 0 < row["rtf_aligner"] < 1
    assert bench.crude_pronunciation("zorblax") == "Z AA R B L AE K S"


def test_reuses_trained_aligners_and_reports_bad_input(world, report):
    out = world / "bench" / "reuse.json"
    work = str(world / "work")
    proc = _bench(*_args(world, out, "--work-dir", work, "--no-train", "--kinds", "charCTC",
                         "--decoders", "forced_align", "--modes", "forced", "--no-pocketsphinx",
                         "--encoder-clips", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "reusing the charCTC aligner" in text and "skipped (--no-pocketsphinx)" in text
    again = json.loads(out.read_text())
    assert [(r["aligner"], r["decoder"], r["mode"]) for r in again["rows"]] == [
        ("charCTC", "forced_align", "forced"), ("PocketSphinx", "set_align_text", "forced")]
    assert again["rows"][0]["mae_ms"] == pytest.approx(next(
        r["mae_ms"] for r in report["rows"] if (r["aligner"], r["decoder"], r["mode"]) ==
        ("charCTC", "forced_align", "forced")))

    missing = world / "nowhere"
    for argv, message in (
            (["--corpus", str(missing), "--out", str(out), "--work-dir", work], str(missing / "test.jsonl")),
            (_args(world, out, "--kinds", "charCTC", "--aligner", f"charCTC={missing}"), f"{missing}: folder not found"),
            (_args(world, out, "--kinds", "subCTC", "--aligner", f"subCTC={world / 'work' / 'CIF'}"),
             "holds a 'CIF' aligner, not 'subCTC'"),
            (_args(world, out, "--kinds", "CIF", "--work-dir", str(world / "empty"), "--no-train"),
             "no trained CIF aligner")):
        proc = _bench(*argv)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-3000:]


def test_aligner_with_an_adapted_encoder(world):
    """encoder_adapt.* reaches the aligner's training; its evaluation and timing read the adapted encoder."""
    out = world / "bench" / "adapted.json"
    proc = _bench(*_args(world, out, "--work-dir", str(world / "adapted"), "--kinds", "charCTC",
                         "--decoders", "forced_align", "--modes", "forced", "--no-pocketsphinx",
                         "--train-steps", "2", "--train-override", f"encoder={world / 'whisper'}",
                         "model.d_model=32", "model.layers=1", "model.heads=2", "valid_every=2", "batch_size=2",
                         "encoder_adapt.method=lora", "encoder_adapt.r=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    info = report["aligners"]["charCTC"]
    assert info["encoder_adapt"]["method"] == "lora" and info["encoder_adapt"]["r"] == 2
    assert info["encoder_adapt"]["trainable_parameters"] == 2 * 2 * (32 + 32)    # A and B of q and v, 1 layer
    (row,) = [r for r in report["rows"] if r["aligner"] == "charCTC"]
    assert row["words_matched"] == row["words_ref"] == 21 and row["failed"] == 0
    assert "charCTC + encoder lora (2 steps)" in bench_aligners.markdown_table(report)
