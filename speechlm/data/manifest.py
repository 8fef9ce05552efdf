"""The one manifest format: JSON Lines, one utterance per line, read with validation, written atomically.

A row::

    {"id": "lee-0001-en-us", "audio": "audio/lee-0001-en-us.wav", "sample_rate": 16000,
     "duration_s": 2.61, "text": "The cat sat.", "split": "train", "speaker": "en-us+m3",
     "words": [["The", 0.08, 0.21], ["cat", 0.21, 0.55], ["sat.", 0.55, 1.02]],
     "token_boundaries": [4, 11, 20, 21], "boundary_frame_rate_hz": 50.0}

``audio`` may be relative: it is resolved against the manifest's folder. Wherever a manifest is read, a
Hugging Face ``datasets`` folder / parquet file or a Lhotse CutSet may stand in its place
(:mod:`speechlm.data.sources`: the same rows, the same checks). ``words`` (reference word
timings in seconds), ``augment`` (how a synthetic clip was augmented), ``token_boundaries``
(inclusive end frame of each LLM token of ``text``, at ``boundary_frame_rate_hz``) and ``translation``
(the utterance in another language, for the supervised mid-training stage's translation task, with
``translation_lang``, e.g. ``"French"``; without it the stage's ``supervised.language`` names it) are optional.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from speechlm.atomic import atomic_path
from speechlm.errors import ManifestError

log = logging.getLogger(__name__)

REQUIRED = ("id", "audio", "sample_rate", "duration_s", "text", "split")


@dataclass
class WordTiming:
    word: str
    start_s: float
    end_s: float


@dataclass
class Utterance:
    id: str
    audio: str
    sample_rate: int
    duration_s: float
    text: str
    split: str
    speaker: str | None = None
    words: list[WordTiming] | None = None
    token_boundaries: list[int] | None = None
    boundary_frame_rate_hz: float | None = None
    #: Augmentation applied after synthesis (speechlm.data.augment.Augmentation.to_str()); None = clean.
    augment: str | None = None
    #: The utterance in another language (supervised mid-training's translation task) and that language's name.
    translation: str | None = None
    translation_lang: str | None = None
    #: Folder the manifest was read from; relative ``audio`` paths resolve against it.
    root: Path | None = field(default=None, repr=False, compare=False)

    @property
    def audio_path(self) -> Path:
        p = Path(self.audio)
        return p if p.is_absolute() or self.root is None else self.root / p

    def to_json(self) -> dict:
        row = {k: getattr(self, k) for k in REQUIRED}
        if self.speaker is not None:
            row["speaker"] = self.speaker
        if self.words is not None:
            row["words"] = [[w.word, round(w.start_s, 4), round(w.end_s, 4)] for w in self.words]
        if self.token_boundaries is not None:
            row["token_boundaries"] = list(self.token_boundaries)
            row["boundary_frame_rate_hz"] = self.boundary_frame_rate_hz
        if self.augment is not None:
            row["augment"] = self.augment
        if self.translation is not None:
            row["translation"] = self.translation
            if self.translation_lang is not None:
                row["translation_lang"] = self.translation_lang
        return row


def _parse_row(row: object, where: str, root: Path | None) -> Utterance:
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row or row[k] is None]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    if not isinstance(row["id"], str) or not row["id"]:
        raise ManifestError(f"{where}: 'id' must be a non-empty string")
    if not isinstance(row["audio"], str) or not row["audio"]:
        raise ManifestError(f"{where}: 'audio' must be a non-empty path string")
    if not isinstance(row["text"], str) or not row["text"].strip():
        raise ManifestError(f"{where}: empty transcript for id {row['id']!r}")
    try:
        sample_rate = int(row["sample_rate"])
        duration_s = float(row["duration_s"])
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{where}: sample_rate/duration_s not numeric ({e})") from None
    if sample_rate <= 0 or not math.isfinite(duration_s) or duration_s <= 0:
        raise ManifestError(f"{where}: sample_rate and duration_s must be positive (id {row['id']!r})")
    words = None
    if row.get("words") is not None:
        words = []
        prev_end = 0.0
        for i, w in enumerate(row["words"]):
            if not (isinstance(w, (list, tuple)) and len(w) == 3):
                raise ManifestError(f"{where}: words[{i}] must be [word, start_s, end_s]")
            word, start, end = str(w[0]), float(w[1]), float(w[2])
            if not (0 <= start <= end <= duration_s + 1e-3) or start < prev_end - 1e-3:
                raise ManifestError(
                    f"{where}: words[{i}] {word!r} [{start}, {end}] is not ordered inside the audio "
                    f"(duration {duration_s} s)"
                )
            prev_end = end
            words.append(WordTiming(word, start, end))
    boundaries = None
    rate = row.get("boundary_frame_rate_hz")
    if row.get("token_boundaries") is not None:
        boundaries = [int(b) for b in row["token_boundaries"]]
        if rate is None or float(rate) <= 0:
            raise ManifestError(f"{where}: token_boundaries given without a positive boundary_frame_rate_hz")
        if any(b < 0 for b in boundaries) or any(b2 < b1 for b1, b2 in itertools.pairwise(boundaries)):
            raise ManifestError(f"{where}: token_boundaries must be non-negative and non-decreasing")
        rate = float(rate)
    for key in ("translation", "translation_lang"):
        if row.get(key) is not None and (not isinstance(row[key], str) or not row[key].strip()):
            raise ManifestError(f"{where}: {key!r} must be a non-empty string (id {row['id']!r})")
    if row.get("translation_lang") is not None and row.get("translation") is None:
        raise ManifestError(f"{where}: 'translation_lang' given without a 'translation' (id {row['id']!r})")
    return Utterance(
        id=row["id"], audio=row["audio"], sample_rate=sample_rate, duration_s=duration_s,
        text=row["text"], split=str(row["split"]), speaker=row.get("speaker"), words=words,
        token_boundaries=boundaries, boundary_frame_rate_hz=rate if boundaries is not None else None,
        augment=str(row["augment"]) if row.get("augment") is not None else None,
        translation=row.get("translation"), translation_lang=row.get("translation_lang"), root=root,
    )


def jsonl_lines(path: Path) -> Iterator[tuple[str, str]]:
    """``(where, line)`` of every non-blank line of a JSONL file, ``where`` being ``file:line`` (for errors)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", line


def json_row(line: str, where: str):
    """One JSONL line parsed; :class:`ManifestError` naming ``where`` when it is not valid JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not valid JSON ({e.msg})") from None


def _rows(path: str | Path) -> Iterator[tuple[str, Callable[[], object], Path | None]]:
    """(where, make the row dict, folder relative audio paths resolve against) of every row of a manifest
    spec: a JSONL file, or a datasets / Lhotse source (speechlm.data.sources)."""
    from speechlm.data.sources import parse_spec, source_rows

    spec = parse_spec(path)
    if spec is not None:  # its rows name absolute audio paths; root names the source in messages
        root = spec.path if spec.path.is_dir() else spec.path.parent
        for where, make in source_rows(spec):
            yield where, make, root
        return
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    for where, line in jsonl_lines(path):
        yield where, (lambda line=line, where=where: json_row(line, where)), path.parent


def iter_manifest(path: str | Path, skip_bad: bool = False, bad_rows: list[str] | None = None
                  ) -> Iterator[Utterance]:
    """Stream the rows of a manifest without loading it whole.

    ``path`` is a JSONL manifest or a source spec (a Hugging Face datasets folder or parquet file(s), a Lhotse
    CutSet or recordings/supervisions pair, ``hf:``/``lhotse:`` prefixes and ``#key=value`` options: see
    :mod:`speechlm.data.sources`); every row is validated the same way. A bad row raises
    :class:`ManifestError` naming ``file:line`` (a source: the file and row index, or the cut id); with
    ``skip_bad`` it is logged, appended to ``bad_rows`` (when given) and skipped instead.
    """
    seen: set[str] = set()
    for where, make, root in _rows(path):
        try:
            utt = _parse_row(make(), where, root)
            if utt.id in seen:
                raise ManifestError(f"{where}: duplicate id {utt.id!r}")
            seen.add(utt.id)
        except ManifestError as e:
            if not skip_bad:
                raise
            log.warning("skipping bad row: %s", e)
            if bad_rows is not None:
                bad_rows.append(str(e))
            continue
        yield utt


def read_manifest(path: str | Path, skip_bad: bool = False, bad_rows: list[str] | None = None
                  ) -> list[Utterance]:
    """Read a whole manifest (see :func:`iter_manifest` for validation and ``skip_bad``)."""
    return list(iter_manifest(path, skip_bad=skip_bad, bad_rows=bad_rows))


def write_manifest(path: str | Path, rows: Iterable[Utterance]) -> int:
    """Write ``rows`` to ``path`` atomically; returns the number written.

    Relative audio paths of rows read from a manifest in another folder are rewritten relative to
    ``path``'s folder, so they still name the same files.
    """
    path = Path(path)
    out_dir = path.parent.resolve()
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for utt in rows:
            row = utt.to_json()
            if utt.root is not None and not Path(utt.audio).is_absolute():
                # A row read from another manifest keeps pointing at the same file from its new home.
                row["audio"] = os.path.relpath(utt.audio_path.resolve(), out_dir)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
