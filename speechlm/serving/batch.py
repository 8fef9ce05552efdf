"""Answering a prompt about many audio files with one pipeline (tools/infer.py): listing the inputs, one result
row per file, a file that cannot be answered reported in its row while the rest go on."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from speechlm.errors import ManifestError, SpeechLMError
from speechlm.inference import AUDIO_EXTENSIONS, SpeechLMPipeline

#: One input: (id, audio path or None, error or None): a malformed manifest row has no path and its error.
Input = tuple[str, Path | None, str | None]


def list_inputs(source: str | Path) -> list[Input]:
    """(id, audio path, error) per input: one file, a folder's audio files, or a manifest's rows."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            raise ManifestError(f"{source}: no {'/'.join(AUDIO_EXTENSIONS)} files in this folder")
        return [(str(p.relative_to(source).with_suffix("")), p, None) for p in files]
    if not source.is_file():
        raise ManifestError(f"{source}: no such file or folder")
    if source.suffix.lower() != ".jsonl":
        return [(source.stem, source, None)]
    out: list[Input] = []
    for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            audio = Path(row["audio"])
        except (ValueError, KeyError, TypeError) as e:
            out.append((f"{source.name}:{lineno}", None, f"{source}:{lineno}: not a manifest row with 'audio' ({e})"))
            continue
        path = audio if audio.is_absolute() else source.parent / audio
        out.append((str(row.get("id") or path.stem), path, None))
    return out


def unescape(text: str) -> str:
    """``\\n`` and ``\\t`` typed on a command line as a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def answer_files(pipe: SpeechLMPipeline, inputs: Sequence[Input], prompt: str, *,
                 on_error: Callable[[str, str], None] | None = None, progress: bool = True,
                 **generate: Any) -> tuple[list[dict], int]:
    """(one row per input, how many failed). A row holds id, audio, prompt and the result's fields
    (:meth:`InferenceResult.to_dict`), or ``error`` for an input that could not be answered (``on_error(id,
    message)`` is told too). ``generate``: the decoding options of :meth:`SpeechLMPipeline.generate`."""
    from tqdm import tqdm

    rows, failed = [], 0
    for uid, path, error in tqdm(inputs, desc="infer", unit="file", disable=not progress):
        row: dict[str, Any] = {"id": uid, "audio": str(path) if path else None, "prompt": prompt}
        if error is None:
            try:
                row.update(pipe.generate(path, prompt, **generate).to_dict())
            except SpeechLMError as e:
                error = str(e)
        if error is not None:
            failed += 1
            row["error"] = error
            if on_error is not None:
                on_error(uid, error)
        rows.append(row)
    return rows, failed
