"""The corpus plan: which sentence goes to which split, spoken by which voice at which rate and pitch, with which
augmentation; deterministic for a seed, sentences never shared between splits."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from speechlm.data.corpus_voices import (
    HELD_OUT_PITCH,
    HELD_OUT_RATE_WPM,
    TRAIN_PITCH,
    TRAIN_RATE_WPM,
    VoicePlan,
)
from speechlm.data.coverage import coverage_targets, estimate_speech_s, select_for_coverage
from speechlm.data.text_sources import CorpusError
from speechlm.data.tts import engine_of

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
#: Share of the hours each split gets.
SPLIT_SHARE = {"train": 0.90, "valid": 0.05, "test": 0.05}
#: Augmentation policy of the training clips (see speechlm.data.augment.POLICIES); held-out clips are clean.
TRAIN_AUGMENTATION = "default"

#: Default mixture of text sources (weights of the sentences drawn at random).
SOURCE_WEIGHTS = {"wordnet": 0.50, "everyday": 0.20, "wiki": 0.10, "news": 0.10, "reviews": 0.10}
#: Share of the training hours chosen for lexical coverage of general English before random drawing.
COVERAGE_SHARE = 0.8


@dataclass
class PlannedUtterance:
    id: str
    text: str
    split: str
    source: str
    voice: str
    rate_wpm: int
    pitch: int
    augment: str = "none"  # speechlm.data.augment.Augmentation.to_str()



def plan_corpus(sources: dict[str, list[str]], hours: float, seed: int,
                weights: dict[str, float] | None = None, voices: VoicePlan | None = None,
                coverage_share: float = COVERAGE_SHARE, augmentation: str = TRAIN_AUGMENTATION
                ) -> list[PlannedUtterance]:
    """Choose sentences, splits, voices, rates, pitches and augmentations for ``hours`` of audio.

    Deterministic for its arguments. Sentences are deduplicated (case-insensitively) across sources,
    so no sentence is in two splits. Valid and test draw at random by source weight; train first takes
    ``coverage_share`` of its hours by :func:`select_for_coverage` (general-English word list), then
    draws at random. ``voices`` defaults to :meth:`VoicePlan.default` (the installed engines).
    """
    from speechlm.data.augment import POLICIES

    if hours <= 0:
        raise CorpusError(f"hours must be positive, got {hours}")
    voices = voices or VoicePlan.default()
    voices.check_disjoint()
    policy = POLICIES[augmentation]
    rng = random.Random(seed)
    seen: set[str] = set()
    pools: dict[str, list[str]] = {}
    for name in sorted(sources):
        pool = []
        for s in sources[name]:
            key = s.lower()
            if key not in seen:
                seen.add(key)
                pool.append(s)
        rng.shuffle(pool)
        if pool:
            pools[name] = pool
    if not pools:
        raise CorpusError("no speakable sentences in any text source")
    weights = {k: (weights or SOURCE_WEIGHTS).get(k, 1.0) for k in pools}
    engines = sorted(voices.train)
    plan: list[PlannedUtterance] = []

    def add(split: str, index: int, source: str, text: str) -> float:
        if split == "train":
            engine = rng.choices(engines, weights=[voices.train_share[e] for e in engines])[0]
            voice = rng.choice(voices.train[engine])
            rate = rng.randint(*TRAIN_RATE_WPM)
            pitch = rng.randint(*TRAIN_PITCH) if engine == "espeak" else 50
            aug = policy.sample(random.Random(f"{seed}/{split}/{index}"))
            augment = aug.to_str()
        else:
            voice = voices.held_out[split][index % len(voices.held_out[split])]
            rate = rng.randint(*HELD_OUT_RATE_WPM)
            pitch = rng.randint(*HELD_OUT_PITCH) if engine_of(voice, label_hard=False) == "espeak" else 50
            augment = "none"
        plan.append(PlannedUtterance(f"{split}-{index:06d}-{source}", text, split, source, voice, rate, pitch,
                                     augment))
        return estimate_speech_s(text, rate)

    def draw_random(split: str, budget_s: float, used_s: float, index: int) -> tuple[float, int]:
        while used_s < budget_s and pools:
            names = sorted(pools)
            source = rng.choices(names, weights=[weights[n] for n in names])[0]
            text = pools[source].pop()
            if not pools[source]:
                del pools[source]
            used_s += add(split, index, source, text)
            index += 1
        return used_s, index

    for split in ("valid", "test"):  # held-out splits first so they always get sentences
        budget_s = hours * 3600 * SPLIT_SHARE[split]
        used_s, _ = draw_random(split, budget_s, 0.0, 0)
        if used_s < budget_s:
            log.warning("text ran out: %s has %.2f of %.2f planned hours", split, used_s / 3600, budget_s / 3600)
    budget_s = hours * 3600 * SPLIT_SHARE["train"]
    used_s, index = 0.0, 0
    if coverage_share > 0 and pools:
        flat = [(name, text) for name in sorted(pools) for text in pools[name]]
        chosen = select_for_coverage([t for _, t in flat], coverage_targets(), budget_s * coverage_share)
        for i in chosen:
            used_s += add("train", index, flat[i][0], flat[i][1])
            index += 1
        taken = set(chosen)
        for name in list(pools):
            pools[name] = [t for j, (n, t) in enumerate(flat) if n == name and j not in taken]
            if not pools[name]:
                del pools[name]
    used_s, _ = draw_random("train", budget_s, used_s, index)
    if used_s < budget_s:
        log.warning("text ran out: train has %.2f of %.2f planned hours", used_s / 3600, budget_s / 3600)
    return plan
