"""Who speaks the corpus: the training voices per engine and their shares, the held-out voices of valid and test
(natural speakers, and the "hard" held-out eSpeak accents), rates and pitches, and the installed engines."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from speechlm.data.text_sources import CorpusError
from speechlm.data.tts import HARD_VOICES, engine_of

log = logging.getLogger(__name__)

# eSpeak voices: accent + "+variant". Valid/test accents and variants never occur in train.
# Train uses every other English accent and 38 variants (eSpeak's numbered ones plus named ones, none
# derived from a held-out variant: "linda" is left out as a near copy of f4).
TRAIN_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc")
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m4", "m7", "m8", "f1", "f2", "f3",
                  "Alex", "Andy", "Annie", "adam", "anika", "aunty", "belinda", "benjamin", "boris",
                  "caleb", "david", "ed", "edward", "grandma", "grandpa", "ian", "iven", "john",
                  "klatt", "klatt2", "klatt3", "max", "michel", "norbert", "paul", "quincy",
                  "robert", "steph", "travis")
#: Natural-sounding training voices per engine (eSpeak's are :func:`train_voices`).
NATURAL_TRAIN_VOICES = {"flite": ("flite:kal16", "flite:kal"), "festival": ("festival:kal_diphone",)}
#: Share of the training sentences each engine speaks (an engine that is not installed is left out).
TRAIN_ENGINE_SHARE = {"flite": 0.35, "festival": 0.35, "espeak": 0.30}
#: Held-out natural voices: Festival's ked (a speaker absent from training) in valid and test, and
#: Piper's joe (an engine and a voice absent from training and validation) in test only.
NATURAL_HELD_OUT_VOICES = {
    "valid": ("festival:ked_diphone",),
    "test": ("festival:ked_diphone", "piper:en_US-joe-medium"),
}
HELD_OUT_VOICES = {s: NATURAL_HELD_OUT_VOICES[s] + HARD_VOICES[s] for s in ("valid", "test")}
#: Round-robin slots per held-out voice: natural voices are spoken twice as often as each hard one.
HELD_OUT_SLOTS = {"natural": 2, "hard": 1}
TRAIN_RATE_WPM = (140, 210)
TRAIN_PITCH = (30, 70)  # eSpeak only; the other engines vary pitch by augmentation
HELD_OUT_RATE_WPM = (150, 200)
HELD_OUT_PITCH = (35, 65)


def train_voices() -> list[str]:
    """eSpeak's training voices (accent x variant)."""
    return [a + (f"+{v}" if v else "") for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS]


def speaker_name(voice: str, rate_wpm: int, pitch: int) -> str:
    """The manifest ``speaker``: voice, rate and pitch ("en-us+m3/r175/p50")."""
    return f"{voice}/r{rate_wpm}/p{pitch}"


def available_engines() -> set[str]:
    """Engines installed on this machine (eSpeak always is: it is a Python dependency)."""
    from speechlm.data.tts import ENGINES, engine_available

    return {e for e in ENGINES if engine_available(e)}


def _voice_installed(voice: str, engines: set[str]) -> bool:
    from speechlm.data.tts import list_voices, parse_voice

    spec = parse_voice(voice)
    return spec.engine in engines and (spec.engine == "espeak" or spec.name in list_voices(spec.engine))


@dataclass
class VoicePlan:
    """Who speaks each split: training voices per engine with their shares, held-out round-robin lists."""

    train: dict[str, list[str]]  # engine -> voices
    train_share: dict[str, float]  # engine -> share of training sentences (sums to 1)
    held_out: dict[str, list[str]]  # split -> round-robin voice list (natural voices repeated)
    missing: list[str] = field(default_factory=list)  # voices left out because not installed

    @classmethod
    def default(cls, engines: set[str] | None = None) -> VoicePlan:
        """The default plan restricted to the installed engines (``engines`` overrides detection)."""
        from speechlm.data.tts import is_reserved

        engines = available_engines() if engines is None else set(engines) | {"espeak"}
        missing: list[str] = []

        def keep(voices: Iterable[str]) -> list[str]:
            out = []
            for v in voices:
                if is_reserved(v):
                    raise CorpusError(f"{v}: a reserved CMU ARCTIC speaker (slt, rms, awb) may not be used")
                if engine_of(v, label_hard=False) == "espeak" or _voice_installed(v, engines):
                    out.append(v)
                else:
                    missing.append(v)
            return out

        train = {"espeak": train_voices()}
        for engine, voices in NATURAL_TRAIN_VOICES.items():
            if kept := keep(voices):
                train[engine] = kept
        share = {e: TRAIN_ENGINE_SHARE.get(e, 0.0) for e in train}
        total = sum(share.values())
        held_out = {}
        for split in ("valid", "test"):
            natural = keep(NATURAL_HELD_OUT_VOICES[split])
            held_out[split] = (natural * HELD_OUT_SLOTS["natural"]
                               + list(HARD_VOICES[split]) * HELD_OUT_SLOTS["hard"])
        if missing:
            log.warning("voices left out (engine or voice not installed; see tools/install_tts.sh): %s",
                        ", ".join(sorted(set(missing))))
        return cls(train=train, train_share={e: v / total for e, v in share.items()}, held_out=held_out,
                   missing=sorted(set(missing)))

    def check_disjoint(self) -> None:
        """No held-out voice (or eSpeak accent of one) is a training voice."""
        train = {v for vs in self.train.values() for v in vs}
        held = {v for vs in self.held_out.values() for v in vs}
        if train & held:
            raise CorpusError(f"voices in training and held out: {sorted(train & held)}")
        train_accents = {v.split("+")[0] for v in self.train.get("espeak", [])}
        hard_accents = {v.split("+")[0] for v in held if engine_of(v, label_hard=False) == "espeak"}
        if train_accents & hard_accents:
            raise CorpusError(f"eSpeak accents in training and held out: {sorted(train_accents & hard_accents)}")
