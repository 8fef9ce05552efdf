"""Learnable attention merging (MAM) for Whisper, trained on its own ASR loss over manifest rows: the part of
speechlm.models.merging that reads audio (speechlm.data), hence one floor up from the models."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from speechlm.data.audio import load_audio
from speechlm.errors import ConfigError
from speechlm.models.merging import (
    LearnableMerge,
    factor_list,
    train_merge_factors,
    whisper_asr_loss,
    whisper_collate,
    whisper_label_ids,
)


def whisper_asr_batches(processor, utterances: Sequence, batch_size: int = 4, seed: int = 0,
                        language: str = "en") -> Iterator[dict[str, torch.Tensor]]:
    """Endless teacher-forcing batches of manifest utterances (``.audio_path``, ``.text``), reshuffled
    every pass; audio is read on demand."""
    if not utterances:
        raise ConfigError("whisper_asr_batches: no utterances")
    sr = int(processor.feature_extractor.sampling_rate)
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            more = list(range(len(utterances)))
            rng.shuffle(more)
            order += more
        chunk = [utterances[i] for i in order[:batch_size]]
        del order[:batch_size]
        waves = [load_audio(u.audio_path, sr, expected_sr=u.sample_rate).numpy() for u in chunk]
        feats = processor.feature_extractor(waves, sampling_rate=sr, return_tensors="pt").input_features
        seqs = [whisper_label_ids(processor.tokenizer, u.text, language)[0] for u in chunk]
        yield whisper_collate(feats, seqs, 4, processor.tokenizer.eos_token_id)


def learn_whisper_merge(model: nn.Module, processor, utterances: Sequence, steps: int,
                        init: float | Sequence[float] = 0.1, source: nn.Module | None = None,
                        projections: Sequence[str] = ("q", "k", "v"), rule: str = "same",
                        source_part: str = "auto", batch_size: int = 4, lr: float = 0.05, seed: int = 0,
                        log: Callable[[str], None] | None = None) -> dict:
    """Learnable MAM for a ``WhisperForConditionalGeneration``: train the encoder's per-layer factors on
    Whisper's own ASR loss over ``utterances``, everything else frozen, then bake them into ``model``'s
    encoder (in place). ``source`` defaults to ``model`` itself (its decoder's self-attention).
    Returns the merge report plus ``losses``."""
    model.requires_grad_(False)
    model.eval()  # no dropout: the loss sees the merge alone
    encoder = model.get_encoder()
    merge = LearnableMerge(encoder, model if source is None else source, init, projections, rule,
                           target_part="all", source_part=source_part)
    batches = whisper_asr_batches(processor, utterances, batch_size, seed)
    trained = train_merge_factors(merge, batches, whisper_asr_loss(model), steps, lr, log)
    report = merge.report()
    merge.bake()
    return {**report, "losses": trained["losses"], "learned": True, "steps": steps, "lr": lr,
            "batch_size": batch_size, "init": factor_list(init, len(report["factors"]))}
