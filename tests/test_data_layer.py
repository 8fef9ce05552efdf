"""Manifest round-trip and validation, audio loader errors, importers, atomic output, config."""

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.atomic import atomic_path, atomic_write_text
from speechlm.config import load_config
from speechlm.data.audio import load_audio, save_audio
from speechlm.data.importers import import_folder, import_librispeech, import_mls
from speechlm.data.manifest import Utterance, WordTiming, read_manifest, write_manifest
from speechlm.errors import AudioError, ConfigError, ManifestError


def _utt(i=0, **kw):
    row = {"id": f"u{i}", "audio": f"audio/u{i}.wav", "sample_rate": 16000, "duration_s": 1.5, "text": "the cat sat",
               "split": "train", "speaker": "en-us", "words": [WordTiming("the", 0.1, 0.3), WordTiming("cat", 0.3, 0.7),
                                                      WordTiming("sat", 0.7, 1.2)],
               "token_boundaries": [10, 30, 55], "boundary_frame_rate_hz": 50.0}
    row.update(kw)
    return Utterance(**row)


def test_manifest_round_trip(tmp_path):
    rows = [_utt(0), _utt(1, words=None, token_boundaries=None, boundary_frame_rate_hz=None, speaker=None)]
    path = tmp_path / "m.jsonl"
    assert write_manifest(path, rows) == 2
    back = read_manifest(path)
    assert back == rows
    assert back[0].audio_path == tmp_path / "audio/u0.wav"
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temp file left behind


GOOD = _utt(0).to_json()


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("audio"), "missing field(s) audio"),
    (lambda r: r.pop("text"), "missing field(s) text"),
    (lambda r: r.update(text="   "), "empty transcript"),
    (lambda r: r.update(sample_rate="abc"), "not numeric"),
    (lambda r: r.update(duration_s=-1), "must be positive"),
    (lambda r: r.update(words=[["the", 0.5, 0.3]]), "not ordered inside the audio"),
    (lambda r: r.update(words=[["the", 0.1, 9.0]]), "not ordered inside the audio"),
    (lambda r: r.update(words=[["the", 0.1]]), "must be [word, start_s, end_s]"),
    (lambda r: r.update(token_boundaries=[5, 3, 9]), "non-decreasing"),
    (lambda r: r.pop("boundary_frame_rate_hz"), "without a positive boundary_frame_rate_hz"),
])
def test_manifest_bad_rows_name_file_and_line(tmp_path, mutate, message):
    bad = dict(GOOD, id="bad")
    mutate(bad)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert f"{path}:2" in str(e.value) and message in str(e.value)
    skipped: list[str] = []
    rows = read_manifest(path, skip_bad=True, bad_rows=skipped)
    assert [r.id for r in rows] == ["u0"] and len(skipped) == 1 and f"{path}:2" in skipped[0]


def test_manifest_invalid_json_duplicate_and_missing_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(ManifestError, match=r"m.jsonl:2: not valid JSON"):
        read_manifest(path)
    skipped: list[str] = []
    read_manifest(path, skip_bad=True, bad_rows=skipped)
    assert any(":3: duplicate id" in s for s in skipped)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_write_manifest_is_atomic_on_crash(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [_utt(0)])

    def rows():
        yield _utt(1)
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        write_manifest(path, rows())
    assert [r.id for r in read_manifest(path)] == ["u0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def test_atomic_folder_replace(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("2")
        raise ValueError
    assert (target / "a.txt").read_text() == "1"
    atomic_write_text(tmp_path / "x.txt", "hello")
    assert (tmp_path / "x.txt").read_text() == "hello"


def _tone(seconds, sr, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def test_load_audio_resamples_and_downmixes(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, _tone(1.0, 22050, channels=2), 22050)
    wave = load_audio(path, target_sr=16000)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.numel() - 16000) <= 1
    assert 0.25 < wave.abs().max() < 0.35


def test_load_audio_errors(tmp_path):
    with pytest.raises(AudioError, match="missing.wav: audio file not found"):
        load_audio(tmp_path / "missing.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(AudioError, match="corrupt.wav: cannot read audio"):
        load_audio(corrupt)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: audio is empty"):
        load_audio(empty)
    eight_k = tmp_path / "8k.wav"
    save_audio(eight_k, _tone(0.5, 8000), 8000)
    with pytest.raises(AudioError, match="8k.wav: sample rate is 8000 Hz but 16000 Hz was expected"):
        load_audio(eight_k, expected_sr=16000)


def test_importers(tmp_path):
    ls = tmp_path / "ls" / "19" / "198"
    ls.mkdir(parents=True)
    for u in ("19-198-0000", "19-198-0001"):
        sf.write(ls / f"{u}.flac", _tone(0.5, 16000), 16000)
    (ls / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 GOOD  MORNING\n")
    rows = import_librispeech(tmp_path / "ls", "train")
    assert [(r.id, r.text, r.speaker, r.sample_rate) for r in rows] == [
        ("19-198-0000", "HELLO WORLD", "19", 16000), ("19-198-0001", "GOOD MORNING", "19", 16000)]
    (ls / "19-198.trans.txt").write_text("19-198-0000 HELLO\n19-198-0009 NO AUDIO\n")
    with pytest.raises(AudioError, match=r"19-198.trans.txt:2: no audio file for '19-198-0009'"):
        import_librispeech(tmp_path / "ls", "train")
    bad: list[str] = []
    assert len(import_librispeech(tmp_path / "ls", "train", skip_bad=True, bad_rows=bad)) == 1 and len(bad) == 1

    mls = tmp_path / "mls"
    (mls / "audio" / "10" / "20").mkdir(parents=True)
    sf.write(mls / "audio" / "10" / "20" / "10_20_000001.flac", _tone(0.5, 16000), 16000)
    (mls / "transcripts.txt").write_text("10_20_000001\tsome words\n")
    assert [(r.id, r.speaker) for r in import_mls(mls, "dev")] == [("10_20_000001", "10")]
    (mls / "transcripts.txt").write_text("10_20_000001 no tab here\n")
    with pytest.raises(ManifestError, match=r"transcripts.txt:1: expected"):
        import_mls(mls, "dev")

    folder = tmp_path / "plain"
    folder.mkdir()
    sf.write(folder / "a.wav", _tone(0.4, 16000), 16000)
    (folder / "a.txt").write_text("a clip\n")
    sf.write(folder / "b.wav", _tone(0.4, 16000), 16000)
    with pytest.raises(ManifestError, match="b.wav: no sibling transcript b.txt"):
        import_folder(folder, "test")
    (folder / "b.txt").write_text("  \n")
    with pytest.raises(ManifestError, match="empty transcript"):
        import_folder(folder, "test")


@dataclass
class _Optim:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class _Cfg:
    steps: int = 10
    name: str | None = None
    optim: _Optim = field(default_factory=_Optim)


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 3.0e-4\n")
    cfg = load_config(_Cfg, path, ["optim.betas=[0.8, 0.9]", "name=run1"])
    assert cfg == _Cfg(steps=20, name="run1", optim=_Optim(lr=3e-4, betas=[0.8, 0.9]))
    with pytest.raises(ConfigError, match="unknown config key.*optim.lrr"):
        load_config(_Cfg, path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(_Cfg, None, ["steps=ten"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(_Cfg, None, ["steps"])


def test_write_manifest_rebases_relative_audio(tmp_path):
    (tmp_path / "corpus" / "audio").mkdir(parents=True)
    write_manifest(tmp_path / "corpus" / "m.jsonl", [_utt(0)])
    rows = read_manifest(tmp_path / "corpus" / "m.jsonl")
    write_manifest(tmp_path / "run" / "aligned" / "m.jsonl", rows)
    moved = read_manifest(tmp_path / "run" / "aligned" / "m.jsonl")
    assert moved[0].audio_path.resolve() == (tmp_path / "corpus" / "audio" / "u0.wav").resolve()
    assert moved[0].audio == "../../corpus/audio/u0.wav"
