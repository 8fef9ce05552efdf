"""Batching: boundary conversion, budgets, the distributed sampler, sharded streaming, cache vs on-the-fly."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from training_helpers import make_world
from transformers import AutoTokenizer

from speechlm.data.batching import (
    DistributedBucketSampler,
    ExampleReader,
    ShardedManifestStream,
    SpeechTextDataset,
    TextBatches,
    bucketed_batches,
    convert_boundaries,
    encode_batch,
    make_loader,
    pack_batches,
    uses_text_batch,
)
from speechlm.data.manifest import read_manifest, write_manifest
from speechlm.errors import ManifestError
from speechlm.models.encoder import SpeechEncoder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return make_world(tmp_path_factory.mktemp("world"))


def test_convert_boundaries():
    # 100 Hz frame b ends at (b+1)*10 ms; the 50 Hz frame holding that end
    assert convert_boundaries([0, 1, 2, 3, 9], 100.0, 50.0) == [0, 0, 1, 1, 4]
    assert convert_boundaries([0, 1, 4], 50.0, 100.0) == [1, 3, 9]
    assert convert_boundaries([3, 7], 50.0, 50.0) == [3, 7]
    assert convert_boundaries([3, 7, 8], 50.0, 12.5) == [0, 1, 2]


def _lengths(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    frames = [rng.randint(20, 400) for _ in range(n)]
    return frames, [max(1, f // 12 + rng.randint(-3, 3)) for f in frames]


def test_batches_respect_the_padded_budget():
    frames, tokens = _lengths(300)
    batches = bucketed_batches(frames, tokens, random.Random(0), max_frames=1500, max_tokens=120)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        assert len(b) * max(frames[i] for i in b) <= 1500 or len(b) == 1
        assert len(b) * max(tokens[i] for i in b) <= 120 or len(b) == 1
    assert len({len(b) for b in batches}) > 1  # a budget, not a fixed count
    # an item over budget on its own still gets a batch
    assert pack_batches([0, 1], [5000, 10], [1, 1], max_frames=100) == [[0], [1]]
    assert pack_batches([0, 1, 2], [10, 10, 10], [1, 1, 1], max_batch=2) == [[0, 1], [2]]


def test_sampler_partitions_across_ranks_and_is_deterministic_per_epoch():
    frames, tokens = _lengths(101)
    kw = {"max_frames": 2000, "max_tokens": 150, "world_size": 3, "seed": 7, "infinite": False}
    per_rank = []
    for rank in range(3):
        s = DistributedBucketSampler(frames, tokens, rank=rank, **kw)
        keys = list(s)
        assert len(keys) == len(s)
        per_rank.append(keys)
    assert len({len(k) for k in per_rank}) == 1  # same number of batches on every rank
    counted = Counter(i for keys in per_rank for k in keys if k.counted for i in k.indices)
    assert counted == Counter(range(101))  # every utterance exactly once
    s = DistributedBucketSampler(frames, tokens, rank=1, **kw)
    assert [k.indices for k in s] == [k.indices for k in per_rank[1]]  # same epoch, same order
    s.set_position(1)
    epoch1 = [k.indices for k in s]
    assert epoch1 != [k.indices for k in per_rank[1]]
    s.set_position(1, 2)
    assert [k.indices for k in s] == epoch1[2:]  # resume in the middle of an epoch
    inf = iter(DistributedBucketSampler(frames, tokens, rank=1, **{**kw, "infinite": True}))
    first = [next(inf) for _ in range(len(per_rank[1]) + 1)]
    assert first[-1].epoch == 1 and first[-1].index == 0


def _shards(world: dict[str, str], root: Path, n: int) -> list[str]:
    utts = read_manifest(world["manifest"])
    paths = []
    for k in range(n):
        p = root / f"shard-{k}.jsonl"
        write_manifest(p, utts[k::n])
        paths.append(str(p))
    for p in paths:  # relative audio paths resolve against each shard's folder: link the audio there
        link = Path(p).parent / "audio"
        if not link.exists():
            link.symlink_to(Path(world["manifest"]).parent / "audio")
    return paths


@pytest.mark.parametrize("n_shards", [3, 1])
def test_stream_each_rank_reads_its_share(world, tmp_path, n_shards):
    tok = AutoTokenizer.from_pretrained(world["llm"])
    reader = ExampleReader(tok, 50.0, world["cache"])
    shards = _shards(world, tmp_path, n_shards)
    seen: dict[int, list[str]] = {}
    for rank in range(2):
        s = ShardedManifestStream(str(tmp_path / "shard-*.jsonl"), reader, world_size=2, rank=rank, seed=3,
                                  max_frames=300, shuffle_buffer=4, window=8)
        epoch0 = [u.id for b in s.epoch_batches(0) for u in b]
        assert len(epoch0) == len(set(epoch0))
        assert epoch0 == [u.id for b in s.epoch_batches(0) for u in b]  # deterministic
        assert epoch0 != [u.id for b in s.epoch_batches(1) for u in b]  # reshuffled next epoch
        seen[rank] = epoch0
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(u.id for u in read_manifest(world["manifest"]))
    if n_shards == 3:  # rank 1 reads only shard 1
        assert set(seen[1]) == {u.id for u in read_manifest(shards[1])}
    # batches come out as Batch objects with positions; resuming skips exactly what was consumed
    s = ShardedManifestStream(shards, reader, world_size=2, rank=0, seed=3, max_frames=300, shuffle_buffer=4,
                              window=8)
    it = iter(s)
    first = [next(it) for _ in range(5)]
    s.set_position(first[2].epoch, first[2].index + 1)
    resumed = next(iter(s))
    assert resumed.utt_ids == first[3].utt_ids
    # DataLoader workers split the batches and the loader keeps the order
    it2 = iter(make_loader(ShardedManifestStream(shards, reader, world_size=2, rank=0, seed=3, max_frames=300,
                                                 shuffle_buffer=4, window=8), None, num_workers=2))
    assert [next(it2).utt_ids for _ in range(5)] == [b.utt_ids for b in first]


def test_cache_and_on_the_fly_give_the_same_batches(world):
    tok = AutoTokenizer.from_pretrained(world["llm"])
    encoder = SpeechEncoder(world["enc"])
    utts = read_manifest(world["manifest"])[:6]
    cached = SpeechTextDataset(utts, ExampleReader(tok, encoder.frame_rate_hz, world["cache"]))
    onfly = SpeechTextDataset(utts, ExampleReader(tok, encoder.frame_rate_hz, None, sample_rate=encoder.sample_rate))
    frames, tokens = cached.lengths()
    assert frames == [cached.reader.cache.frames(u.id) for u in utts]
    sampler = DistributedBucketSampler(frames, tokens, max_frames=200, shuffle=False, infinite=False)
    for key in sampler:
        a = cached[key]
        b = onfly[key]
        assert b.features is None and b.waves is not None
        b = encode_batch(b, encoder)
        assert torch.equal(a.frame_lengths, b.frame_lengths)
        assert torch.equal(a.boundaries, b.boundaries) and torch.equal(a.token_ids, b.token_ids)
        assert torch.allclose(a.features, b.features, atol=2e-2, rtol=1e-2)  # the cache stores float16
        assert a.features.shape[:2] == (len(key.indices), 1)
        for i, u in enumerate(a.utt_ids):
            utt = next(x for x in utts if x.id == u)
            n = len(utt.token_boundaries)
            assert a.token_mask[i].sum() == n
            assert a.boundaries[i, :n].tolist() == [min(x, int(a.frame_lengths[i]) - 1) for x in
                                                    convert_boundaries(utt.token_boundaries, 100.0, 50.0)]
            assert int(a.boundaries[i].max()) < int(a.frame_lengths[i])


def test_workers_give_the_same_batches(world):
    tok = AutoTokenizer.from_pretrained(world["llm"])
    utts = read_manifest(world["manifest"])
    ds = SpeechTextDataset(utts, ExampleReader(tok, 50.0, world["cache"]))
    frames, tokens = ds.lengths()

    def run(workers: int) -> list[list[str]]:
        s = DistributedBucketSampler(frames, tokens, max_frames=300, world_size=2, rank=1, seed=1)
        it = iter(make_loader(ds, s, workers))
        return [next(it).utt_ids for _ in range(6)]

    assert run(0) == run(2)


def test_loader_leaves_the_global_rng_alone(world):
    """Starting a loader must not advance torch's global RNG (a resumed run restores it, then builds its loader)."""
    tok = AutoTokenizer.from_pretrained(world["llm"])
    ds = SpeechTextDataset(read_manifest(world["manifest"]), ExampleReader(tok, 50.0, world["cache"]))
    frames, tokens = ds.lengths()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    it = iter(make_loader(ds, DistributedBucketSampler(frames, tokens, max_frames=300, seed=1), 0, seed=1))
    next(it)
    assert torch.equal(torch.get_rng_state(), before)


def test_token_count_mismatch_is_a_manifest_error(world, tmp_path):
    tok = AutoTokenizer.from_pretrained(world["llm"])
    utt = read_manifest(world["manifest"])[0]
    utt.token_boundaries = utt.token_boundaries[:-1]
    with pytest.raises(ManifestError, match=utt.id):
        ExampleReader(tok, 50.0, world["cache"]).read(utt)


def test_text_batches_deterministic_and_budgeted(world):
    tok = AutoTokenizer.from_pretrained(world["llm"])
    tb = TextBatches.from_file(world["text"], tok, max_tokens=30, seed=1)
    ids, mask = tb.batch(5)
    assert torch.equal(ids, tb.batch(5)[0]) and not torch.equal(ids, tb.batch(6)[0])
    assert ids.shape[0] * ids.shape[1] <= 30 and mask.any(1).all()
    steps = [s for s in range(200) if uses_text_batch(s, 0.25, seed=1)]
    assert 25 < len(steps) < 75 and steps == [s for s in range(200) if uses_text_batch(s, 0.25, seed=1)]
