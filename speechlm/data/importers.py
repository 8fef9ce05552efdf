"""Turn common corpus layouts into our manifest: LibriSpeech, Multilingual LibriSpeech, a folder of audio+txt.

Each importer takes ``skip_bad`` (skip and list bad rows in ``bad_rows`` instead of stopping) and
``check_speech`` (also reject clips with no or too little detected speech for their transcript:
:mod:`speechlm.data.speech_check`, on ``workers`` threads)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from speechlm.data.audio import audio_info
from speechlm.data.manifest import Utterance
from speechlm.errors import AudioError, ManifestError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3", ".opus")


def _row(utt_id: str, audio: Path, text: str, split: str, speaker: str | None, where: str) -> Utterance:
    text = " ".join(text.split())
    if not text:
        raise ManifestError(f"{where}: empty transcript for {utt_id!r}")
    sr, dur = audio_info(audio)
    return Utterance(id=utt_id, audio=str(audio.resolve()), sample_rate=sr, duration_s=dur, text=text,
                     split=split, speaker=speaker)


def _collect(rows: Iterator[Utterance], skip_bad: bool, bad_rows: list[str] | None, check_speech: bool = False,
             workers: int = 1) -> list[Utterance]:
    """The rows; with ``check_speech`` only those whose audio holds enough speech for their transcript
    (:func:`speechlm.data.speech_check.gate_rows`: the others stop the import, or are skipped with ``skip_bad``)."""
    out = []
    while True:
        try:
            out.append(next(rows))
        except StopIteration:
            if check_speech:
                from speechlm.data.speech_check import gate_rows

                return gate_rows(out, skip_bad, bad_rows, workers=workers, progress=True)
            return out
        except (AudioError, ManifestError) as e:
            if not skip_bad:
                raise
            log.warning("skipping: %s", e)
            if bad_rows is not None:
                bad_rows.append(str(e))


def _iter_librispeech(root: Path, split: str) -> Iterator[Utterance]:
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise ManifestError(f"{root}: no *.trans.txt found (expected LibriSpeech speaker/chapter/ layout)")
    for trans in tqdm(trans_files, desc=f"librispeech {root.name}", unit="chapter"):
        speaker = trans.parent.parent.name
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            where = f"{trans}:{lineno}"
            audio = next((trans.parent / f"{utt_id}{s}" for s in AUDIO_SUFFIXES
                          if (trans.parent / f"{utt_id}{s}").is_file()), None)
            if audio is None:
                raise AudioError(f"{where}: no audio file for {utt_id!r} in {trans.parent}")
            yield _row(utt_id, audio, text, split, speaker, where)


def import_librispeech(root: str | Path, split: str, skip_bad: bool = False,
                       bad_rows: list[str] | None = None, check_speech: bool = False,
                       workers: int = 1) -> list[Utterance]:
    """LibriSpeech layout: ``root/speaker/chapter/{utt}.flac`` + ``speaker-chapter.trans.txt``."""
    return _collect(_iter_librispeech(Path(root), split), skip_bad, bad_rows, check_speech, workers)


def _iter_mls(root: Path, split: str) -> Iterator[Utterance]:
    trans = root / "transcripts.txt"
    if not trans.is_file():
        raise ManifestError(f"{trans}: not found (expected MLS layout: transcripts.txt + audio/speaker/book/)")
    lines = trans.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(tqdm(lines, desc=f"mls {root.name}", unit="utt"), 1):
        if not line.strip():
            continue
        where = f"{trans}:{lineno}"
        utt_id, sep, text = line.partition("\t")
        if not sep:
            raise ManifestError(f"{where}: expected '<id>\\t<transcript>'")
        parts = utt_id.split("_")
        if len(parts) != 3:
            raise ManifestError(f"{where}: id {utt_id!r} is not speaker_book_segment")
        folder = root / "audio" / parts[0] / parts[1]
        audio = next((folder / f"{utt_id}{s}" for s in AUDIO_SUFFIXES if (folder / f"{utt_id}{s}").is_file()), None)
        if audio is None:
            raise AudioError(f"{where}: no audio file for {utt_id!r} in {folder}")
        yield _row(utt_id, audio, text, split, parts[0], where)


def import_mls(root: str | Path, split: str, skip_bad: bool = False,
               bad_rows: list[str] | None = None, check_speech: bool = False,
               workers: int = 1) -> list[Utterance]:
    """Multilingual LibriSpeech layout: ``root/transcripts.txt`` (id TAB text) + ``root/audio/spk/book/id.flac``."""
    return _collect(_iter_mls(Path(root), split), skip_bad, bad_rows, check_speech, workers)


def _iter_folder(root: Path, split: str) -> Iterator[Utterance]:
    audios = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not audios:
        raise ManifestError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)}) found")
    for audio in tqdm(audios, desc=f"folder {root.name}", unit="file"):
        txt = audio.with_suffix(".txt")
        if not txt.is_file():
            raise ManifestError(f"{audio}: no sibling transcript {txt.name}")
        rel = audio.relative_to(root).with_suffix("")
        yield _row("-".join(rel.parts), audio, txt.read_text(encoding="utf-8"), split,
                   audio.parent.name if audio.parent != root else None, str(txt))


def import_folder(root: str | Path, split: str, skip_bad: bool = False,
                  bad_rows: list[str] | None = None, check_speech: bool = False,
                  workers: int = 1) -> list[Utterance]:
    """A folder (searched recursively) of audio files, each with a sibling ``.txt`` transcript."""
    return _collect(_iter_folder(Path(root), split), skip_bad, bad_rows, check_speech, workers)


def _iter_source(kind: str, root: str | Path, split: str, skip_bad: bool, bad_rows: list[str] | None
                 ) -> Iterator[Utterance]:
    """The rows of a datasets / Lhotse source (speechlm.data.sources) of split ``split`` (a DatasetDict's part of
    that name, unless the spec's ``#split=`` names another), every one labelled ``split``."""
    from speechlm.data.manifest import iter_manifest
    from speechlm.data.sources import parse_spec

    spec = str(root) if str(root).startswith(f"{kind}:") else f"{kind}:{root}"
    parsed = parse_spec(spec)
    want = parsed.options.get("split", split) if parsed is not None else split
    if parsed is not None and "split" not in parsed.options:
        spec += f"#split={split}"
    for utt in iter_manifest(spec, skip_bad=skip_bad, bad_rows=bad_rows):
        if utt.split == want:
            utt.split = split
            yield utt


def import_hf(root: str | Path, split: str, skip_bad: bool = False, bad_rows: list[str] | None = None,
              check_speech: bool = False, workers: int = 1) -> list[Utterance]:
    """A Hugging Face datasets folder or parquet file(s) (``#key=value`` options: speechlm.data.sources)."""
    return _collect(_iter_source("hf", root, split, skip_bad, bad_rows), skip_bad, bad_rows, check_speech, workers)


def import_lhotse(root: str | Path, split: str, skip_bad: bool = False, bad_rows: list[str] | None = None,
                  check_speech: bool = False, workers: int = 1) -> list[Utterance]:
    """A Lhotse CutSet or recordings/supervisions pair (``.jsonl.gz``; options: speechlm.data.sources)."""
    return _collect(_iter_source("lhotse", root, split, skip_bad, bad_rows), skip_bad, bad_rows, check_speech,
                    workers)


IMPORTERS = {"librispeech": import_librispeech, "mls": import_mls, "folder": import_folder, "hf": import_hf,
             "lhotse": import_lhotse}

