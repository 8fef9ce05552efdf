"""Whisper's transcripts kept by the audio they transcribe.

The Whisper cascade reads no connector: evaluating another run, another connector or the same run again on the
same spoken items gives the same transcripts. Whisper on the CPU is most of an evaluation's time (every clip is
padded to 30 s for its encoder), so :class:`TranscriptCache` keeps each transcript under a key of the clip's
samples, and the cache file under a key of the model's files and the decoding settings: other weights, another
Whisper or other settings never read these transcripts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from speechlm.atomic import atomic_write_text

log = logging.getLogger(__name__)

#: Files of a Hugging Face model folder whose bytes decide what it transcribes.
MODEL_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "model.safetensors",
               "pytorch_model.bin")


def model_key(folder: str | Path, settings: str) -> str:
    """A key of ``folder``'s model files (their bytes) and ``settings`` (how it decodes)."""
    h = hashlib.sha256(settings.encode())
    folder = Path(folder)
    for name in MODEL_FILES:
        path = folder / name
        if path.is_file():
            h.update(name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:24]


def audio_key(wave: torch.Tensor) -> str:
    """A key of a clip's samples (float32, as Whisper's feature extractor reads them)."""
    data = wave.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()[:32] + f":{data.size}"


class TranscriptCache:
    """Transcripts of one model with one set of decoding settings: ``<root>/<model key>.json``.

    Written atomically after each :meth:`put` (merged with what another process wrote meanwhile), so a crash
    leaves the file as it was and two evaluations at once lose nothing but their own last batch's entries.
    """

    def __init__(self, root: str | Path, key: str):
        self.path = Path(root).expanduser() / f"{key}.json"
        self._texts: dict[str, str] = self._read()
        self.hits = 0

    def _read(self) -> dict[str, str]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # a cache is never a reason to stop: it is rebuilt
            log.warning("%s: unreadable transcript cache (%s); starting it again", self.path, e)
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def __len__(self) -> int:
        return len(self._texts)

    def get(self, waves: Sequence[torch.Tensor]) -> list[str | None]:
        """The kept transcript of each clip, or None."""
        out = [self._texts.get(audio_key(w)) for w in waves]
        self.hits += sum(t is not None for t in out)
        return out

    def put(self, waves: Sequence[torch.Tensor], texts: Sequence[str]) -> None:
        """Keep ``texts`` (one per clip of ``waves``) and write the file."""
        if len(waves) != len(texts):
            raise ValueError(f"{len(waves)} clips but {len(texts)} transcripts")
        if not waves:
            return
        self._texts = {**self._read(), **self._texts, **{audio_key(w): t for w, t in zip(waves, texts)}}
        atomic_write_text(self.path, json.dumps(self._texts, sort_keys=True))


def transcribe_cached(transcribe, waves: Sequence[torch.Tensor], cache: TranscriptCache | None,
                      chunk: int = 64) -> list[str]:
    """``transcribe(clips) -> texts`` on the clips ``cache`` does not hold (each distinct clip once, ``chunk``
    clips at a time, each chunk kept as soon as it is heard: an interrupted evaluation resumes from there); the
    rest from the cache."""
    if cache is None:
        return list(transcribe(list(waves)))
    kept = cache.get(waves)
    todo: dict[str, torch.Tensor] = {}
    for w, t in zip(waves, kept):
        if t is None:
            todo.setdefault(audio_key(w), w)
    keys, clips = list(todo), list(todo.values())
    heard: dict[str, str] = {}
    for i in range(0, len(clips), chunk):
        texts = list(transcribe(clips[i:i + chunk]))
        cache.put(clips[i:i + chunk], texts)
        heard.update(zip(keys[i:i + chunk], texts))
    if waves:
        log.info("transcripts: %d of %d clips from %s", len(waves) - sum(t is None for t in kept), len(waves),
                 cache.path)
    return [t if t is not None else heard[audio_key(w)] for w, t in zip(waves, kept)]
