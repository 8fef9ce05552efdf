"""speechlm.data.sources: Hugging Face datasets (saved to disk, parquet) and Lhotse CutSets / recording +
supervision pairs read wherever a manifest is read: the same rows, audio samples, batches and stage-1 losses as
the equivalent JSONL manifest; bad rows are named errors or skipped; missing libraries say what to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.data.audio import load_audio
from speechlm.data.manifest import read_manifest
from speechlm.data.sources import is_source, parse_spec, source_fingerprint
from speechlm.errors import ManifestError
from tests.training_helpers import ROOT, SR, make_world, run_recipe, stage1_overrides

pytest.importorskip("datasets")
pytest.importorskip("lhotse")

GAP = 4000  # samples of silence between the clips of the long recording


def _wav_bytes(wave: np.ndarray, sr: int = SR) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, wave, sr, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def hf_rows(rows, audio_cells) -> dict:
    return {"id": [r.id for r in rows], "audio": audio_cells, "text": [r.text for r in rows],
            "split": [r.split for r in rows], "token_boundaries": [r.token_boundaries for r in rows],
            "boundary_frame_rate_hz": [r.boundary_frame_rate_hz for r in rows]}


def hf_dataset(data: dict):
    from datasets import Audio, Dataset, Features, List, Value

    # the Audio column is built from its raw {bytes, path} struct: encoding through datasets needs torchcodec
    feats = {"id": Value("string"), "audio": {"bytes": Value("binary"), "path": Value("string")},
             "text": Value("string"), "split": Value("string"), "token_boundaries": List(Value("int64")),
             "boundary_frame_rate_hz": Value("float64")}
    ds = Dataset.from_dict(data, features=Features({k: feats[k] for k in data}))
    return ds.cast_column("audio", Audio())


def lhotse_cuts(rows, root: Path):
    """The first row as a whole-file recording; the others as cuts inside one long recording (GAP apart)."""
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    pieces, cuts, offset = [], [], 0
    for i, r in enumerate(rows):
        data, _ = sf.read(str(r.audio_path), dtype="int16")
        custom = {"split": r.split, "token_boundaries": r.token_boundaries,
                  "boundary_frame_rate_hz": r.boundary_frame_rate_hz}
        if i == 0:
            rec, start = Recording.from_file(str(r.audio_path)), 0
        else:
            pieces += [data, np.zeros(GAP, dtype=np.int16)]
            rec, start = None, offset
            offset += len(data) + GAP
        cuts.append((r, rec, start, len(data), custom))
    sf.write(str(root / "long.wav"), np.concatenate(pieces), SR, subtype="PCM_16")
    long = Recording.from_file(str(root / "long.wav"))
    out = []
    for r, rec, start, n, custom in cuts:
        rec = rec or long
        sup = SupervisionSegment(id=r.id, recording_id=rec.id, start=0.0, duration=n / SR, text=r.text,
                                 speaker=r.speaker)
        out.append(MonoCut(id=r.id, start=start / SR, duration=n / SR, channel=0, recording=rec,
                           supervisions=[sup], custom=custom))
    return CutSet.from_cuts(out), long


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """make_world's JSONL manifest (tiny models, noise+tone clips with token boundaries) and the same rows as a
    datasets folder, a parquet file, a DatasetDict and a Lhotse CutSet; the clip cache in the world folder."""
    root = tmp_path_factory.mktemp("sources")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPEECHLM_CACHE", str(root / "cache"))
    paths = make_world(root, n_train=6, n_valid=2, cache=False)
    rows = read_manifest(paths["manifest"])
    ds = hf_dataset(hf_rows(rows, [{"bytes": r.audio_path.read_bytes(), "path": Path(r.audio).name} for r in rows]))
    ds.save_to_disk(str(root / "hf_disk"))
    ds.to_parquet(str(root / "hf.parquet"))
    from datasets import DatasetDict

    DatasetDict({s: ds.select([i for i, r in enumerate(rows) if r.split == s]).remove_columns("split")
                 for s in ("train", "valid")}).save_to_disk(str(root / "hf_dict"))
    cuts, _ = lhotse_cuts(rows, root)
    cuts.to_file(root / "cuts.jsonl.gz")
    yield {**paths, "root": root, "rows": rows, "hf_disk": str(root / "hf_disk"), "parquet": str(root / "hf.parquet"),
           "hf_dict": f"hf:{root / 'hf_dict'}", "lhotse": str(root / "cuts.jsonl.gz")}
    mp.undo()


SPECS = ("hf_disk", "parquet", "hf_dict", "lhotse")


def _same_rows(got, want) -> None:
    assert [u.id for u in got] == [u.id for u in want]
    for g, w in zip(got, want, strict=True):
        assert (g.text, g.split, g.sample_rate, g.token_boundaries, g.boundary_frame_rate_hz) == \
               (w.text, w.split, w.sample_rate, w.token_boundaries, w.boundary_frame_rate_hz)
        assert g.duration_s == pytest.approx(w.duration_s, abs=1e-9)
        assert torch.equal(load_audio(g.audio_path, None, g.sample_rate), load_audio(w.audio_path, None, w.sample_rate))


@pytest.mark.parametrize("key", SPECS)
def test_a_source_gives_the_rows_and_samples_of_the_jsonl_manifest(world, key):
    assert is_source(world[key]) and not is_source(world["manifest"])
    _same_rows(read_manifest(world[key]), world["rows"])


def test_clips_are_cached_once_by_content_and_cuts_are_read_from_their_recording(world):
    cache = Path(world["root"]) / "cache" / "clips"
    hf = read_manifest(world["hf_disk"])
    assert all(Path(u.audio).is_relative_to(cache) for u in hf)
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.wav")}
    read_manifest(world["parquet"])  # the same bytes: the same clip files, not written again
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.wav")} == before
    cuts = read_manifest(world["lhotse"])
    assert cuts[0].audio_path == world["rows"][0].audio_path.resolve()  # a whole-file cut: the file itself
    assert all(Path(u.audio).is_relative_to(cache) for u in cuts[1:])  # cuts inside long.wav: their samples
    assert sf.info(str(cuts[1].audio_path)).subtype == "PCM_16"


def test_lhotse_recordings_and_supervisions_pair(world, tmp_path):
    from lhotse import RecordingSet, SupervisionSet, load_manifest

    rows = world["rows"][1:]
    cuts = list(load_manifest(world["lhotse"]))[1:]  # the cuts inside long.wav
    long = cuts[0].recording
    RecordingSet.from_recordings([long]).to_file(tmp_path / "corpus_recordings_dev.jsonl.gz")
    sups = [c.supervisions[0].with_offset(c.start) for c in cuts]
    SupervisionSet.from_segments(sups).to_file(tmp_path / "corpus_supervisions_dev.jsonl.gz")
    want = rows
    # the supervisions file found beside the recordings by its name; the other way round with an option
    got = read_manifest(f"{tmp_path / 'corpus_recordings_dev.jsonl.gz'}#split=dev")  # one cut per supervision
    assert [(u.id, u.text, u.split) for u in got] == [(w.id, w.text, "dev") for w in want]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(load_audio(g.audio_path, None), load_audio(w.audio_path, None))
    (tmp_path / "sups.jsonl.gz").write_bytes((tmp_path / "corpus_supervisions_dev.jsonl.gz").read_bytes())
    with pytest.raises(ManifestError, match="without its recordings.*#recordings=PATH"):
        read_manifest(tmp_path / "sups.jsonl.gz")
    got2 = read_manifest(f"lhotse:{tmp_path / 'sups.jsonl.gz'}#recordings={tmp_path / 'corpus_recordings_dev.jsonl.gz'}")
    assert [u.id for u in got2] == [u.id for u in got]


def _train_batches(world, spec: str, n: int = 4):
    from transformers import AutoTokenizer

    from speechlm.config import load_config
    from speechlm.models.encoder import SpeechEncoder
    from speechlm.training import build
    from speechlm.training.configs import Stage1Config
    from speechlm.training.distributed import DistInfo

    over = stage1_overrides(world, world["root"] / "unused", cache=False, **{"data.train_manifest": spec,
                                                                             "data.max_frames": 120})
    cfg = load_config(Stage1Config, ROOT / "recipes" / "configs" / "stage1_tiny.yaml", over)
    enc = build.encoder_facts(cfg.model, cfg.data, SpeechEncoder(world["enc"]))
    reader = build.make_reader(cfg.data, enc, AutoTokenizer.from_pretrained(world["llm"]))
    it = build.train_batches(cfg.data, reader, DistInfo(0, 1, 0, 1), cfg.seed)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("key", SPECS)
def test_training_batches_from_a_source_equal_those_from_jsonl(world, key):
    want, got = _train_batches(world, world["manifest"]), _train_batches(world, world[key])
    for g, w in zip(got, want, strict=True):
        assert g.utt_ids == w.utt_ids and len(g.utt_ids) >= 1
        assert torch.equal(g.token_ids, w.token_ids) and torch.equal(g.boundaries, w.boundaries)
        assert all(torch.equal(a, b) for a, b in zip(g.waves, w.waves, strict=True))


def test_stage1_trains_from_a_source_like_from_jsonl(world, tmp_path):
    """Feature caches built from the JSONL and from the Lhotse CutSet (cuts inside a longer recording), a few
    stage-1 steps from each through the recipe (the two runs side by side): the same losses. The batches of
    every source kind are compared above; a recipe run per kind would cost half a minute each."""
    from concurrent.futures import ThreadPoolExecutor

    from speechlm.data.feature_cache import build_feature_cache
    from speechlm.models.encoder import SpeechEncoder

    encoder = SpeechEncoder(world["enc"])

    def train(key: str):
        cache = tmp_path / f"cache-{key}"
        build_feature_cache(world[key], encoder, cache)
        return run_recipe("stage1_distill.py", "stage1_tiny.yaml", stage1_overrides(
            {**world, "cache": str(cache)}, tmp_path / key, **{"data.train_manifest": world[key],
                                                               "loop.max_steps": 3, "loop.eval_every": 3,
                                                               "loop.save_every": 3}))

    keys = ("manifest", "lhotse")
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(keys, pool.map(train, keys), strict=True))
    losses = {}
    for key, proc in procs.items():
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        losses[key] = json.loads((tmp_path / key / "metrics.json").read_text())["train_losses"]
    assert len(losses["manifest"]) == 3
    assert losses["lhotse"] == losses["manifest"]


# ------------------------------------------------------------------------------------------ bad rows
@pytest.fixture
def bad_hf(world, tmp_path):
    rows = world["rows"][:5]
    good = [{"bytes": r.audio_path.read_bytes(), "path": None} for r in rows]
    quiet = np.zeros(SR // 2, dtype=np.float32)
    good[1] = None  # missing audio
    good[2] = {"bytes": _wav_bytes(quiet, 8000), "path": None}  # wrong sample rate (with #sample_rate=16000)
    good[3] = {"bytes": b"RIFF junk" * 20, "path": None}  # unreadable
    data = hf_rows(rows, good)
    data["text"][4] = None  # missing text
    hf_dataset(data).save_to_disk(str(tmp_path / "bad"))
    return tmp_path / "bad", rows


def test_bad_dataset_rows_are_named_errors_or_skipped(bad_hf):
    path, rows = bad_hf
    spec = f"hf:{path}#sample_rate=16000"
    with pytest.raises(ManifestError, match=r"row 1 \(id 'u001'\): missing audio"):
        read_manifest(spec)
    bad: list[str] = []
    got = read_manifest(spec, skip_bad=True, bad_rows=bad)
    assert [u.id for u in got] == [rows[0].id]
    assert len(bad) == 4
    assert "row 1 (id 'u001'): missing audio" in bad[0]
    assert "row 2 (id 'u002'): audio is 8000 Hz but 16000 Hz was expected" in bad[1]
    assert "row 3 (id 'u003'): cannot read audio" in bad[2]
    assert "row 4 (id 'u004'): missing text (column 'text')" in bad[3]
    # without the sample_rate option any rate is taken (resampled on loading, as datasets does)
    assert [u.sample_rate for u in read_manifest(path, skip_bad=True)] == [SR, 8000]


def test_bad_cuts_are_named_errors_or_skipped(world, tmp_path):
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    sf.write(str(tmp_path / "narrow.wav"), np.zeros(SR, dtype=np.float32), 8000)
    rec = Recording.from_file(str(tmp_path / "narrow.wav"))
    lying = Recording(id="lying", sources=rec.sources, sampling_rate=16000, num_samples=SR, duration=1.0)
    good = next(iter(__import__("lhotse").load_manifest(world["lhotse"])))
    gone = Recording(id="gone", sources=[type(rec.sources[0])(type="file", channels=[0],
                                                              source=str(tmp_path / "gone.wav"))],
                     sampling_rate=16000, num_samples=SR, duration=1.0)

    def cut(cid, recording, text="some words", start=0.25):
        sups = [SupervisionSegment(id=cid, recording_id=recording.id, start=0, duration=0.5, text=text)] \
            if text is not None else []
        return MonoCut(id=cid, start=start, duration=0.5, channel=0, recording=recording, supervisions=sups)

    CutSet.from_cuts([good, cut("rate", lying), cut("silent", good.recording, None), cut("missing", gone),
                      cut("late", good.recording, start=30.0)]).to_file(tmp_path / "bad.jsonl.gz")
    with pytest.raises(ManifestError, match=r"cut 'rate'.*8000 Hz but 16000 Hz was expected \(recording 'lying'"):
        read_manifest(tmp_path / "bad.jsonl.gz")
    bad: list[str] = []
    got = read_manifest(tmp_path / "bad.jsonl.gz", skip_bad=True, bad_rows=bad)
    assert [u.id for u in got] == [good.id]
    assert len(bad) == 4
    assert "cut 'rate'" in bad[0] and "cut 'silent': missing text" in bad[1]
    assert "cut 'missing': audio file" in bad[2] and "cut 'late': cut [30.0, 30.5] s ends after its recording" in bad[3]


def test_specs_options_and_clear_errors(world, tmp_path, monkeypatch):
    spec = parse_spec(f"hf:{world['hf_disk']}#text=text#speaker=id")
    assert spec.kind == "hf" and spec.options == {"text": "text", "speaker": "id"}
    assert [u.speaker for u in read_manifest(str(spec))] == [r.id for r in world["rows"]]
    assert parse_spec(world["manifest"]) is None
    with pytest.raises(ManifestError, match="unknown option.*colour.*known: audio"):
        parse_spec(f"{world['hf_disk']}#colour=red")
    with pytest.raises(ManifestError, match="no column 'words' \\(option text\\); columns: "):
        read_manifest(f"{world['hf_disk']}#text=words")
    with pytest.raises(ManifestError, match="source not found"):
        read_manifest(f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(ManifestError, match="no split 'test' in this DatasetDict \\(it has train, valid\\)"):
        read_manifest(f"{world['hf_dict']}#split=test")
    assert {u.split for u in read_manifest(f"{world['hf_dict']}#split=valid")} == {"valid"}
    # split=NAME reads that split only: rows of a split column, Hub-named parquet files
    valid = [r.id for r in world["rows"] if r.split == "valid"]
    assert [u.id for u in read_manifest(f"{world['hf_disk']}#split=valid")] == valid
    from datasets import load_from_disk

    ds = load_from_disk(world["hf_disk"]).remove_columns("split")
    for part in ("train", "valid"):
        keep = [i for i, r in enumerate(world["rows"]) if r.split == part]
        ds.select(keep).to_parquet(str(tmp_path / "hub" / "data" / f"{part}-00000-of-00001.parquet"))
    got = read_manifest(f"{tmp_path / 'hub'}#split=valid")
    assert [(u.id, u.split) for u in got] == [(i, "valid") for i in valid]
    assert {u.split for u in read_manifest(tmp_path / "hub")} == {"train", "valid"}
    fp = source_fingerprint(world["parquet"])
    assert fp == source_fingerprint(world["parquet"]) != source_fingerprint(world["hf_disk"])
    # without the optional libraries: which package to install
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "lhotse", None)
    with pytest.raises(ManifestError, match=r"needs the 'datasets' package; install it with pip install 'speechlm\[data\]'"):
        read_manifest(world["hf_disk"])
    with pytest.raises(ManifestError, match=r"needs the 'lhotse' package"):
        read_manifest(world["lhotse"])


def test_import_corpus_writes_a_jsonl_manifest_from_a_source(world, tmp_path):
    env_cache = {"SPEECHLM_CACHE": str(Path(world["root"]) / "cache")}
    out = tmp_path / "valid.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "import_corpus.py"), "--layout", "hf", "--root",
                           world["hf_dict"], "--split", "valid", "--out", str(out), "--no-check-speech"],
                          check=False, capture_output=True, text=True, env={**os.environ, **env_cache}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_rows(read_manifest(out), [r for r in world["rows"] if r.split == "valid"])
