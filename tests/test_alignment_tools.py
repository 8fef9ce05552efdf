"""Train an aligner -> align a manifest -> evaluate -> plot (alignment.training, .annotate, .evaluation, .plot) on a
tiny random Whisper and tiny audio; the scripts' command lines (recipes/train_aligner.py, tools/align.py,
tools/eval_alignment.py) run as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from alignment_helpers import byte_level_bpe
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from alignment.annotate import align_manifest
from alignment.evaluation import EvalOptions, evaluate
from alignment.plot import plot_manifest
from alignment.training import load_train_config, train
from speechlm.data.audio import save_audio
from speechlm.data.manifest import Utterance, WordTiming, read_manifest, write_manifest
from speechlm.errors import AlignmentError, ConfigError, ModelError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes/configs/aligner_tiny.yaml"


def run_script(rel: str, *args: str) -> subprocess.CompletedProcess:
    """A repository script's command line, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / rel), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, check=False)


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
    train_m, valid = _corpus(tmp_path)
    out = tmp_path / "aligner"
    done = train(load_train_config(TINY, [
        f"train_manifest={train_m}", f"valid_manifest={train_m}", f"out_dir={out}", f"encoder={encoder}", "steps=4",
        "valid_every=2", "batch_size=2", "model.d_model=32", "model.layers=1", "model.heads=2", "threads=1",
        "max_minutes=0"]))
    assert done["steps"] == 4 and done["out_dir"] == str(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "charCTC" and cfg["input_dim"] == 32 and cfg["frame_rate_hz"] == 50.0
    assert cfg["encoder_name"] == encoder and (out / "model.safetensors").is_file()
    state = json.loads((tmp_path / "aligner.train_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [2, 4]
    assert state["best_valid_cer"] == done["best_valid_cer"]
    cal = state["calibration"]                     # offsets fitted on the valid rows' reference words
    assert (cfg["start_offset_frames"], cfg["end_offset_frames"]) == (cal["start_offset_frames"], cal["end_offset_frames"])

    # continue from the trained weights; a different model size is refused (also by the recipe's command line)
    train_args = [f"train_manifest={train_m}", f"valid_manifest={train_m}", f"encoder={encoder}", "steps=2",
                  "valid_every=2", "batch_size=2", "model.layers=1", "model.heads=2", "threads=1", f"init_from={out}"]
    assert train(load_train_config(TINY, [*train_args, f"out_dir={tmp_path / 'more'}", "model.d_model=32"]))["steps"] == 2
    with pytest.raises(ModelError, match="do not match"):
        train(load_train_config(TINY, [*train_args, f"out_dir={tmp_path / 'other'}", "model.d_model=48"]))
    cli = run_script("recipes/train_aligner.py", "--config", TINY, *train_args, f"out_dir={tmp_path / 'other'}",
                     "model.d_model=48")
    assert cli.returncode == 1 and "do not match" in cli.stderr and not (tmp_path / "other").exists()

    aligned = tmp_path / "valid.aligned.jsonl"
    cli = run_script("tools/align.py", "--manifest", valid, "--aligner", out, "--tokenizer", tok_dir, "--out", aligned,
                     "--decoder", "forced_align", "--skip-bad", "--threads", "1")
    assert cli.returncode == 0 and "short" in cli.stderr
    rows = read_manifest(aligned)
    tok = byte_level_bpe()
    assert [r.id for r in rows] == ["u4", "u5"]
    for r in rows:
        assert r.boundary_frame_rate_hz == 50.0
        assert len(r.token_boundaries) == len(tok(r.text, add_special_tokens=False)["input_ids"])
        assert r.token_boundaries[-1] < round(r.duration_s * 50)
    again = align_manifest(str(valid), str(out), str(tok_dir), str(tmp_path / "again.jsonl"), decoder="forced_align",
                           skip_bad=True)
    assert again.rows == 2 and [b.split(":")[0] for b in again.bad] == ["short"]
    assert [r.token_boundaries for r in read_manifest(tmp_path / "again.jsonl")] == [r.token_boundaries for r in rows]
    # rows are batched shortest first but written in the manifest's order, with the boundaries each row gets alone
    longest_first = tmp_path / "longest_first.jsonl"
    write_manifest(longest_first, read_manifest(train_m)[::-1])
    batched, alone = tmp_path / "batched.jsonl", tmp_path / "alone.jsonl"
    align_manifest(str(longest_first), str(out), str(tok_dir), str(batched), batch_size=3)
    align_manifest(str(longest_first), str(out), str(tok_dir), str(alone), batch_size=1)
    assert [r.id for r in read_manifest(batched)] == ["u3", "u2", "u1", "u0"]
    assert [r.token_boundaries for r in read_manifest(batched)] == [r.token_boundaries for r in read_manifest(alone)]
    # without skip_bad the short row stops the run and nothing is written
    failed = tmp_path / "failed.jsonl"
    with pytest.raises(AlignmentError, match="short"):
        align_manifest(str(valid), str(out), str(tok_dir), str(failed))
    assert not failed.exists()

    report_path = tmp_path / "report.json"
    cli = run_script("tools/eval_alignment.py", "--manifest", train_m, "--aligner", out, "--tokenizer", tok_dir,
                     "--out", report_path, "--threads", "1")
    assert cli.returncode == 0, cli.stderr
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
    assert set(report["results"]) == {f"{d}/{m}" for d in ("ctc_segmentation", "forced_align")
                                      for m in ("forced", "free")}
    # the library call, on a chosen decoder and mode only
    lib = evaluate(EvalOptions(manifest=str(train_m), aligner=str(out), tokenizer=str(tok_dir),
                               modes=["forced"], decoders=["ctc_segmentation"]))
    assert set(lib["results"]) == {"ctc_segmentation/forced"} and lib["utterances"] == 4
    assert lib["results"]["ctc_segmentation/forced"]["boundaries"] == 24
    plots = tmp_path / "plots"
    written = list(plot_manifest(str(train_m), str(out), str(tok_dir), plots, ids=["u1"]))
    assert written == [plots / "u1.forced.png"]
    assert (plots / "u1.forced.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    train_m, _ = _corpus(tmp_path)
    out = tmp_path / kind
    train(load_train_config(None, [
        f"train_manifest={train_m}", f"valid_manifest={train_m}", f"out_dir={out}", f"encoder={encoder}",
        f"model.kind={kind}", f"tokenizer={tok_dir}", "steps=2", "valid_every=2", "batch_size=2",
        "model.d_model=32", "model.layers=1", "model.heads=2", "threads=1"]))
    assert json.loads((out / "config.json").read_text())["kind"] == kind
    assert (out / "tokenizer").is_dir()
    aligned = tmp_path / "aligned.jsonl"
    assert align_manifest(str(train_m), str(out), str(tok_dir), str(aligned), target_frame_rate=12.5).rows == 4
    tok = byte_level_bpe()
    for r in read_manifest(aligned):
        assert r.boundary_frame_rate_hz == 12.5
        assert len(r.token_boundaries) == len(tok(r.text, add_special_tokens=False)["input_ids"])
        assert 0 <= r.token_boundaries[-1] < r.duration_s * 12.5 + 1


def test_train_config_is_checked_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="model.kind"):
        load_train_config(TINY, ["model.kind=charCTX"])
    with pytest.raises(ConfigError, match="feature_cache_train"):
        load_train_config(TINY, ["encoder_adapt.method=lora", f"feature_cache_train={tmp_path}"])
    with pytest.raises(ConfigError, match="out_dir"):
        train(load_train_config(TINY, ["train_manifest=a.jsonl", "valid_manifest=b.jsonl"]))
    assert load_train_config(TINY).missing_required() == ["train_manifest", "valid_manifest", "out_dir"]


def test_aligner_encoder_adapt_is_typed_and_checked_when_it_loads(tmp_path, monkeypatch):
    """encoder_adapt is the per-method EncoderAdaptConfig (as model.encoder_adapt of the stages): a key the method
    lacks is refused by load_config, naming it, before any model is read."""
    import yaml

    import speechlm.models.encoder as encoder_module
    from alignment.training import TrainAlignerConfig
    from speechlm.config import to_dict
    from speechlm.models.encoder_adapt_config import EncoderAdaptConfig, EncoderLoRAConfig

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(encoder_module.SpeechEncoder, "__init__", no_model)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "encoder_adapt": {"method": "lora", "rr": 2}}))
    with pytest.raises(ConfigError, match=r"encoder_adapt\.rr"):
        load_train_config(typo)
    with pytest.raises(ConfigError, match=r"encoder_adapt\.bottleneck"):
        load_train_config(TINY, ["encoder_adapt.method=lora", "encoder_adapt.bottleneck=4"])
    cfg = load_train_config(TINY, ["encoder_adapt.method=lora", "encoder_adapt.r=2"])
    assert isinstance(cfg.encoder_adapt, EncoderLoRAConfig) and cfg.encoder_adapt.r == 2
    assert type(load_train_config(TINY).encoder_adapt) is EncoderAdaptConfig  # default: the frozen encoder
    # configs written before the field was typed (a plain mapping, from code or a saved train_state.json) still load
    assert TrainAlignerConfig(encoder_adapt={"method": "lora", "r": 2}).encoder_adapt == cfg.encoder_adapt
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({**to_dict(load_train_config(TINY)), "encoder_adapt": {"method": "none"}}))
    assert not load_train_config(old).encoder_adapt.enabled
    null = tmp_path / "null.yaml"
    null.write_text("encoder_adapt: null\n")
    assert not load_train_config(null).encoder_adapt.enabled


def test_the_aligner_schedule_is_the_trainers():
    """alignment sits below speechlm.training, so it writes the warm-up + cosine rule itself: the same numbers."""
    from alignment.training import lr_schedule
    from speechlm.training.schedule import lr_factor

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, warmup_steps=5, total_steps=40, floor=0.05)
    for step in range(50):
        assert sched.get_last_lr()[0] == pytest.approx(lr_factor(step, 5, 40, floor=0.05))
        opt.step()
        sched.step()
