"""The cascade's transcript cache: each distinct clip heard once per model and settings, kept across processes,
resumable after an interruption, never read for another model."""

from __future__ import annotations

import json

import pytest
import torch

from speechlm.eval.config import EvalConfig, transcripts_dir
from speechlm.eval.transcripts import TranscriptCache, audio_key, model_key, transcribe_cached


class Ear:
    """A stand-in recogniser: 'hears' each clip as its length and first sample, and records what it was given."""

    def __init__(self, fail_after: int | None = None):
        self.heard: list[int] = []
        self.fail_after = fail_after

    def __call__(self, clips):
        if self.fail_after is not None and len(self.heard) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.heard += [c.numel() for c in clips]
        return [f"{c.numel()} {float(c[0]):.3f}" for c in clips]


def clips(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(100 + k, generator=g) for k in range(n)]


def test_each_distinct_clip_is_heard_once_and_kept_for_the_next_process(tmp_path):
    waves = clips(5)
    asked = [waves[0], waves[1], waves[0].clone(), waves[2]]  # a copy of a clip is the same clip
    ear = Ear()
    cache = TranscriptCache(tmp_path, "m1")
    first = transcribe_cached(ear, asked, cache)
    assert first == Ear()(asked) and sorted(ear.heard) == [100, 101, 102]
    assert len(cache) == 3 and cache.hits == 0

    again = Ear()  # another process: a new cache object on the same folder and key
    cache2 = TranscriptCache(tmp_path, "m1")
    assert transcribe_cached(again, waves, cache2) == Ear()(waves)
    assert again.heard == [103, 104] and cache2.hits == 3 and len(cache2) == 5
    # another model (or other settings) never reads them
    other = Ear()
    transcribe_cached(other, waves[:2], TranscriptCache(tmp_path, "m2"))
    assert other.heard == [100, 101]
    # no cache: every clip is heard, every time
    plain = Ear()
    assert transcribe_cached(plain, asked, None) == first and len(plain.heard) == 4


def test_an_interrupted_run_keeps_what_it_heard_and_a_broken_file_is_rebuilt(tmp_path):
    waves = clips(10)
    ear = Ear(fail_after=4)  # the third chunk of 2 fails
    with pytest.raises(RuntimeError, match="interrupted"):
        transcribe_cached(ear, waves, TranscriptCache(tmp_path, "m"), chunk=2)
    resumed = Ear()
    assert transcribe_cached(resumed, waves, TranscriptCache(tmp_path, "m"), chunk=2) == Ear()(waves)
    assert resumed.heard == [104 + k for k in range(6)]
    kept = json.loads((tmp_path / "m.json").read_text())
    assert kept[audio_key(waves[9])] == "109 " + f"{float(waves[9][0]):.3f}"

    (tmp_path / "m.json").write_text("{not json")
    fresh = Ear()
    assert transcribe_cached(fresh, waves[:2], TranscriptCache(tmp_path, "m")) == Ear()(waves[:2])
    assert fresh.heard == [100, 101] and len(json.loads((tmp_path / "m.json").read_text())) == 2


def test_two_writers_merge(tmp_path):
    waves = clips(4)
    a, b = TranscriptCache(tmp_path, "m"), TranscriptCache(tmp_path, "m")
    transcribe_cached(Ear(), waves[:2], a)
    transcribe_cached(Ear(), waves[2:], b)  # b never read a's entries, but keeps them when it writes
    assert len(json.loads((tmp_path / "m.json").read_text())) == 4


def test_the_model_key_follows_the_weights_and_the_settings(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights-1")
    k1 = model_key(tmp_path, "greedy")
    assert model_key(tmp_path, "greedy") == k1 and model_key(tmp_path, "beam 5") != k1
    (tmp_path / "model.safetensors").write_bytes(b"weights-2")
    assert model_key(tmp_path, "greedy") != k1
    assert audio_key(torch.zeros(3)) != audio_key(torch.zeros(4))
    assert audio_key(torch.ones(3, dtype=torch.float64)) == audio_key(torch.ones(3))


def test_where_an_evaluation_keeps_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "c"))
    assert transcripts_dir(EvalConfig()) == tmp_path / "c" / "transcripts"
    assert transcripts_dir(EvalConfig(transcripts="none")) is None
    assert transcripts_dir(EvalConfig(transcripts=str(tmp_path / "t"))) == tmp_path / "t"


def test_the_evaluations_whisper_gets_the_folder(tmp_path, monkeypatch):
    from speechlm.eval import asr
    from speechlm.eval.config import load_whisper

    got = {}

    class Whisper:
        def __init__(self, folder, device, transcripts=None):
            got.update(folder=folder, transcripts=transcripts)

    monkeypatch.setattr(asr, "WhisperCascade", Whisper)
    load_whisper(EvalConfig(whisper="w", transcripts=str(tmp_path)))
    assert got == {"folder": "w", "transcripts": tmp_path}
    load_whisper(EvalConfig(whisper="w", transcripts="none"))
    assert got["transcripts"] is None
