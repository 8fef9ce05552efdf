"""Joining manifests and dealing their rows round-robin into N shards (tools/shard_manifest.py), for per-rank
streaming and parallel jobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from speechlm.data.manifest import Utterance, read_manifest, write_manifest
from speechlm.errors import ManifestError


def shard_paths(out_dir: Path, name: str, shards: int) -> list[Path]:
    """``<out_dir>/<name>-00000-of-00064.jsonl`` ..., or ``<out_dir>/<name>.jsonl`` for one shard."""
    if shards == 1:
        return [out_dir / f"{name}.jsonl"]
    return [out_dir / f"{name}-{k:05d}-of-{shards:05d}.jsonl" for k in range(shards)]


def shard_rows(rows: list[Utterance], shards: int) -> list[list[Utterance]]:
    """Row i goes to shard i % shards, so every shard gets a slice of every input corpus."""
    return [rows[k::shards] for k in range(shards)]


def shard_manifests(inputs: Sequence[str | Path], out_dir: str | Path, name: str, shards: int = 1,
                    lowercase: bool = False, limit: int = 0) -> list[Utterance]:
    """Join ``inputs`` in order (the first ``limit`` rows, 0 = all; transcripts lower-cased with ``lowercase``)
    and write them as ``shards`` shard manifests; returns the rows. An id in two inputs: ManifestError."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    # Whole corpus in memory: ~1 kB a row (LibriSpeech 960 h: 281k rows; MLS English: ~11M rows, ~10 GB).
    rows = [u for path in inputs for u in read_manifest(path)]
    if limit:
        rows = rows[:limit]
    if lowercase:
        rows = [replace(u, text=u.text.lower()) for u in rows]
    seen: set[str] = set()
    for u in rows:
        if u.id in seen:
            raise ManifestError(f"id {u.id!r} occurs in more than one input manifest")
        seen.add(u.id)
    for path, part in zip(shard_paths(Path(out_dir), name, shards), shard_rows(rows, shards), strict=True):
        write_manifest(path, part)
    return rows
