"""Spoken StoryCloze: loaders (our JSONL sets, the TWIST audio release), TTS rendering and the three conditions.

Conditions (the ending with the higher score wins; ``summed`` and ``length_norm`` both reported):

* ``text``: the LLM alone on the transcripts (the upper bound);
* ``s2t``:  spoken context, text endings: ``[BOS] + speech(context)`` then the ending's text tokens;
* ``s``:    all speech: ``[BOS] + speech(context)`` then ``speech(ending)``, scoring the ending's
  transcript tokens (the aligner's tokens: decoded in free mode) predicted from speech positions.

Two controls say what a spoken context adds: ``endings`` (no context: the endings' own likelihood) and
``s2t_other`` (``s2t`` with *another* story's spoken context, see :func:`other_story_contexts`). A connector
that carries the story is above both; one that is above the first only changes how the LLM reads the endings.

The TWIST release (sStoryCloze / tStoryCloze) holds one wav per *whole* story and ending (context and
ending spoken together, no transcripts), so only the whole-story ``s`` condition applies to it.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from speechlm.data.manifest import json_row, jsonl_lines
from speechlm.errors import ManifestError
from speechlm.eval.scoring import (
    SCORINGS,
    SpeechFrontEnd,
    SpeechInput,
    aggregate,
    rotation_partner,
    score_text,
    start_ids,
    text_ids,
)

WRONG_STYLES = ("adversarial", "random")
CONDITIONS = ("text", "endings", "s2t", "s", "s2t_other")  # endings: no context at all (score_text_condition);
# s2t_other: another story's spoken context (other_story_contexts)
log = logging.getLogger(__name__)


@dataclass
class StoryItem:
    id: str
    context: list[str]  # the four context sentences
    right_ending: str
    wrong_ending: str
    wrong_style: str = "adversarial"
    # Spoken versions (our manifests); None for text-only sets, which are rendered with TTS.
    context_audio: Path | None = None
    right_audio: Path | None = None
    wrong_audio: Path | None = None
    voice: str = ""  # spoken sets: the row's "speaker" (or "voice"), e.g. "festival:ked_diphone/r175/p50"

    @property
    def context_text(self) -> str:
        return " ".join(self.context)

    @property
    def endings(self) -> tuple[str, str]:
        return self.right_ending, self.wrong_ending


@dataclass
class ReleasePair:
    """One story of the TWIST audio release: whole story with the right ending / with the wrong one."""

    id: str
    positive: Path
    negative: Path


@dataclass
class PairScores:
    """Per-token log-probs of the right and wrong ending of one item (condition-specific)."""

    id: str
    right: torch.Tensor
    wrong: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def correct(self, scoring: str) -> bool:
        """The right ending scores strictly higher (a tie counts as wrong, never as a lucky guess)."""
        return aggregate(self.right, scoring) > aggregate(self.wrong, scoring)


def embedded_set_path() -> Path:
    """The StoryCloze-style mini set shipped with the package (310 stories; see ``data/README.md``)."""
    return Path(str(resources.files("speechlm.eval") / "data" / "storycloze_mini.jsonl"))


# ---------------------------------------------------------------------------------------- loaders
def _text(row: dict, key: str, where: str) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ManifestError(f"{where}: {key!r} must be a non-empty string")
    return v.strip()


def read_story_items(path: str | Path, wrong_style: str = "adversarial", seed: int = 0) -> list[StoryItem]:
    """Read a StoryCloze JSONL (ours or a spoken manifest); every bad row raises naming ``file:line``.

    A row: ``{"id", "context": [4 sentences], "right_ending", "wrong_ending"}`` plus, for spoken
    sets, ``context_audio``, ``right_audio``, ``wrong_audio`` (paths relative to the file's folder)
    and optionally ``speaker`` (or ``voice``): who spoke it, for the per-engine breakdown.
    ``wrong_style="random"`` replaces every wrong ending with the right ending of another story
    (a fixed-point-free shuffle seeded by ``seed``): the tStoryCloze construction.
    """
    if wrong_style not in WRONG_STYLES:
        raise ValueError(f"wrong_style must be one of {WRONG_STYLES}, not {wrong_style!r}")
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: StoryCloze file not found")
    items: list[StoryItem] = []
    seen: set[str] = set()
    for where, line in jsonl_lines(path):
        row = json_row(line, where)
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
        sid = _text(row, "id", where)
        if sid in seen:
            raise ManifestError(f"{where}: duplicate id {sid!r}")
        seen.add(sid)
        ctx = row.get("context")
        if not (isinstance(ctx, list) and len(ctx) == 4 and all(isinstance(s, str) and s.strip() for s in ctx)):
            raise ManifestError(f"{where}: 'context' must be a list of 4 non-empty sentences (id {sid!r})")
        right, wrong = _text(row, "right_ending", where), _text(row, "wrong_ending", where)
        if right == wrong:
            raise ManifestError(f"{where}: right and wrong ending are identical (id {sid!r})")
        audio: dict[str, Path | None] = {}
        keys = ("context_audio", "right_audio", "wrong_audio")
        present = [k for k in keys if row.get(k) is not None]
        if present and len(present) != 3:
            raise ManifestError(f"{where}: spoken rows need all of {', '.join(keys)} (id {sid!r})")
        for k in keys:
            if row.get(k) is not None:
                p = Path(_text(row, k, where))
                audio[k] = p if p.is_absolute() else path.parent / p
        voice = row.get("speaker", row.get("voice"))
        items.append(StoryItem(sid, [s.strip() for s in ctx], right, wrong,
                               str(row.get("wrong_style", "adversarial")), **audio,
                               voice=str(voice) if voice is not None else ""))
    if not items:
        raise ManifestError(f"{path}: no stories")
    if wrong_style == "random":
        items = random_wrong_endings(items, seed)
    return items


def random_wrong_endings(items: list[StoryItem], seed: int = 0) -> list[StoryItem]:
    """tStoryCloze construction: each wrong ending becomes the right ending of another story of ``items``."""
    if len(items) < 2:
        raise ValueError("random wrong endings need at least two stories")
    rng = random.Random(seed)
    perm = list(range(len(items)))
    while any(i == p for i, p in enumerate(perm)):
        rng.shuffle(perm)
    out = []
    for i, it in enumerate(items):
        donor = items[perm[i]]
        out.append(StoryItem(it.id, it.context, it.right_ending, donor.right_ending, "random",
                             it.context_audio, it.right_audio, donor.right_audio, it.voice))
    return out


_RELEASE_NAME = re.compile(r"^(\d+)_(.+)\.wav$", re.IGNORECASE)
_NEGATIVE_WORDS = ("incorrect", "negative", "neg", "wrong", "false")
_POSITIVE_WORDS = ("correct", "positive", "pos", "right", "true")


def _polarity(label: str) -> str | None:
    words = re.split(r"[^a-z]+", label.lower())
    if any(w in _NEGATIVE_WORDS for w in words):
        return "negative"
    if any(w in _POSITIVE_WORDS for w in words):
        return "positive"
    return None


def read_spoken_release(folder: str | Path) -> list[ReleasePair]:
    """Read the TWIST sStoryCloze / tStoryCloze audio release: pairs of whole-story wav files.

    The release is a folder (optionally one level of subfolders) of files named
    ``<index>_<label>.wav``, two per story index. A label that says which is which (``correct`` /
    ``incorrect``, ``pos`` / ``neg``, ...) is used; otherwise, as in the reference scorer, the first
    of the two names in sorted order is the right ending. A story index with other than two files,
    or two files of the same polarity, raises :class:`ManifestError` naming the files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: spoken StoryCloze folder not found")
    files = sorted(list(folder.glob("*.wav")) + list(folder.glob("*/*.wav")))
    if not files:
        raise ManifestError(f"{folder}: no .wav files (expected <index>_<label>.wav pairs)")
    groups: dict[tuple[str, int], list[Path]] = {}
    for f in files:
        m = _RELEASE_NAME.match(f.name)
        if not m:
            raise ManifestError(f"{f}: file name is not <index>_<label>.wav")
        groups.setdefault((str(f.parent.relative_to(folder)), int(m.group(1))), []).append(f)
    pairs = []
    for (sub, idx), group in sorted(groups.items()):
        if len(group) != 2:
            raise ManifestError(f"{folder}: story {idx} in {sub!r} has {len(group)} files "
                                f"({', '.join(p.name for p in group)}), expected 2")
        pol = [_polarity(_RELEASE_NAME.match(p.name).group(2)) for p in group]  # type: ignore[union-attr]
        if pol[0] is not None and pol[0] == pol[1]:
            raise ManifestError(f"{folder}: story {idx}: both {group[0].name} and {group[1].name} are {pol[0]}")
        pos, neg = (group[1], group[0]) if pol[0] == "negative" or pol[1] == "positive" else (group[0], group[1])
        pairs.append(ReleasePair(f"{sub}/{idx}" if sub != "." else str(idx), pos, neg))
    return pairs


# --------------------------------------------------------------------------------------- rendering
def default_eval_voices(condition: str = "natural") -> list[str]:
    """The training corpus's held-out *test* voices of one condition: ``"natural"`` (Festival's ked and
    Piper's joe: voices no training clip has, those installed here) or ``"hard"`` (held-out eSpeak accents
    and variants). Falls back to the hard voices, with a warning, when no natural engine is installed."""
    from speechlm.data.corpus_voices import VoicePlan
    from speechlm.data.tts import HARD_VOICES, is_hard

    if condition not in ("natural", "hard"):
        raise ValueError(f"unknown voice condition {condition!r} (natural | hard)")
    hard = list(HARD_VOICES["test"])
    if condition == "hard":
        return hard
    plan = VoicePlan.default()
    natural = list(dict.fromkeys(v for v in plan.held_out["test"] if not is_hard(v)))
    if not natural:
        log.warning("no natural held-out voice is installed (tools/install_tts.sh): evaluating on the hard "
                    "eSpeak voices %s", ", ".join(hard))
        return hard
    return natural


def resolve_eval_voices(voices: Sequence[str]) -> list[str]:
    """Evaluation voices from a config: explicit voice strings, or one condition name (``natural`` /
    ``hard``, see :func:`default_eval_voices`); empty = ``natural``."""
    if not voices:
        return default_eval_voices()
    if len(voices) == 1 and voices[0] in ("natural", "hard"):
        return default_eval_voices(voices[0])
    return list(voices)


@dataclass
class SpokenStory:
    item: StoryItem
    context: SpeechInput
    right: SpeechInput
    wrong: SpeechInput
    voice: str = ""


def _speech(text: str, audio: Path | None, uid: str, voice: str, rate_wpm: int, sample_rate: int) -> SpeechInput:
    """Manifest audio where given, else TTS (``voice``: an eSpeak name or ``"engine:name"``)."""
    from speechlm.data.audio import load_audio
    from speechlm.data.tts import synthesize

    if audio is not None:
        return SpeechInput(load_audio(audio, sample_rate), text, uid)
    return SpeechInput(synthesize(text, voice=voice, rate_wpm=rate_wpm, sample_rate=sample_rate).wave, text, uid)


def speak_items(items: Sequence[StoryItem], voices: Sequence[str] | None = None, rate_wpm: int = 175,
                sample_rate: int = 16000) -> list[SpokenStory]:
    """Audio for each item: its manifest audio where given, else TTS with voice ``voices[i % n]``.

    ``SpokenStory.voice`` is the voice used, or for manifest audio the row's speaker (``"manifest"``
    when the row names none)."""
    voices = list(voices) if voices else default_eval_voices()
    out = []
    for i, it in enumerate(items):
        voice = voices[i % len(voices)]
        args = (voice, rate_wpm, sample_rate)
        out.append(SpokenStory(it, _speech(it.context_text, it.context_audio, f"{it.id}-context", *args),
                               _speech(it.right_ending, it.right_audio, f"{it.id}-right", *args),
                               _speech(it.wrong_ending, it.wrong_audio, f"{it.id}-wrong", *args),
                               voice if it.context_audio is None else (it.voice or "manifest")))
    return out


# -------------------------------------------------------------------------------------- conditions
def score_text_condition(llm: torch.nn.Module, tokenizer: Any, items: Sequence[StoryItem],
                         batch_size: int = 16, context: bool = True) -> list[PairScores]:
    """``text``: both endings scored by the LLM alone after the written context.

    ``context=False`` is the ``endings`` condition: the same ending tokens after the start token alone, the
    accuracy an LLM gets from the endings' own likelihood; what a condition adds over it is what its context
    (written, transcribed or spoken) contributes."""
    start = start_ids(tokenizer)
    prefixes, conts = [], []
    for it in items:
        ctx = start + text_ids(tokenizer, it.context_text) if context else start
        for ending in it.endings:
            prefixes.append(ctx)
            conts.append(text_ids(tokenizer, " " + ending))
    lp = score_text(llm, prefixes, conts, batch_size)
    return [PairScores(it.id, lp[2 * k], lp[2 * k + 1]) for k, it in enumerate(items)]


def _batches(seq: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def score_speech_conditions(model: Any, front: SpeechFrontEnd, stories: Sequence[SpokenStory],
                            conditions: Sequence[str] = ("s2t", "s"), batch_size: int = 8
                            ) -> dict[str, list[PairScores]]:
    """``s2t`` and/or ``s`` for spoken stories through a SpeechLM; the ``s`` condition needs token ids."""
    from speechlm.models.speechlm import TextSegment

    tok = model.tokenizer
    start = start_ids(tok)
    out: dict[str, list[PairScores]] = {c: [] for c in conditions}
    chunks = _batches(list(stories), batch_size)
    for chunk in tqdm(chunks, desc="spoken StoryCloze", unit="batch", total=len(chunks)):
        ctx = front.embed([s.context for s in chunk])
        prefixes = [[TextSegment(start), c] for c in ctx]
        if "s2t" in conditions:
            conts = [text_ids(tok, " " + e) for s in chunk for e in s.item.endings]
            lp = model.score([p for p in prefixes for _ in range(2)], conts)
            for k, s in enumerate(chunk):
                out["s2t"].append(PairScores(s.item.id, lp[2 * k], lp[2 * k + 1]))
        if "s" in conditions:
            if not front.uses_boundaries:
                raise ValueError("the all-speech condition needs a connector with one vector per token (SSR)")
            right = front.embed([s.right for s in chunk])
            wrong = front.embed([s.wrong for s in chunk])
            lp = model.score_speech(prefixes + prefixes, right + wrong)
            n = len(chunk)
            for k, s in enumerate(chunk):
                dec = {"right_tokens": len(right[k].ids), "wrong_tokens": len(wrong[k].ids)}
                out["s"].append(PairScores(s.item.id, lp[k], lp[n + k], dec))
    return out


def other_story_contexts(stories: Sequence[SpokenStory]) -> list[SpokenStory]:
    """Each story with the spoken context of the story half the set away, its own endings kept.

    The ``s2t_other`` control: speech of the same kind (voices, lengths, the connector's own vectors) that says
    nothing about these endings. ``s2t`` minus ``s2t_other`` on the same items is what the *right* story's
    speech adds; a connector whose gain over the endings alone survives the wrong story is not hearing the story.
    Every story gets another's context: the story ``n // 2`` further on (deterministic, and away from neighbours
    in the set's order, which may share a topic), or the next one after it whose right ending is not this
    story's wrong ending (with random wrong endings that story's context would argue *for* the wrong ending)."""
    n = len(stories)
    if n < 2:
        raise ValueError(f"another story's context needs at least two stories, got {n}")
    out = []
    for k, s in enumerate(stories):
        j = rotation_partner(n, k, lambda j, s=s: stories[j].item.right_ending != s.item.wrong_ending)
        if j is None:
            raise ValueError(f"story {s.item.id}: every other story's right ending is its wrong ending")
        out.append(SpokenStory(s.item, stories[j].context, s.right, s.wrong, s.voice))
    return out


def score_release(model: Any, front: SpeechFrontEnd, pairs: Sequence[ReleasePair], sample_rate: int = 16000,
                  batch_size: int = 4) -> list[PairScores]:
    """The TWIST release: likelihood of each whole story's transcript tokens from its speech positions."""
    from speechlm.data.audio import load_audio
    from speechlm.models.speechlm import TextSegment

    if not front.uses_boundaries:
        raise ValueError("scoring whole spoken stories needs a connector with one vector per token (SSR)")
    start = start_ids(model.tokenizer)
    out = []
    for chunk in _batches(list(pairs), batch_size):
        inputs = [SpeechInput(load_audio(p, sample_rate), None, f"{pr.id}-{tag}")
                  for pr in chunk for tag, p in (("pos", pr.positive), ("neg", pr.negative))]
        segs = front.embed(inputs)
        lp = model.score_speech([[TextSegment(start)] for _ in segs], segs)
        for k, pr in enumerate(chunk):
            out.append(PairScores(pr.id, lp[2 * k], lp[2 * k + 1]))
    return out


def accuracy_counts(scores: Sequence[PairScores]) -> dict[str, tuple[int, int]]:
    """``{scoring: (correct, total)}`` for both scorings."""
    return {s: (sum(p.correct(s) for p in scores), len(scores)) for s in SCORINGS}
