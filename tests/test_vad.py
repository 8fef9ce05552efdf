"""speechlm.data.vad (Silero voice activity) and speechlm.data.speech_check (the import/corpus gate): silence,
noise and a 20 ms clip hold no speech; a spoken sentence (eSpeak, the project's TTS) is found, to the sample the
same with 5 s of silence around it; the gate names and skips a silent clip with a 10-word transcript."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.data.importers import import_folder
from speechlm.data.speech_check import MIN_SPEECH_S_PER_WORD, check_clip, gate_rows, speech_problem
from speechlm.data.vad import VADConfig, VoiceActivity
from speechlm.errors import ConfigError, ManifestError

SR = 16_000
SENTENCE = "The weather is nice today and we are going to the park"


@pytest.fixture(scope="module")
def sentence():
    from speechlm.data.tts import synthesize

    s = synthesize(SENTENCE, voice="en-us")
    assert s.sample_rate == SR
    return s


def test_silence_noise_and_a_20_ms_clip_hold_no_speech():
    vad = VoiceActivity()
    rng = np.random.default_rng(0)
    clips = {"silence 2 s": np.zeros(2 * SR, dtype=np.float32),
             "white noise 3 s": rng.normal(0, 0.3, 3 * SR).clip(-1, 1).astype(np.float32),
             "loud noise 3 s": rng.uniform(-1, 1, 3 * SR).astype(np.float32),
             "20 ms": np.zeros(SR // 50, dtype=np.float32), "20 ms of noise": rng.normal(0, 0.3, SR // 50),
             "empty": np.zeros(0, dtype=np.float32)}
    for name, wave in clips.items():
        found = vad.detect(wave, SR)
        assert found.no_speech and found.regions == [] and found.speech_s == 0, name
    assert vad.probabilities(np.zeros(100, dtype=np.float32)).size == 0  # shorter than one model frame: not run
    assert vad.detect(torch.zeros(SR), SR).duration_s == 1.0


def test_a_sentence_padded_with_silence_is_found_and_nothing_else(sentence):
    vad = VoiceActivity()
    wave = sentence.wave.numpy()
    pad = np.zeros(5 * SR, dtype=np.float32)
    plain, padded = vad.detect(wave, SR), vad.detect(np.concatenate([pad, wave, pad]), SR)
    first, last = sentence.words[0].start_s, sentence.words[-1].end_s
    for found, offset in ((plain, 0.0), (padded, 5.0)):
        assert found.regions, offset
        start, end = found.regions[0][0] - offset, found.regions[-1][1] - offset
        assert start <= first and end >= last  # the sentence is covered ...
        assert start >= 0 and end <= wave.size / SR  # ... and no region reaches into the silence
        assert 0.7 * (last - first) <= found.speech_s <= wave.size / SR
    # the same speech gives the same regions wherever it sits, to the sample
    assert [x - 5 for r in padded.regions for x in r] == pytest.approx([x for r in plain.regions for x in r], abs=1e-9)
    assert padded.sample_bounds(SR, wave.size + 10 * SR)[0][0] == plain.sample_bounds(SR, wave.size)[0][0] + 5 * SR
    # padding is configurable: more padding, wider regions
    wide = VoiceActivity(VADConfig(pad_ms=150)).detect(wave, SR)
    assert wide.regions[0][0] < plain.regions[0][0] and wide.speech_s > plain.speech_s
    # another rate is resampled: the same regions within a few ms
    from speechlm.data.audio import resample

    at_48k = vad.detect(resample(sentence.wave, SR, 48_000), 48_000)
    assert [x for r in at_48k.regions for x in r] == pytest.approx([x for r in plain.regions for x in r], abs=0.01)
    # disabled: the whole clip is speech, no model runs
    off = VoiceActivity(VADConfig(enabled=False)).detect(np.concatenate([pad, wave]), SR)
    assert off.regions == [(0.0, pytest.approx(5 + wave.size / SR))] and off.probabilities.size == 0


def test_one_detector_serves_many_threads(sentence):
    vad = VoiceActivity()
    rng = np.random.default_rng(1)
    clips = [sentence.wave.numpy(), rng.normal(0, 0.3, SR).astype(np.float32),
             np.concatenate([np.zeros(SR, dtype=np.float32), sentence.wave.numpy()])] * 3
    want = [vad.detect(c, SR).regions for c in clips]
    got: list = [None] * len(clips)

    def work(i):
        got[i] = vad.detect(clips[i], SR).regions

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(clips))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_loading_the_model_keeps_the_callers_torch_threads():
    code = ("import torch; torch.set_num_threads(2); from speechlm.data.vad import silero_model; silero_model(); "
            "print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "2"  # importing silero_vad alone would leave 1


def test_config_is_checked():
    with pytest.raises(ConfigError, match="threshold"):
        VADConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="pad_ms"):
        VADConfig(pad_ms=-1)
    with pytest.raises(ConfigError, match="min_silence_ms"):
        VADConfig(min_silence_ms=0.5)
    with pytest.raises(ConfigError, match="quiet_db"):
        VADConfig(quiet_db=3.0)


# ------------------------------------------------------------------------------------------ the import gate
def test_speech_problem_rule():
    assert "no speech" in speech_problem(0.0, "one two three")
    assert speech_problem(10 * MIN_SPEECH_S_PER_WORD, " ".join(["w"] * 10)) is None  # at the floor: fine
    assert "less than" in speech_problem(0.3, " ".join(["w"] * 10))  # 0.03 s per word: 33 words per second
    assert speech_problem(2.0, "a normal sentence of six words") is None


def test_import_flags_a_silent_clip_names_it_and_skips_it_when_asked(tmp_path, sentence):
    folder = tmp_path / "corpus"
    folder.mkdir()
    sf.write(folder / "silent.wav", np.zeros(3 * SR, dtype=np.float32), SR)
    (folder / "silent.txt").write_text("this clip claims to hold ten words but holds none\n")
    sf.write(folder / "spoken.wav", sentence.wave.numpy(), SR)
    (folder / "spoken.txt").write_text(SENTENCE + "\n")
    assert len(import_folder(folder, "train")) == 2  # without the check both are imported
    with pytest.raises(ManifestError, match=r"(?s)1 clip\(s\).*silent \(.*silent.wav\): no speech detected for a "
                                            r"10-word transcript"):
        import_folder(folder, "train", check_speech=True)
    bad: list[str] = []
    rows = import_folder(folder, "train", skip_bad=True, bad_rows=bad, check_speech=True, workers=2)
    assert [r.id for r in rows] == ["spoken"]
    assert len(bad) == 1 and bad[0].startswith("silent (") and "no speech detected" in bad[0]
    assert gate_rows(rows) == rows
    assert check_clip(sentence.wave, SR, SENTENCE) is None
    assert check_clip(np.zeros(SR // 50, dtype=np.float32), SR, "hello") is not None  # 20 ms: no speech


def test_import_tool_reports_flagged_clips(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    sf.write(folder / "silent.wav", np.zeros(2 * SR, dtype=np.float32), SR)
    (folder / "silent.txt").write_text("one two three four five six seven eight nine ten\n")
    tool = Path(__file__).resolve().parents[1] / "tools" / "import_corpus.py"
    base = [sys.executable, str(tool), "--layout", "folder", "--root", str(folder), "--split", "train",
            "--out", str(tmp_path / "m.jsonl"), "--workers", "1"]
    done = subprocess.run(base, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "silent" in done.stderr and "no speech detected" in done.stderr
    done = subprocess.run([*base, "--skip-bad"], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "wrote 0 rows" in done.stdout and "skipped: silent" in done.stdout


def test_the_corpus_builder_checks_each_clip(tmp_path, monkeypatch):
    from speechlm.data import corpus, tts
    from speechlm.data.corpus_plan import PlannedUtterance

    item = PlannedUtterance("test-000000-x", "Tom went to the store.", "test", "x", "en-us", 175, 50)
    row, why = corpus._synthesize_one((item, str(tmp_path)))
    assert row.id == item.id and why is None
    monkeypatch.setattr(tts, "synthesize", lambda *a, **k: tts.Synthesis(torch.zeros(SR), SR, None))  # a failed engine
    row, why = corpus._synthesize_one((item, str(tmp_path)))
    assert row.id == item.id and "no speech detected for a 5-word transcript" in why
