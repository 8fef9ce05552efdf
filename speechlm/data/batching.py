"""From manifest rows to the typed ``Batch`` the trainer receives: features, token ids, boundaries, masks.

Two sources of utterances, one batch type:

* :class:`SpeechTextDataset` + :class:`DistributedBucketSampler` for corpora whose manifest fits in
  memory: every epoch (seed + epoch) shuffles, sorts into length buckets, packs batches under a
  frame/token budget, and deals them out so that every rank gets the same number of batches.
* :class:`ShardedManifestStream` for corpora larger than memory: a list/glob of manifest shards, each
  rank streams only its own shards through a shuffle buffer and packs batches in bucket windows.

Both yield :class:`Batch` objects tagged with their position (epoch, index on this rank), which is
all that exact resume needs. Features come from a :class:`FeatureCache` or, when no cache is given,
as waveforms that :func:`encode_batch` turns into features on the training device.
"""

from __future__ import annotations

import glob
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from speechlm.data.audio import load_audio
from speechlm.data.boundaries import convert_boundaries  # the one boundary rate conversion (re-exported here)
from speechlm.data.manifest import Utterance, iter_manifest
from speechlm.errors import AudioError, ConfigError, FeatureCacheError, ManifestError

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- batch
@dataclass
class Batch:
    """One step's input on one rank. Token positions are right-padded; ``token_mask`` marks real ones."""

    utt_ids: list[str]
    token_ids: torch.Tensor  # (B, N) long, LLM tokens of the transcript (no BOS/EOS), 0 at padding
    token_mask: torch.Tensor  # (B, N) bool
    boundaries: torch.Tensor | None  # (B, N) long, inclusive END frame of each token at the ENCODER frame rate
    features: torch.Tensor | None  # (B, L, T, D) float32, zero-padded in T; None until encoded (on the fly)
    frame_lengths: torch.Tensor | None  # (B,) long valid frames; None until encoded
    waves: list[torch.Tensor] | None = None  # on-the-fly path: 1-D waveforms at the encoder's sample rate
    text_ids: torch.Tensor | None = None  # (B2, M) long, text-only LM batch (multitask), 0 at padding
    text_mask: torch.Tensor | None = None  # (B2, M) bool
    # Supervised mid-training: each row's task prompt and answer (speechlm.data.tasks.TaskExample), else None
    tasks: list[Any] | None = None
    epoch: int = 0  # position of this batch in its rank's data order (for exact resume)
    index: int = 0
    counted: bool = True  # False for the filler batches that equalise validation across ranks
    # Rows left out because their audio or features could not be read (ExampleReader.skip_bad): (id, why)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.token_mask.sum())

    @property
    def empty(self) -> bool:
        """No row left (every row of it was skipped)."""
        return not self.utt_ids

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Tensors moved to ``device``; ``dtype`` (e.g. bf16) applies to the features only."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, dtype) if (f.name == "features" and dtype is not None) else v.to(device)
            elif f.name == "waves" and v is not None:
                v = [w.to(device) for w in v]
            out[f.name] = v
        return Batch(**out)


@dataclass
class Example:
    """One utterance, ready to collate."""

    utt_id: str
    token_ids: list[int]
    boundaries: list[int] | None  # at the encoder frame rate
    features: torch.Tensor | None = None  # (L, T, D)
    wave: torch.Tensor | None = None  # (samples,)
    task: Any = None  # speechlm.data.tasks.TaskExample (supervised mid-training)


def collate(examples: Sequence[Example], epoch: int = 0, index: int = 0) -> Batch:
    """Pad examples into a :class:`Batch`; boundaries are clamped to each clip's last frame."""
    b = len(examples)
    n = max(1, max(len(e.token_ids) for e in examples))
    token_ids = torch.zeros(b, n, dtype=torch.long)
    token_mask = torch.zeros(b, n, dtype=torch.bool)
    has_bnd = all(e.boundaries is not None for e in examples)
    boundaries = torch.zeros(b, n, dtype=torch.long) if has_bnd else None
    for i, e in enumerate(examples):
        k = len(e.token_ids)
        token_ids[i, :k] = torch.tensor(e.token_ids, dtype=torch.long)
        token_mask[i, :k] = True
        if boundaries is not None and k:
            boundaries[i, :k] = torch.tensor(e.boundaries, dtype=torch.long)
            boundaries[i, k:] = boundaries[i, k - 1]  # padding reads a real frame; masked out anyway
    features = frame_lengths = waves = None
    if all(e.features is not None for e in examples):
        frame_lengths = torch.tensor([e.features.shape[1] for e in examples], dtype=torch.long)
        first = examples[0].features
        features = first.new_zeros(b, first.shape[0], int(frame_lengths.max()), first.shape[2])
        for i, e in enumerate(examples):
            features[i, :, : e.features.shape[1]] = e.features
        if boundaries is not None:
            boundaries = torch.minimum(boundaries, (frame_lengths - 1).clamp(min=0)[:, None])
    else:
        waves = [e.wave for e in examples]
        if any(w is None for w in waves):
            raise ValueError("an example has neither features nor a waveform")
    tasks = [e.task for e in examples] if any(e.task is not None for e in examples) else None
    if tasks is not None and any(t is None for t in tasks):
        raise ValueError("either every example of a batch has a task prompt or none has")
    return Batch([e.utt_id for e in examples], token_ids, token_mask, boundaries, features, frame_lengths,
                 waves=waves, tasks=tasks, epoch=epoch, index=index)


def empty_batch(epoch: int = 0, index: int = 0) -> Batch:
    """A batch with no rows: what is left when every row of one failed to load (``skip_bad``)."""
    return Batch([], torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bool), None, None, None,
                 epoch=epoch, index=index)


def encode_batch(batch: Batch, encoder: Any) -> Batch:
    """The on-the-fly path: run the frozen encoder on ``batch.waves``; fills features and frame lengths.

    Without gradients, except for an adapted SpeechEncoder (``encoder.adapted``) inside a training forward pass:
    its adaptation's parameters need them."""
    if batch.features is not None:
        return batch
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool(getattr(encoder, "adapted", False))):
        out = encoder(batch.waves)
    features, lengths = out.features, out.lengths.to(batch.token_ids.device)
    boundaries = batch.boundaries
    if boundaries is not None:
        boundaries = torch.minimum(boundaries, (lengths - 1).clamp(min=0)[:, None])
    return replace(batch, features=features.to(batch.token_ids.device), frame_lengths=lengths,
                   boundaries=boundaries, waves=None)


# ---------------------------------------------------------------------------------------- examples
class ExampleReader:
    """Turns one manifest row into an :class:`Example`: tokenises, converts boundaries, reads features.

    With ``feature_cache`` (a folder) the features are read from it (opened lazily, once per process,
    so DataLoader workers each get their own file handles); without, the audio is loaded for
    :func:`encode_batch`. ``skip_bad`` (config ``data.skip_bad``): :meth:`read_batch` leaves out a row
    whose audio or features cannot be read (e.g. deleted after the run started) and lists it in
    ``Batch.skipped``; otherwise the error names the file and the row.
    """

    #: What a row's file going missing or unreadable raises (what ``skip_bad`` skips).
    READ_ERRORS = (AudioError, FeatureCacheError, OSError)

    def __init__(self, tokenizer: Any, frame_rate_hz: float, feature_cache: str | Path | None = None,
                 encoder_key: dict | None = None, sample_rate: int = 16_000, need_boundaries: bool = True,
                 skip_bad: bool = False, tasks: Any = None):
        self.skip_bad = skip_bad
        self.tasks = tasks  # speechlm.data.tasks.SupervisedTasks: every example gets its task prompt and answer
        self.tokenizer = tokenizer
        self.frame_rate_hz = float(frame_rate_hz)
        self.feature_cache = Path(feature_cache) if feature_cache else None
        self.encoder_key = encoder_key
        self.sample_rate = int(sample_rate)
        self.need_boundaries = need_boundaries
        self._cache = None

    @property
    def cache(self):
        if self._cache is None and self.feature_cache is not None:
            from speechlm.data.feature_cache import FeatureCache

            self._cache = FeatureCache.open(self.feature_cache, self.encoder_key)
        return self._cache

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}  # reopen in each worker process

    def frames(self, utt: Utterance) -> int:
        """Encoder frames of ``utt``: exact from the cache, estimated from the duration otherwise."""
        if self.cache is not None and utt.id in self.cache:
            return self.cache.frames(utt.id)
        return max(1, math.ceil(utt.duration_s * self.frame_rate_hz))

    def tokens(self, utt: Utterance) -> list[int]:
        ids = list(self.tokenizer(utt.text, add_special_tokens=False)["input_ids"])
        if utt.token_boundaries is not None and len(ids) != len(utt.token_boundaries):
            raise ManifestError(f"{utt.root}: row {utt.id!r} has {len(utt.token_boundaries)} token boundaries but "
                                f"its text has {len(ids)} tokens in this LLM's tokenizer (aligned with another "
                                "tokenizer?)")
        return ids

    def read(self, utt: Utterance, epoch: int = 0) -> Example:
        ids = self.tokens(utt)
        task = self.tasks.example(utt, epoch) if self.tasks is not None else None
        bnd = None
        if utt.token_boundaries is not None:
            bnd = convert_boundaries(utt.token_boundaries, utt.boundary_frame_rate_hz, self.frame_rate_hz)
        elif self.need_boundaries:
            raise ManifestError(f"{utt.root}: row {utt.id!r} has no token_boundaries (run the aligner first)")
        if self.cache is not None:
            return Example(utt.id, ids, bnd, features=self.cache[utt.id], task=task)
        wave = load_audio(utt.audio_path, target_sr=self.sample_rate, expected_sr=utt.sample_rate)
        return Example(utt.id, ids, bnd, wave=wave, task=task)

    def read_batch(self, utts: Sequence[Utterance], epoch: int = 0, index: int = 0) -> Batch:
        """The collated :class:`Batch` of ``utts``; unreadable rows are skipped (``skip_bad``) or raise."""
        examples, skipped = [], []
        for utt in utts:
            try:
                examples.append(self.read(utt, epoch))
            except self.READ_ERRORS as e:
                if not getattr(self, "skip_bad", False):
                    if isinstance(e, (AudioError, FeatureCacheError)):
                        raise type(e)(f"{e} (row {utt.id!r}; data.skip_bad=true skips such rows)"
                                      ) from None
                    raise
                log.warning("skipping row %r (data.skip_bad): %s", utt.id, e)
                skipped.append((utt.id, f"{type(e).__name__}: {e}"))
        batch = collate(examples, epoch, index) if examples else empty_batch(epoch, index)
        batch.skipped = skipped
        return batch


# --------------------------------------------------------------------------------------- buckets
def pack_batches(order: Sequence[int], frames: Sequence[int], tokens: Sequence[int], max_frames: int = 0,
                 max_tokens: int = 0, max_batch: int = 0) -> list[list[int]]:
    """Greedily pack items (in ``order``) into batches whose PADDED size stays within budget.

    A batch of b items costs b * max(frames) frames and b * max(tokens) tokens (what the padded tensors
    hold); 0 means no limit. An item over budget on its own becomes a batch of one.
    """
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_f = cur_t = 0
    for i in order:
        f, t = max(cur_f, frames[i]), max(cur_t, tokens[i])
        n = len(cur) + 1
        over = ((max_frames and n * f > max_frames) or (max_tokens and n * t > max_tokens)
                or (max_batch and n > max_batch))
        if cur and over:
            batches.append(cur)
            cur, f, t = [], frames[i], tokens[i]
        cur.append(i)
        cur_f, cur_t = f, t
    if cur:
        batches.append(cur)
    return batches


def bucketed_batches(frames: Sequence[int], tokens: Sequence[int], rng: random.Random, max_frames: int = 0,
                     max_tokens: int = 0, max_batch: int = 0, window: int = 0, shuffle: bool = True
                     ) -> list[list[int]]:
    """Shuffle, sort by length inside windows of ``window`` items (0 = all), pack, shuffle the batches."""
    order = list(range(len(frames)))
    if shuffle:
        rng.shuffle(order)
    window = window or max(1, len(order))
    batches: list[list[int]] = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s: s + window], key=lambda i: (frames[i], tokens[i]))
        batches += pack_batches(chunk, frames, tokens, max_frames, max_tokens, max_batch)
    if shuffle:
        rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class BatchKey:
    """What the sampler hands to the dataset: which utterances, and where this batch sits in the order."""

    indices: tuple[int, ...]
    epoch: int
    index: int
    counted: bool = True


class DistributedBucketSampler(Sampler):
    """Length-bucketed, budgeted batches; each rank its own share, the same count on every rank.

    The order of epoch e depends only on (seed, e): every rank computes all batches, pads the list
    by repeating its first batches to a multiple of ``world_size``, and takes every world_size-th.
    ``infinite`` runs epoch after epoch (training); otherwise one pass over ``epoch`` (validation,
    where the repeated filler batches are marked ``counted=False``).
    """

    def __init__(self, frames: Sequence[int], tokens: Sequence[int], max_frames: int = 0, max_tokens: int = 0,
                 max_batch: int = 0, world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 infinite: bool = True, window: int = 0):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside world size {world_size}")
        if len(frames) == 0:
            raise ConfigError("no utterances to sample from")
        self.frames, self.tokens = list(frames), list(tokens)
        self.max_frames, self.max_tokens, self.max_batch = max_frames, max_tokens, max_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.shuffle, self.infinite, self.window = shuffle, infinite, window
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Begin at batch ``start`` (on this rank) of epoch ``epoch``: where a resumed run left off."""
        self.epoch, self.start = int(epoch), int(start)

    def epoch_batches(self, epoch: int) -> list[tuple[list[int], bool]]:
        """This rank's batches of ``epoch`` as (indices, counted)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches = bucketed_batches(self.frames, self.tokens, rng, self.max_frames, self.max_tokens,
                                   self.max_batch, self.window, self.shuffle)
        n = len(batches)
        total = math.ceil(n / self.world_size) * self.world_size
        padded = [(b, True) for b in batches] + [(batches[i % n], False) for i in range(total - n)]
        return padded[self.rank:: self.world_size]

    def __len__(self) -> int:
        """Batches per rank in one epoch."""
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[BatchKey]:
        epoch, start = self.epoch, self.start
        while True:
            for i, (idx, counted) in enumerate(self.epoch_batches(epoch)):
                if i >= start:
                    yield BatchKey(tuple(idx), epoch, i, counted)
            if not self.infinite:
                return
            epoch, start = epoch + 1, 0


class SpeechTextDataset(Dataset):
    """Map-style dataset over in-memory manifest rows; ``dataset[BatchKey]`` is a collated :class:`Batch`."""

    def __init__(self, utts: Sequence[Utterance], reader: ExampleReader):
        self.utts = list(utts)
        self.reader = reader

    def __len__(self) -> int:
        return len(self.utts)

    def lengths(self) -> tuple[list[int], list[int]]:
        """(frames, tokens) per utterance, for bucketing (tokens = boundaries count, no tokenising)."""
        frames = [self.reader.frames(u) for u in self.utts]
        tokens = [len(u.token_boundaries) if u.token_boundaries is not None else max(1, len(u.text) // 4)
                  for u in self.utts]
        return frames, tokens

    def __getitem__(self, key: BatchKey) -> Batch:
        batch = self.reader.read_batch([self.utts[i] for i in key.indices], key.epoch, key.index)
        batch.counted = key.counted
        return batch


# ---------------------------------------------------------------------------------------- streaming
def expand_shards(spec: str | Sequence[str]) -> list[Path]:
    """Manifest shards from a glob, a comma-separated list, or a list of paths/globs (sorted, unique)."""
    items = [s for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[Path] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise ConfigError(f"manifest shard pattern {item!r} matches no file")
        out += [Path(m) for m in matches]
    if not out:
        raise ConfigError("no manifest shards given")
    return sorted(set(out))


class ShardedManifestStream(IterableDataset):
    """Streams manifest shards larger than memory; each rank reads only its share.

    With at least as many shards as ranks, rank r reads shards r, r + world, ...; otherwise every rank
    reads all shards and keeps rows whose line number % world == rank. Per epoch (seed, epoch, rank):
    shard order shuffled, rows through a ``shuffle_buffer``, then every ``window`` rows sorted by
    length, packed under the budget and shuffled. Runs epoch after epoch forever (the training loop
    counts steps), so every rank always has a next batch. DataLoader worker w takes batches
    w, w + workers, ... which the loader returns in order.
    """

    def __init__(self, shards: str | Sequence[str], reader: ExampleReader, world_size: int = 1, rank: int = 0,
                 seed: int = 0, max_frames: int = 0, max_tokens: int = 0, max_batch: int = 0,
                 shuffle_buffer: int = 10_000, window: int = 2_000):
        self.shards = expand_shards(shards)
        self.reader = reader
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.max_frames, self.max_tokens, self.max_batch = max_frames, max_tokens, max_batch
        self.shuffle_buffer, self.window = max(1, shuffle_buffer), max(1, window)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def _rows(self, epoch: int, rng: random.Random) -> Iterator[Utterance]:
        if len(self.shards) >= self.world_size:
            mine = self.shards[self.rank:: self.world_size]
            row_filter = None
        else:
            mine, row_filter = list(self.shards), self.rank
        mine = list(mine)
        rng.shuffle(mine)
        k = 0
        for shard in mine:
            for utt in iter_manifest(shard):
                if row_filter is None or k % self.world_size == row_filter:
                    yield utt
                k += 1

    def _shuffled(self, rows: Iterator[Utterance], rng: random.Random) -> Iterator[Utterance]:
        buf: list[Utterance] = []
        for utt in rows:
            buf.append(utt)
            if len(buf) >= self.shuffle_buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def epoch_batches(self, epoch: int) -> Iterator[list[Utterance]]:
        """This rank's batches (lists of rows, no features read) of one epoch, in order."""
        rng = random.Random((self.seed * 1_000_003 + epoch) * 65_537 + self.rank)
        window: list[Utterance] = []

        def flush() -> list[list[Utterance]]:
            frames = [self.reader.frames(u) for u in window]
            tokens = [len(u.token_boundaries or []) or 1 for u in window]
            groups = bucketed_batches(frames, tokens, rng, self.max_frames, self.max_tokens, self.max_batch,
                                      window=0, shuffle=True)
            return [[window[i] for i in g] for g in groups]

        for utt in self._shuffled(self._rows(epoch, rng), rng):
            window.append(utt)
            if len(window) >= self.window:
                yield from flush()
                window = []
        if window:
            yield from flush()

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = self.epoch, self.start
        k = 0  # batches yielded by the whole loader so far (all workers): worker wid owns k % nw == wid
        while True:
            empty = True
            for i, rows in enumerate(self.epoch_batches(epoch)):
                empty = False
                if i < start:
                    continue
                if k % nw == wid:
                    yield self.reader.read_batch(rows, epoch, i)
                k += 1
            if empty:
                raise ConfigError(f"rank {self.rank}: its manifest shards hold no rows")
            epoch, start = epoch + 1, 0


# -------------------------------------------------------------------------------------- text corpus
class TextBatches:
    """Text-only LM batches for multitask training, drawn deterministically from (seed, step).

    Every rank draws its own sentences (rank in the seed) but for the same steps, so ranks stay in
    lock-step; no state to checkpoint: step alone fixes the batch.
    """

    def __init__(self, lines: Sequence[str], tokenizer: Any, max_tokens: int = 512, max_len: int = 128,
                 seed: int = 0, rank: int = 0):
        self.ids = [ids[:max_len] for ids in (list(tokenizer(t, add_special_tokens=False)["input_ids"])
                                              for t in lines if t.strip()) if len(ids) >= 2]
        if not self.ids:
            raise ConfigError("the text corpus for multitask training holds no usable line")
        self.max_tokens, self.seed, self.rank = max_tokens, seed, rank

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Any, **kw: Any) -> TextBatches:
        """One sentence per line of a text file, or the ``text`` of every row of a ``.jsonl`` manifest (or of a
        datasets / Lhotse source, speechlm.data.sources)."""
        from speechlm.data.sources import is_source

        if is_source(path):
            return cls([u.text for u in iter_manifest(path)], tokenizer, **kw)
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: text corpus not found")
        if path.suffix == ".jsonl":
            lines = [u.text for u in iter_manifest(path)]
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
        return cls(lines, tokenizer, **kw)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, M) long, mask (B, M) bool) for training step ``step`` on this rank."""
        rng = random.Random((self.seed * 1_000_003 + step) * 65_537 + self.rank)
        chosen: list[list[int]] = []
        longest = 0
        while True:
            ids = self.ids[rng.randrange(len(self.ids))]
            longest2 = max(longest, len(ids))
            if chosen and longest2 * (len(chosen) + 1) > self.max_tokens:
                break
            chosen.append(ids)
            longest = longest2
            if len(chosen) >= len(self.ids):
                break
        out = torch.zeros(len(chosen), longest, dtype=torch.long)
        mask = torch.zeros(len(chosen), longest, dtype=torch.bool)
        for i, ids in enumerate(chosen):
            out[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = True
        return out, mask


def uses_text_batch(step: int, ratio: float, seed: int = 0) -> bool:
    """Whether step ``step`` also trains on a text-only batch (same answer on every rank)."""
    return ratio > 0 and random.Random(seed * 7_919 + step).random() < ratio


# ------------------------------------------------------------------------------------------ loader
def make_loader(source: SpeechTextDataset | ShardedManifestStream, sampler: DistributedBucketSampler | None,
                num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader yielding :class:`Batch` objects (batches are formed by the sampler or the stream).

    It draws its workers' base seed from a generator of its own (``seed``), never from the global torch RNG:
    creating its iterator would otherwise advance that RNG, so a resumed run (which restores the RNG, then
    builds its loader) would train with other dropout masks than the uninterrupted one."""
    kw: dict[str, Any] = {"num_workers": num_workers, "collate_fn": _identity,
                          "generator": torch.Generator().manual_seed(seed)}
    if num_workers > 0:
        kw.update(prefetch_factor=2, persistent_workers=False)
    if isinstance(source, ShardedManifestStream):
        return DataLoader(source, batch_size=None, **kw)
    if sampler is None:
        raise ValueError("a map-style dataset needs its DistributedBucketSampler")
    return DataLoader(source, sampler=sampler, batch_size=None, **kw)


def _identity(x: Batch) -> Batch:
    return x
