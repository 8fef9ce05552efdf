"""Feature cache: round trip, idempotent/resumable builds, staleness and mismatch detection, bad audio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_encoder import make_whisper

from speechlm.data.audio import load_audio, save_audio
from speechlm.data.feature_cache import INDEX, FeatureCache, build_feature_cache
from speechlm.data.manifest import Utterance, read_manifest, write_manifest
from speechlm.errors import AudioError, FeatureCacheError
from speechlm.models.encoder import SpeechEncoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> str:
    return make_whisper(tmp_path_factory.mktemp("enc") / "whisper")


def _corpus(root: Path, seconds=(1.0, 0.4, 2.2, 0.7, 1.3)) -> Path:
    """Noise clips (one at 22.05 kHz, to exercise resampling) and their manifest."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, s in enumerate(seconds):
        sr = 22_050 if i == 1 else 16_000
        save_audio(root / "audio" / f"u{i}.wav", 0.1 * torch.randn(int(s * sr), generator=g), sr)
        rows.append(Utterance(id=f"u{i}", audio=f"audio/u{i}.wav", sample_rate=sr, duration_s=s,
                              text=f"clip {i}", split="train"))
    write_manifest(root / "m.jsonl", rows)
    return root / "m.jsonl"


def _count_calls(encoder: SpeechEncoder) -> list[int]:
    calls: list[int] = []
    encoder.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    return calls


def _shard_mtimes(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("shard-*.safetensors")}


def test_round_trip_and_idempotent(tmp_path, whisper_dir):
    manifest = _corpus(tmp_path)
    enc = SpeechEncoder.from_pretrained(whisper_dir, layers=(0, -1))
    cache = build_feature_cache(manifest, enc, tmp_path / "cache", batch_size=2, shard_mb=0.01)
    assert len(_shard_mtimes(tmp_path / "cache")) >= 2  # small shards: several files
    assert cache.layers == (0, 2) and cache.hidden_size == 32 and cache.frame_rate_hz == 50.0
    utts = read_manifest(manifest)
    cache.check_fresh(utts)
    for utt in utts:
        assert utt.id in cache
        wave = load_audio(utt.audio_path, target_sr=16_000)
        ref = enc([wave])
        got = cache[utt.id]
        assert got.dtype == torch.float32 and got.shape == ref.features[0].shape
        assert cache.frames(utt.id) == ref.lengths[0].item() == got.shape[1]
        torch.testing.assert_close(got, ref.features[0], atol=2e-3, rtol=2e-3)  # fp16 storage
    assert "nope" not in cache
    with pytest.raises(FeatureCacheError, match="nope"):
        cache["nope"]
    # a second build changes nothing and encodes nothing
    before = _shard_mtimes(tmp_path / "cache")
    calls = _count_calls(enc)
    again = build_feature_cache(manifest, enc, tmp_path / "cache", batch_size=2, shard_mb=0.01)
    assert calls == [] and _shard_mtimes(tmp_path / "cache") == before
    assert sorted(again.ids) == sorted(u.id for u in utts)
    # opening with the encoder's key works; with another key it must not
    FeatureCache.open(tmp_path / "cache", enc.cache_key())
    other = SpeechEncoder.from_pretrained(whisper_dir, layers=(-1,))
    with pytest.raises(FeatureCacheError, match="layers"):
        FeatureCache.open(tmp_path / "cache", other.cache_key())
    padded = SpeechEncoder.from_pretrained(whisper_dir, layers=(0, -1), whisper_pad_to_30s=True)
    with pytest.raises(FeatureCacheError, match="whisper_pad_to_30s"):
        FeatureCache.open(tmp_path / "cache", padded.cache_key())


def test_changed_audio_is_stale_and_rebuild_encodes_only_it(tmp_path, whisper_dir):
    manifest = _corpus(tmp_path)
    enc = SpeechEncoder.from_pretrained(whisper_dir)
    build_feature_cache(manifest, enc, tmp_path / "cache", batch_size=1, shard_mb=0.001)
    utts = read_manifest(manifest)
    new_wave = 0.3 * torch.randn(16_000 * 3)
    save_audio(utts[2].audio_path, new_wave, 16_000)  # same id, other audio
    cache = FeatureCache.open(tmp_path / "cache", enc.cache_key())
    with pytest.raises(FeatureCacheError, match="u2.*changed"):
        cache.check_fresh(utts)
    cache.check_fresh([utts[0]])  # the others are still fresh
    # touching a file (same bytes, new mtime) also counts as a change
    st = utts[0].audio_path.stat()
    os.utime(utts[0].audio_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(FeatureCacheError, match="u0"):
        cache.check_fresh([utts[0]])
    calls = _count_calls(enc)
    rebuilt = build_feature_cache(manifest, enc, tmp_path / "cache", batch_size=1, shard_mb=0.001)
    assert sum(calls) == 2  # u0 and u2 only
    rebuilt.check_fresh(utts)
    ref = enc([load_audio(utts[2].audio_path, target_sr=16_000)])
    assert rebuilt.frames("u2") == ref.lengths[0].item() == 150
    torch.testing.assert_close(rebuilt["u2"], ref.features[0], atol=2e-3, rtol=2e-3)
    # a cache asked about an utterance it never saw is stale too
    extra = Utterance(id="u9", audio=utts[0].audio, sample_rate=16_000, duration_s=1.0, text="x", split="train",
                      root=utts[0].root)
    with pytest.raises(FeatureCacheError, match="u9.*not in the cache"):
        rebuilt.check_fresh([extra])


def test_incomplete_cache_is_refused_and_resumes(tmp_path, whisper_dir):
    manifest = _corpus(tmp_path)
    enc = SpeechEncoder.from_pretrained(whisper_dir)
    cache_dir = tmp_path / "cache"
    build_feature_cache(manifest, enc, cache_dir, batch_size=1, shard_mb=0.001)
    shards = sorted(cache_dir.glob("shard-*.safetensors"))
    assert len(shards) == 5
    # a killed build: shards on disk, no index (it is written last)
    (cache_dir / INDEX).unlink()
    with pytest.raises(FeatureCacheError, match="not completely"):
        FeatureCache.open(cache_dir)
    shards[-1].unlink()
    calls = _count_calls(enc)
    cache = build_feature_cache(manifest, enc, cache_dir, batch_size=1, shard_mb=0.001)
    assert sum(calls) == 1 and len(cache) == 5  # resumed: only the lost shard's utterance re-encoded
    # a torn shard under a complete-looking index
    victim = cache_dir / json.loads((cache_dir / INDEX).read_text())["utterances"]["u0"]["shard"]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(FeatureCacheError, match="incomplete"):
        FeatureCache.open(cache_dir)
    # a shard from another encoder setting is not reused
    other = SpeechEncoder.from_pretrained(whisper_dir, layers=(1,))
    calls = _count_calls(other)
    c2 = build_feature_cache(manifest, other, cache_dir, batch_size=2)
    assert sum(calls) == 5 and c2.layers == (1,)
    for p in cache_dir.glob("shard-*.safetensors"):  # the old setting's shards are gone
        with safe_open(str(p), framework="pt") as f:
            assert json.loads(f.metadata()["encoder_key"])["layers"] == [1]


def test_bad_audio_raises_or_is_skipped(tmp_path, whisper_dir):
    manifest = _corpus(tmp_path)
    rows = read_manifest(manifest)
    (tmp_path / "audio" / "u3.wav").write_bytes(b"not audio at all")
    rows[4].audio = "audio/missing.wav"
    write_manifest(manifest, rows)
    enc = SpeechEncoder.from_pretrained(whisper_dir)
    with pytest.raises(AudioError, match=r"u3\.wav|missing\.wav"):
        build_feature_cache(manifest, enc, tmp_path / "cache")
    with pytest.raises(FeatureCacheError):
        FeatureCache.open(tmp_path / "cache")
    cache = build_feature_cache(manifest, enc, tmp_path / "cache", skip_bad=True)
    assert sorted(cache.ids) == ["u0", "u1", "u2"]
    assert sorted(s["id"] for s in cache.skipped) == ["u3", "u4"]
    assert any("missing.wav" in s["error"] for s in cache.skipped)


def _cache_features(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "cache_features.py"), *args], check=False,
                          capture_output=True, text=True, timeout=600)


def test_cli(tmp_path, whisper_dir):
    """tools/cache_features.py (as a subprocess) and speechlm.data.cache_jobs.encode_manifest behind it."""
    from speechlm.data.cache_jobs import encode_manifest

    manifest = _corpus(tmp_path, seconds=(0.5, 0.8))
    done = _cache_features("--manifest", str(manifest), "--encoder", whisper_dir, "--out", str(tmp_path / "c"),
                           "--layers", "0", "-1", "--batch-size", "2", "--threads", "1")
    assert done.returncode == 0, done.stderr
    cache = FeatureCache.open(tmp_path / "c", SpeechEncoder.from_pretrained(whisper_dir, layers=(0, -1)).cache_key())
    assert cache["u1"].shape == (2, 40, 32)
    done = _cache_features("--manifest", str(tmp_path / "none.jsonl"), "--encoder", whisper_dir,
                           "--out", str(tmp_path / "c2"), "--threads", "1")
    assert done.returncode == 1 and done.stderr.startswith("error: ")
    # a bf16 encoder: its own key (refused as the fp32 one's cache), frames still stored as fp16
    encode_manifest(manifest, whisper_dir, tmp_path / "bf", layers=(0, -1), dtype="bf16")
    bf16 = SpeechEncoder.from_pretrained(whisper_dir, layers=(0, -1), dtype="bf16")
    half = FeatureCache.open(tmp_path / "bf", bf16.cache_key())
    assert half.encoder_key["dtype"] == "bfloat16" and half["u1"].shape == (2, 40, 32)
    with pytest.raises(FeatureCacheError, match="dtype"):
        FeatureCache.open(tmp_path / "bf", SpeechEncoder.from_pretrained(whisper_dir, layers=(0, -1)).cache_key())
