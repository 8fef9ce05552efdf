"""Encoder features of a manifest computed once and kept on disk (fp16 safetensors shards + index.json).

Layout of ``out_dir``::

    shard-00000.safetensors   one tensor per utterance, key = utterance id, (L, T, D) float16; the shard's
                              metadata repeats the encoder key and each utterance's frames and audio fingerprint
    index.json                written last: encoder key, utterance id -> shard/frames/audio fingerprint,
                              shard sizes, skipped rows

A cache without ``index.json`` is incomplete and never opened. Rebuilding reuses every shard made by
the same encoder settings for utterances whose audio is unchanged (so an interrupted build resumes),
drops the rest, and rewrites the index. An audio fingerprint is (resolved path, size, mtime_ns): any
rewrite or touch of the file makes its features stale.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from speechlm.atomic import atomic_path, atomic_write_text
from speechlm.data.audio import load_audio
from speechlm.data.manifest import Utterance, read_manifest
from speechlm.errors import AudioError, FeatureCacheError
from speechlm.models.encoder import SpeechEncoder

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "speechlm-feature-cache-1"
#: Key fields that only describe, not determine, the features (the same weights under another path).
_INFORMATIONAL = ("encoder",)


def audio_fingerprint(path: str | Path) -> dict:
    """What identifies one audio file's content cheaply: resolved path, size, mtime in ns."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise AudioError(f"{path}: audio file not found") from None
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def key_mismatch(stored: dict, wanted: dict) -> list[str]:
    """Fields (other than informational ones) on which two encoder cache keys differ."""
    fields = (set(stored) | set(wanted)) - set(_INFORMATIONAL)
    return sorted(f for f in fields if stored.get(f) != wanted.get(f))


class FeatureCache:
    """Read side of a feature cache: lazy per-utterance reads, staleness checks."""

    def __init__(self, root: Path, index: dict):
        self.root = root
        self.index = index
        self.encoder_key: dict = index["encoder_key"]
        self.frame_rate_hz: float = float(self.encoder_key["frame_rate_hz"])
        self.layers: tuple[int, ...] = tuple(self.encoder_key["layers"])
        self.hidden_size: int = int(self.encoder_key["hidden_size"])
        self.skipped: list[dict] = index.get("skipped", [])
        self._utts: dict[str, dict] = index["utterances"]
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, out_dir: str | Path, encoder_key: dict | None = None) -> FeatureCache:
        """Open a complete cache; with ``encoder_key``, refuse one built by another encoder or settings."""
        root = Path(out_dir)
        index_path = root / INDEX
        if not index_path.is_file():
            raise FeatureCacheError(f"{root}: no {INDEX}: the feature cache is missing or was not completely "
                                    "written (rebuild it with tools/cache_features.py)")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise FeatureCacheError(f"{index_path}: unreadable index ({e})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise FeatureCacheError(f"{index_path}: not a {FORMAT} index")
        if encoder_key is not None:
            diff = key_mismatch(index["encoder_key"], encoder_key)
            if diff:
                detail = ", ".join(f"{f}: cached {index['encoder_key'].get(f)!r} vs wanted {encoder_key.get(f)!r}"
                                   for f in diff)
                raise FeatureCacheError(f"{root}: features were built by another encoder or settings ({detail})")
        for name, size in index["shards"].items():
            shard = root / name
            if not shard.is_file() or shard.stat().st_size != size:
                raise FeatureCacheError(f"{shard}: shard missing or of the wrong size: the cache is incomplete")
        return cls(root, index)

    @property
    def ids(self) -> list[str]:
        return list(self._utts)

    def __len__(self) -> int:
        return len(self._utts)

    def __contains__(self, utt_id: object) -> bool:
        return utt_id in self._utts

    def frames(self, utt_id: str) -> int:
        """Valid encoder frames of one utterance (at ``frame_rate_hz``)."""
        return int(self._entry(utt_id)["frames"])

    def _entry(self, utt_id: str) -> dict:
        try:
            return self._utts[utt_id]
        except KeyError:
            raise FeatureCacheError(f"{self.root}: utterance {utt_id!r} is not in the feature cache") from None

    def __getitem__(self, utt_id: str) -> torch.Tensor:
        """(L, T, D) float32 features of one utterance, read lazily from its shard."""
        entry = self._entry(utt_id)
        if os.getpid() != self._pid:  # never share open handles across a fork (DataLoader workers)
            self._handles, self._pid = {}, os.getpid()
        try:
            handle = self._handles.get(entry["shard"])
            if handle is None:
                handle = safe_open(str(self.root / entry["shard"]), framework="pt")
                self._handles[entry["shard"]] = handle
            return handle.get_tensor(utt_id).float()  # type: ignore[attr-defined]
        except (OSError, SafetensorError) as e:  # the shard was deleted or damaged after the cache was opened
            self._handles.pop(entry["shard"], None)
            raise FeatureCacheError(f"{self.root / entry['shard']}: feature-cache shard unreadable (utterance "
                                    f"{utt_id!r}: {e})") from None

    def check_fresh(self, utts: Iterable[Utterance]) -> None:
        """Raise :class:`FeatureCacheError` if an utterance is missing or its audio changed since caching."""
        problems = []
        for utt in utts:
            entry = self._utts.get(utt.id)
            if entry is None:
                problems.append(f"{utt.id!r} is not in the cache")
                continue
            try:
                now = audio_fingerprint(utt.audio_path)
            except AudioError as e:
                problems.append(f"{utt.id!r}: {e}")
                continue
            if now != entry["audio"]:
                problems.append(f"{utt.id!r}: audio {utt.audio_path} changed since it was cached "
                                f"(cached {entry['audio']}, now {now})")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise FeatureCacheError(f"{self.root}: stale feature cache: " + "; ".join(problems[:5]) + more)


def _reusable_shards(root: Path, key: dict) -> dict[str, dict]:
    """Existing shards built with ``key``: shard name -> {utt id: {frames, audio}}; other shards are deleted."""
    found: dict[str, dict] = {}
    for shard in sorted(root.glob("shard-*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as f:
                meta = f.metadata() or {}
            ok = meta.get("format") == FORMAT and not key_mismatch(json.loads(meta["encoder_key"]), key)
            entries = json.loads(meta["utterances"]) if ok else None
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # torn or foreign: untrusted
            ok, entries = False, None
        if ok:
            found[shard.name] = entries  # type: ignore[assignment]
        else:
            log.info("removing shard %s (other encoder settings or unreadable)", shard)
            shard.unlink()
    return found


def build_feature_cache(manifest_path: str | Path, encoder: SpeechEncoder, out_dir: str | Path,
                        batch_size: int = 8, skip_bad: bool = False, shard_mb: float = 256.0) -> FeatureCache:
    """Encode every utterance of a manifest once and store the features; returns the opened cache.

    Idempotent and resumable: utterances already cached by the same encoder settings with unchanged
    audio are kept. Unreadable audio raises :class:`AudioError` naming the file, or with ``skip_bad``
    is logged, left out and listed under ``skipped`` in the index (bad manifest rows likewise).
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    bad_rows: list[str] = []
    utts = read_manifest(manifest_path, skip_bad=skip_bad, bad_rows=bad_rows)
    key = encoder.cache_key()
    (root / INDEX).unlink(missing_ok=True)  # from here until the end the cache is incomplete
    for tmp in root.glob(".shard-*.tmp"):  # temporaries of a killed build
        shutil.rmtree(tmp, ignore_errors=True)

    entries: dict[str, dict] = {}  # utt id -> {shard, frames, audio}
    reusable = _reusable_shards(root, key)
    current = {}
    for utt in utts:
        try:
            current[utt.id] = audio_fingerprint(utt.audio_path)
        except AudioError:
            pass  # reported when its audio is loaded below
    for shard, shard_utts in reusable.items():
        for utt_id, meta in shard_utts.items():
            if utt_id in current and meta["audio"] == current[utt_id] and utt_id not in entries:
                entries[utt_id] = {"shard": shard, "frames": meta["frames"], "audio": meta["audio"]}
    todo = sorted((u for u in utts if u.id not in entries), key=lambda u: -u.duration_s)
    if entries:
        log.info("%s: reusing %d cached utterances, encoding %d", root, len(entries), len(todo))

    skipped = [{"row": r} for r in bad_rows]
    shard_bytes = int(shard_mb * 2**20)
    next_shard = 1 + max((int(n.split("-")[1].split(".")[0]) for n in reusable), default=-1)
    pending: dict[str, torch.Tensor] = {}
    pending_meta: dict[str, dict] = {}

    def flush() -> None:
        nonlocal next_shard, pending, pending_meta
        if not pending:
            return
        name = f"shard-{next_shard:05d}.safetensors"
        metadata = {"format": FORMAT, "encoder_key": json.dumps(key), "utterances": json.dumps(pending_meta)}
        with atomic_path(root / name) as tmp:
            save_file(pending, str(tmp), metadata=metadata)
        for utt_id, meta in pending_meta.items():
            entries[utt_id] = {"shard": name, **meta}
        next_shard += 1
        pending, pending_meta = {}, {}

    with tqdm(total=len(todo), unit="utt", desc=f"caching features in {root.name}") as bar:
        for start in range(0, len(todo), batch_size):
            batch_utts, waves, fingerprints = [], [], []
            for utt in todo[start: start + batch_size]:
                try:
                    fp = audio_fingerprint(utt.audio_path)  # taken before reading: a later change reads stale
                    wave = load_audio(utt.audio_path, target_sr=encoder.sample_rate, expected_sr=utt.sample_rate)
                    if encoder.frame_lengths(torch.tensor([wave.numel()]))[0] == 0:
                        raise AudioError(f"{utt.audio_path}: {wave.numel() / encoder.sample_rate:.3f} s of audio "
                                         "is shorter than one encoder frame")
                except AudioError as e:
                    if not skip_bad:
                        raise AudioError(f"{e} (manifest {manifest_path}, id {utt.id!r})") from None
                    log.warning("skipping %s: %s", utt.id, e)
                    skipped.append({"id": utt.id, "error": str(e)})
                    bar.update(1)
                    continue
                batch_utts.append(utt)
                waves.append(wave)
                fingerprints.append(fp)
            if waves:
                out = encoder(waves)
                for b, utt in enumerate(batch_utts):
                    n = int(out.lengths[b])
                    feats = out.features[b, :, :n].to("cpu", torch.float16).contiguous()  # (L, T, D)
                    if not torch.isfinite(feats).all():
                        raise FeatureCacheError(f"{utt.audio_path}: features overflow float16 (id {utt.id!r})")
                    pending[utt.id] = feats
                    pending_meta[utt.id] = {"frames": n, "audio": fingerprints[b]}
                bar.update(len(batch_utts))
            if sum(t.numel() * 2 for t in pending.values()) >= shard_bytes:
                flush()
        flush()

    wanted = {u.id for u in utts}
    used = sorted({e["shard"] for k, e in entries.items() if k in wanted})
    index = {
        "format": FORMAT,
        "encoder_key": key,
        "manifest": str(Path(manifest_path).resolve()),
        "dtype": "float16",
        "shards": {name: (root / name).stat().st_size for name in used},
        "utterances": {u.id: entries[u.id] for u in utts if u.id in entries},
        "skipped": skipped,
    }
    atomic_write_text(root / INDEX, json.dumps(index, indent=1))
    for shard in root.glob("shard-*.safetensors"):
        if shard.name not in index["shards"]:
            shard.unlink()  # no utterance of this manifest lives there any more
    if skipped:
        log.warning("%s: %d utterance(s) skipped: %s", root, len(skipped),
                    "; ".join(s.get("error", s.get("row", "")) for s in skipped[:5]))
    return FeatureCache.open(root, key)


def select_layers(src_dir: str | Path, out_dir: str | Path, layers: Iterable[int]) -> FeatureCache:
    """A cache of only ``layers`` of a complete cache, without running the encoder (e.g. one layer of an
    all-layers cache, to compare layer choices on the same frames); returns it opened.

    ``layers`` are hidden-state indices as the source's index stores them (``FeatureCache.layers``: resolved,
    0 = embeddings output, no negative ones), in the order wanted; each must be cached in ``src_dir``. The
    result is what ``build_feature_cache`` gives with those layers: same shards and utterances, the encoder key's
    ``layers`` replaced. An existing complete ``out_dir`` with that key and the same utterances is kept as it is.
    """
    src = FeatureCache.open(src_dir)
    layers = [int(k) for k in layers]
    missing = [k for k in layers if k not in src.layers]
    if not layers or missing:
        raise FeatureCacheError(f"{src.root}: layers {missing or layers} are not in the feature cache (it holds "
                                f"{list(src.layers)})")
    pick = torch.tensor([src.layers.index(k) for k in layers])
    key = {**src.encoder_key, "layers": layers}
    root = Path(out_dir)
    if (root / INDEX).is_file():
        try:
            done = FeatureCache.open(root, key)
            if done.index["utterances"] == src.index["utterances"]:
                return done
        except FeatureCacheError:
            pass
    root.mkdir(parents=True, exist_ok=True)
    (root / INDEX).unlink(missing_ok=True)
    for old in root.glob("shard-*.safetensors"):
        old.unlink()
    sizes = {}
    for name in tqdm(sorted(src.index["shards"]), unit="shard", desc=f"layers {layers} -> {root.name}"):
        with safe_open(str(src.root / name), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).index_select(0, pick).contiguous() for k in f.keys()}  # noqa: SIM118 (safe_open: no iteration)
        metadata = {**meta, "format": FORMAT, "encoder_key": json.dumps(key)}
        with atomic_path(root / name) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        sizes[name] = (root / name).stat().st_size
    index = {**src.index, "encoder_key": key, "shards": sizes}
    atomic_write_text(root / INDEX, json.dumps(index, indent=1))
    return FeatureCache.open(root, key)
