"""Corpora kept as Hugging Face ``datasets`` or Lhotse manifests, read as manifest rows.

:func:`speechlm.data.manifest.iter_manifest` (and so every tool that takes a manifest) accepts a *source spec*
besides a JSONL file; this module turns a spec into the same row dicts a JSONL line holds, which the manifest
module then validates exactly as it validates a line. A spec is a path, optionally with a prefix and options::

    hf:data/my_dataset                       a datasets folder (save_to_disk: Dataset or DatasetDict)
    hf:data/train.parquet                    a parquet file, or a folder of them (the Hub's data/ layout)
    lhotse:data/cuts_train.jsonl.gz          a Lhotse CutSet
    lhotse:data/recordings.jsonl.gz          a RecordingSet; its SupervisionSet beside it (``recordings`` ->
                                             ``supervisions`` in the name) or given with #supervisions=PATH
    hf:data/cv#text=sentence#speaker=client_id#split=test     options: #key=value, as many as needed

Without a prefix a path is recognised by its shape: a folder holding ``dataset_info.json``,
``dataset_dict.json`` or ``*.parquet`` files, or a ``.parquet`` file, is ``hf``; a ``.jsonl.gz`` file is
``lhotse``; anything else is a JSONL manifest. ``#`` separates options because ``,`` separates shards and
``?`` is a glob character in the shard lists of the training configs.

Options of ``hf``: ``audio`` (column; default: the column of type Audio), ``text`` (default ``text``, else the
one of sentence/transcription/transcript/normalized_text present), ``id`` (default ``id`` if present, else
``<name>-<row>``), ``speaker`` (default ``speaker`` or ``speaker_id`` if present), ``split_column`` (default
``split`` if present), ``sample_rate`` (every clip must be at this rate, a clip at another is a bad row; without
it any rate is taken and resampled on loading, as datasets does). Options of ``lhotse``: ``supervisions`` /
``recordings`` (the other half of a pair). Both: ``split=NAME`` reads that split only (the DatasetDict part or
the Hub-named parquet files ``NAME-00000-of-00003.parquet`` of that name; the rows whose split column, the cuts
whose ``custom["split"]``, holds it) and rows that name no split of their own get ``NAME``; without it a row's
split is its own, else its DatasetDict part's or parquet file's, else ``train``.

Lhotse gives one row per cut (a pair: one cut per supervision); its text is its supervisions' texts joined in
time order, its speaker the first supervision's. The optional manifest fields (``token_boundaries`` +
``boundary_frame_rate_hz``, ``words``, ``augment``, ``translation``, ``translation_lang``) come from a column of
that name, or from the cut's ``custom`` dict.

Audio: rows must name audio files that :mod:`speechlm.data.audio` reads. A clip stored *inside* a dataset
(the bytes of an Audio column) or *inside* a longer recording (a cut with an offset, a channel of a
multi-channel file, a non-file Lhotse source) is written once into a clip cache, ``<cache_dir>/clips``
(``SPEECHLM_CACHE`` moves it), atomically, under a content key: the SHA-256 of the bytes for datasets clips
(their bytes verbatim, so the samples are the dataset's), of the cut's description and its source file's size
and mtime for Lhotse (a WAV of the cut's samples, in the source's sample format, so 16-bit audio stays exact).
Later reads find the clip without reading the audio again. A cut covering a whole single-file recording, and
a datasets row that only names a file, point at that file directly. Relative audio paths resolve against the
dataset's (or manifest's) folder first, then the working directory.

Both libraries are optional (``pip install 'speechlm[data]'``); a spec that needs a missing one is a clear
:class:`ManifestError`. Datasets' own Audio decoding (torchcodec) is not used: the column is read raw.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from speechlm.atomic import atomic_write_bytes
from speechlm.errors import ManifestError
from speechlm.paths import cache_dir

KINDS = ("hf", "lhotse")
HF_OPTIONS = ("audio", "text", "id", "speaker", "split_column", "split", "sample_rate")
LHOTSE_OPTIONS = ("split", "supervisions", "recordings")
TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text")
SPEAKER_COLUMNS = ("speaker", "speaker_id")
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
#: Optional manifest fields taken as they are from a column (datasets) or ``cut.custom`` (Lhotse) of that name.
EXTRA_FIELDS = ("words", "token_boundaries", "boundary_frame_rate_hz", "augment", "translation", "translation_lang")
INSTALL = "pip install 'speechlm[data]'"
#: Rows a thunk makes: (where, make_row); make_row() returns a manifest row dict or raises ManifestError.
Rows = Iterator[tuple[str, Callable[[], dict]]]


@dataclass
class SourceSpec:
    kind: str  # "hf" or "lhotse"
    path: Path
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + "".join(f"#{k}={v}" for k, v in self.options.items())


def clips_dir() -> Path:
    """Where clips stored inside datasets or recordings are written once: ``<cache_dir>/clips``."""
    return cache_dir() / "clips"


def _shape_kind(path: Path) -> str | None:
    if path.is_dir():
        if any((path / m).is_file() for m in HF_MARKERS) or any(path.glob("*.parquet")) \
                or any(path.glob("*/*.parquet")):
            return "hf"
        return None
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "hf"
    if name.endswith(".jsonl.gz"):
        return "lhotse"
    return None


def parse_spec(spec: str | Path) -> SourceSpec | None:
    """The source a spec names, or None for a plain JSONL manifest (see the module doc for the syntax)."""
    text = str(spec)
    kind = next((k for k in KINDS if text.startswith(f"{k}:")), None)
    body = text[len(kind) + 1:] if kind else text
    if kind is None:
        whole = Path(body).expanduser()
        if whole.exists():  # an existing path is taken whole, a '#' in its name included
            kind = _shape_kind(whole)
            return SourceSpec(kind, whole) if kind else None
        kind = _shape_kind(Path(body.split("#")[0]).expanduser())
        if kind is None:
            return None  # a JSONL manifest (a missing one: iter_manifest says so)
    path_text, *opts = body.split("#")
    options: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or not key.strip():
            raise ManifestError(f"{text}: option {opt!r} is not key=value")
        options[key.strip()] = value.strip()
    path = Path(path_text).expanduser()
    allowed = HF_OPTIONS if kind == "hf" else LHOTSE_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ManifestError(f"{text}: unknown option(s) {', '.join(unknown)} for {kind}: (known: {', '.join(allowed)})")
    if "sample_rate" in options and not options["sample_rate"].isdigit():
        raise ManifestError(f"{text}: sample_rate must be a whole number of Hz, got {options['sample_rate']!r}")
    if not path.exists():
        raise ManifestError(f"{path}: {'datasets' if kind == 'hf' else 'Lhotse'} source not found (spec {text!r})")
    return SourceSpec(kind, path, options)


def is_source(spec: str | Path) -> bool:
    """Whether ``spec`` names a datasets or Lhotse source rather than a JSONL manifest."""
    text = str(spec)
    if text.startswith(tuple(f"{k}:" for k in KINDS)):
        return True
    return _shape_kind(Path(text.split("#")[0]).expanduser()) is not None


def source_rows(spec: SourceSpec) -> Rows:
    """``(where, make_row)`` for every row of a source, in order; ``where`` names the file and row or cut."""
    return _hf_rows(spec) if spec.kind == "hf" else _lhotse_rows(spec)


def source_fingerprint(spec: str | Path) -> str:
    """SHA-256 of a source's spec and of the name, size and mtime of every file under it (cheap; changes when
    the data files change)."""
    parsed = parse_spec(spec)
    h = hashlib.sha256(str(parsed or spec).encode())
    if parsed is not None:
        files = sorted(parsed.path.rglob("*")) if parsed.path.is_dir() else [parsed.path]
        extra = [Path(v).expanduser() for k, v in parsed.options.items() if k in ("supervisions", "recordings")]
        for f in [*files, *extra]:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ audio helpers
def _audio_header(data: bytes | Path, where: str) -> tuple[int, int, str, str]:
    """(sample rate, frames, format, subtype) of encoded audio bytes or a file."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data) if isinstance(data, bytes) else str(data))
    except Exception as e:  # noqa: BLE001 -- soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise ManifestError(f"{where}: cannot read audio ({e})") from None
    if info.frames <= 0:
        raise ManifestError(f"{where}: audio is empty")
    return int(info.samplerate), int(info.frames), str(info.format), str(info.subtype)


def _check_rate(rate: int, expected: int | None, where: str, why: str) -> None:
    if expected is not None and rate != expected:
        raise ManifestError(f"{where}: audio is {rate} Hz but {expected} Hz was expected ({why})")


def _resolve(name: str, base: Path, where: str) -> Path:
    p = Path(name).expanduser()
    for candidate in ([p] if p.is_absolute() else [base / p, p]):
        if candidate.is_file():
            return candidate.resolve()
    raise ManifestError(f"{where}: audio file {name!r} not found (looked in {base} and the working directory)")


def _clip_path(key: str, suffix: str) -> Path:
    return clips_dir() / key[:2] / f"{key}{suffix}"


def _bytes_clip(data: bytes, where: str, expected_sr: int | None) -> tuple[Path, int, float]:
    """An in-dataset clip written (once) into the clip cache under the SHA-256 of its bytes."""
    sr, frames, fmt, _ = _audio_header(data, where)
    _check_rate(sr, expected_sr, where, "option sample_rate")
    path = _clip_path(hashlib.sha256(data).hexdigest(), f".{fmt.lower()}")
    if not path.is_file():
        atomic_write_bytes(path, data)
    return path, sr, frames / sr


# ------------------------------------------------------------------------------------------ datasets
def _need(module: str, what: str, spec: SourceSpec):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ManifestError(f"{spec}: reading {what} needs the '{module.split('.')[0]}' package; "
                            f"install it with {INSTALL}") from None


def _hf_parts(spec: SourceSpec) -> list[tuple]:
    """(where prefix, part name or None, base folder, arrow schema, iterator of arrow batches) per part."""
    path, want = spec.path, spec.options.get("split")
    if path.is_file() or not any((path / m).is_file() for m in HF_MARKERS):
        pq = _need("pyarrow.parquet", "parquet files", spec)
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        if not files:
            raise ManifestError(f"{path}: no .parquet files")
        parts = []
        for f in files:
            m = re.match(r"(.+?)-\d{5}-of-\d{5}\.parquet$", f.name)  # the Hub's <split>-00000-of-00001.parquet
            part = m.group(1) if m else None
            if want and part is not None and part != want and len(files) > 1:
                continue
            try:
                pf = pq.ParquetFile(str(f))
            except Exception as e:  # noqa: BLE001 -- pyarrow raises ArrowInvalid, OSError ...
                raise ManifestError(f"{f}: not a readable parquet file ({e})") from None
            parts.append((str(f), part, f.parent, pf.schema_arrow, pf.iter_batches(batch_size=256)))
        if not parts:
            raise ManifestError(f"{path}: no parquet file of split {want!r}")
        return parts
    datasets = _need("datasets", "a Hugging Face datasets folder", spec)
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 -- datasets raises FileNotFoundError, ValueError, ArrowInvalid ...
        raise ManifestError(f"{path}: not a readable datasets folder ({e})") from None
    named = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {None: loaded}
    if want and None not in named:
        if want not in named:
            raise ManifestError(f"{path}: no split {want!r} in this DatasetDict (it has {', '.join(named)})")
        named = {want: named[want]}
    return [(f"{path}/{name}" if name else str(path), name, path, ds.features.arrow_schema,
             ds.with_format("arrow").iter(256))
            for name, ds in named.items()]


def _hf_columns(spec: SourceSpec, schema, where: str) -> dict[str, str | None]:
    from_schema = {}
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            from_schema = json.loads(meta).get("info", {}).get("features", {})
        except ValueError:
            from_schema = {}
    names = list(schema.names)
    opts = spec.options

    def named(key: str) -> str:
        if opts[key] not in names:
            raise ManifestError(f"{where}: no column {opts[key]!r} (option {key}); columns: {', '.join(names)}")
        return opts[key]

    if "audio" in opts:
        audio = named("audio")
    else:
        typed = [n for n in names if isinstance(from_schema.get(n), dict) and from_schema[n].get("_type") == "Audio"]
        typed = typed or [n for n in names if str(schema.field(n).type).startswith("struct<bytes")]
        if len(typed) != 1:
            raise ManifestError(f"{where}: {'no' if not typed else 'more than one'} Audio column found "
                                f"(columns: {', '.join(names)}); name it with #audio=COLUMN")
        audio = typed[0]
    if "text" in opts:
        text = named("text")
    else:
        text = next((n for n in TEXT_COLUMNS if n in names), None)
        if text is None:
            raise ManifestError(f"{where}: no text column ({'/'.join(TEXT_COLUMNS)}); columns: {', '.join(names)}; "
                                "name it with #text=COLUMN")
    return {"audio": audio, "text": text,
            "id": named("id") if "id" in opts else ("id" if "id" in names else None),
            "speaker": named("speaker") if "speaker" in opts else next((n for n in SPEAKER_COLUMNS if n in names),
                                                                       None),
            "split": named("split_column") if "split_column" in opts else ("split" if "split" in names else None)}


def _hf_row(spec: SourceSpec, row: dict, cols: dict, where: str, base: Path, default_id: str, part: str | None
            ) -> dict:
    utt_id = row.get(cols["id"]) if cols["id"] else default_id
    utt_id = str(utt_id) if utt_id is not None and str(utt_id) else None
    where = f"{where} (id {utt_id!r})" if utt_id else where
    text = row.get(cols["text"])
    if not isinstance(text, str) or not text.strip():
        raise ManifestError(f"{where}: missing text (column {cols['text']!r})")
    cell = row.get(cols["audio"])
    expected = int(spec.options["sample_rate"]) if "sample_rate" in spec.options else None
    data, name = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (None, cell)
    if data:
        audio, sr, dur = _bytes_clip(bytes(data), where, expected)
    elif isinstance(name, str) and name:
        audio = _resolve(name, base, where)
        sr, frames, _, _ = _audio_header(audio, where)
        _check_rate(sr, expected, where, "option sample_rate")
        dur = frames / sr
    else:
        raise ManifestError(f"{where}: missing audio (column {cols['audio']!r} holds neither bytes nor a path)")
    split = row.get(cols["split"]) if cols["split"] else None
    speaker = row.get(cols["speaker"]) if cols["speaker"] else None
    return {**{k: row[k] for k in EXTRA_FIELDS if row.get(k) is not None},
            "id": utt_id, "audio": str(audio), "sample_rate": sr, "duration_s": dur, "text": text,
            "split": str(split) if split not in (None, "") else spec.options.get("split") or part or "train",
            "speaker": str(speaker) if speaker not in (None, "") else None}


def _hf_rows(spec: SourceSpec) -> Rows:
    for where0, part, base, schema, batches in _hf_parts(spec):
        cols = _hf_columns(spec, schema, where0)
        stem = spec.path.name.removesuffix(".parquet") if spec.path.is_file() else spec.path.name
        prefix = f"{stem}-{part}" if part and not spec.path.is_file() else stem
        want = spec.options.get("split")
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                i += 1
                if want and cols["split"] and row.get(cols["split"]) not in (None, "", want):
                    continue  # a row of another split
                where = f"{where0} row {i - 1}"
                default_id = f"{prefix}-{i - 1:06d}"
                yield where, (lambda row=row, where=where, default_id=default_id, cols=cols, base=base, part=part:
                              _hf_row(spec, row, cols, where, base, default_id, part))


# ------------------------------------------------------------------------------------------ lhotse
def _lhotse_cuts(spec: SourceSpec):
    lhotse = _need("lhotse", "Lhotse manifests", spec)
    path = spec.path
    try:
        first = lhotse.load_manifest_lazy(path)
    except Exception as e:  # noqa: BLE001 -- lhotse raises ValueError, KeyError, JSONDecodeError ...
        raise ManifestError(f"{path}: not a readable Lhotse manifest ({e})") from None
    if isinstance(first, lhotse.CutSet):
        return first
    if not isinstance(first, (lhotse.RecordingSet, lhotse.SupervisionSet)):
        raise ManifestError(f"{path}: a {type(first).__name__}; give a CutSet or a recordings/supervisions pair")
    have, other_kind = ("recordings", "supervisions") if isinstance(first, lhotse.RecordingSet) \
        else ("supervisions", "recordings")
    other = Path(spec.options[other_kind]).expanduser() if other_kind in spec.options \
        else path.with_name(path.name.replace(have, other_kind))
    if other == path or not other.is_file():
        raise ManifestError(f"{path}: a {have} manifest without its {other_kind}: none at {other} "
                            f"(give it with #{other_kind}=PATH)")
    try:
        second = lhotse.load_manifest(other)
        first = lhotse.load_manifest(path)
        recs, sups = (first, second) if have == "recordings" else (second, first)
        return lhotse.CutSet.from_manifests(recordings=recs, supervisions=sups).trim_to_supervisions(
            keep_overlapping=False)
    except Exception as e:  # noqa: BLE001 -- mismatching ids, unreadable files ...
        raise ManifestError(f"{path} + {other}: cannot pair recordings and supervisions ({e})") from None


def _file_source(rec, base: Path, where: str) -> tuple[Path, list[int]] | None:
    """(file, its channel ids) when the recording is one file without transforms, else None."""
    if len(rec.sources) != 1 or rec.sources[0].type != "file" or rec.transforms:
        return None
    src = rec.sources[0]
    return _resolve(str(src.source), base, where), list(src.channels)


def _cut_samples(cut, path: Path, channels: list[int], where: str):
    """The cut's samples (frames, channels) read from its file, offsets rounded as Lhotse rounds them."""
    import soundfile as sf

    sr = cut.recording.sampling_rate
    start, n = round(cut.start * sr), round(cut.duration * sr)
    total = sf.info(str(path)).frames
    if start + n > total + 1:
        raise ManifestError(f"{where}: cut [{cut.start}, {cut.end}] s ends after its recording "
                            f"({total / sr:.3f} s in {path})")
    data, _ = sf.read(str(path), start=start, frames=min(n, total - start), dtype="float32", always_2d=True)
    want = cut.channel if isinstance(cut.channel, list) else [cut.channel]
    try:
        return data[:, [channels.index(c) for c in want]]
    except ValueError:
        raise ManifestError(f"{where}: channel {cut.channel} not in the recording's {channels}") from None


def _lhotse_row(spec: SourceSpec, cut, where: str) -> dict:
    import soundfile as sf

    from speechlm.data.audio import save_audio

    sups = sorted(getattr(cut, "supervisions", []) or [], key=lambda s: s.start)
    text = " ".join(s.text.strip() for s in sups if isinstance(s.text, str) and s.text.strip())
    if not text:
        raise ManifestError(f"{where}: missing text (no supervision with text)")
    rec = getattr(cut, "recording", None)
    if not getattr(cut, "has_recording", True):
        raise ManifestError(f"{where}: missing audio (no recording)")
    base = spec.path.parent
    found = _file_source(rec, base, where) if rec is not None else None
    if found is not None:
        path, channels = found
        sr, frames, _, subtype = _audio_header(path, where)
        _check_rate(sr, int(rec.sampling_rate), where, f"recording {rec.id!r} declares it")
        whole = (abs(cut.start) < 1e-9 and abs(cut.duration * sr - frames) < 1
                 and sorted(cut.channel if isinstance(cut.channel, list) else [cut.channel]) == sorted(channels))
        if whole:
            audio, dur = path, frames / sr
        else:
            st = path.stat()
            key = hashlib.sha256(json.dumps([str(path), st.st_size, st.st_mtime_ns, cut.start, cut.duration,
                                             cut.channel, sr], default=str).encode()).hexdigest()
            audio = _clip_path(key, ".wav")
            if not audio.is_file():
                samples = _cut_samples(cut, path, channels, where)
                save_audio(audio, samples, sr, subtype if sf.check_format("WAV", subtype) else "FLOAT")
            dur = round(cut.duration * sr) / sr
    else:  # URLs, commands, in-memory sources, transforms, mixes: Lhotse's own loading, stored as float WAV
        sr = int(cut.sampling_rate)
        key = hashlib.sha256(json.dumps(cut.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
        audio = _clip_path(key, ".wav")
        if not audio.is_file():
            try:
                samples = cut.load_audio()
            except Exception as e:  # noqa: BLE001 -- any backend failure is this cut's bad audio
                raise ManifestError(f"{where}: cannot read audio ({e})") from None
            save_audio(audio, samples.T, sr, "FLOAT")
        dur = round(cut.duration * sr) / sr
    custom = cut.custom or {}
    split = spec.options.get("split") or custom.get("split") or "train"
    return {**{k: custom[k] for k in EXTRA_FIELDS if custom.get(k) is not None},
            "id": cut.id, "audio": str(audio), "sample_rate": sr, "duration_s": dur, "text": text,
            "split": str(split), "speaker": next((s.speaker for s in sups if s.speaker), None)}


def _lhotse_rows(spec: SourceSpec) -> Rows:
    want = spec.options.get("split")
    for cut in _lhotse_cuts(spec):
        if want and (cut.custom or {}).get("split") not in (None, "", want):
            continue  # a cut of another split
        where = f"{spec.path}: cut {cut.id!r}"
        yield where, (lambda cut=cut, where=where: _lhotse_row(spec, cut, where))
