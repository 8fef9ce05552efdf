"""The ``flite`` engine: CMU Flite 2.2 (Debian ``flite``/``libflite1``), called through its C library.

The library (``libflite.so.1`` and one ``libflite_cmu_*.so.1`` per voice, which the ``flite`` binary
links to) is used instead of the binary because it exposes the utterance the binary discards: its
Token relation (the text's whitespace tokens, punctuation split off), each token's Word items
(``1995`` -> nineteen ninety five) and each word's segments with their end times
(``R:SylStructure.daughtern.daughtern.R:Segment.end``). A word spans from the end of the segment
before its first one to the end of its last one, so the timings are Flite's own segment
boundaries, not an estimate; a whitespace word collects the words of its tokens.

Voices: ``kal`` (8 kHz diphone), ``kal16`` (16 kHz diphone), and the CMU ARCTIC clustergen voices
``awb``, ``rms``, ``slt`` (reserved speakers), plus ``awb_time``, a limited-domain voice that can only
say clock times (reserved too). ``rate_wpm`` scales the voice's ``duration_stretch`` by 175/rate;
``pitch`` scales ``int_f0_target_mean`` (the diphone voices' F0 target: 95 Hz for kal/kal16) by
2**((pitch-50)/50 * 6/12), i.e. +-6 semitones at 0/100; the clustergen voices have no F0 target to
scale, so ``pitch`` does not change them.

Flite's C code calls ``exit()`` on internal errors (it has no error return); none is known to be
reachable from text input. One call at a time per process (the library has global state);
Flite's synthesis is deterministic.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache, lru_cache

import numpy as np

from speechlm.data.tts._common import (
    Synthesis,
    SynthesisError,
    duration_factor,
    finish_tokens,
    pitch_factor,
)

INSTALL_HINT = "install Flite: apt-get install flite"

#: voice name -> (shared library, register function)
VOICE_LIBS = {
    "kal": ("libflite_cmu_us_kal.so.1", "register_cmu_us_kal"),
    "kal16": ("libflite_cmu_us_kal16.so.1", "register_cmu_us_kal16"),
    "awb": ("libflite_cmu_us_awb.so.1", "register_cmu_us_awb"),
    "rms": ("libflite_cmu_us_rms.so.1", "register_cmu_us_rms"),
    "slt": ("libflite_cmu_us_slt.so.1", "register_cmu_us_slt"),
    "awb_time": ("libflite_cmu_time_awb.so.1", "register_cmu_time_awb"),
}

_vp = ctypes.c_void_p


class _Wave(ctypes.Structure):  # cst_wave (cst_wave.h)
    _fields_ = [("type", ctypes.c_char_p), ("sample_rate", ctypes.c_int), ("num_samples", ctypes.c_int),
                ("num_channels", ctypes.c_int), ("samples", ctypes.POINTER(ctypes.c_short))]


class _Voice(ctypes.Structure):  # the head of cst_voice (cst_voice.h)
    _fields_ = [("name", ctypes.c_char_p), ("features", _vp), ("ffunctions", _vp)]


_SIGNATURES = {
    "flite_init": (ctypes.c_int, []),
    "flite_synth_text": (_vp, [ctypes.c_char_p, _vp]),
    "utt_wave": (ctypes.POINTER(_Wave), [_vp]),
    "utt_relation": (_vp, [_vp, ctypes.c_char_p]),
    "relation_head": (_vp, [_vp]),
    "item_next": (_vp, [_vp]),
    "item_daughter": (_vp, [_vp]),
    "item_as": (_vp, [_vp, ctypes.c_char_p]),
    "ffeature_string": (ctypes.c_char_p, [_vp, ctypes.c_char_p]),
    "ffeature_float": (ctypes.c_float, [_vp, ctypes.c_char_p]),
    "delete_utterance": (None, [_vp]),
    "feat_set_float": (None, [_vp, ctypes.c_char_p, ctypes.c_float]),
    "feat_present": (ctypes.c_int, [_vp, ctypes.c_char_p]),
    "get_param_float": (ctypes.c_float, [_vp, ctypes.c_char_p, ctypes.c_float]),
}

_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libflite.so.1")
    except OSError:
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    lib.flite_init()
    return lib


@cache
def _voice_lib(name: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(VOICE_LIBS[name][0])
    except OSError:
        return None


def available() -> bool:
    return _library() is not None and bool(list_voices())


@lru_cache(maxsize=1)
def list_voices() -> list[str]:
    """Flite voices whose library is installed (the binary's ``flite -lv`` on Debian)."""
    if _library() is None:
        return []
    return [v for v in VOICE_LIBS if _voice_lib(v) is not None]


class _LoadedVoice:
    def __init__(self, name: str):
        lib, vlib = _library(), _voice_lib(name)
        register = getattr(vlib, VOICE_LIBS[name][1])
        register.restype, register.argtypes = _vp, [_vp]
        self.ptr = register(None)
        if not self.ptr:
            raise SynthesisError(f"Flite could not load voice {name!r}")
        self.features = _Voice.from_address(self.ptr).features
        self.stretch = float(lib.get_param_float(self.features, b"duration_stretch", 1.0))
        self.f0_mean = (float(lib.get_param_float(self.features, b"int_f0_target_mean", 100.0))
                        if lib.feat_present(self.features, b"int_f0_target_mean") else None)


_VOICES: dict[str, _LoadedVoice] = {}


def _run(text: str, name: str, rate_wpm: int, pitch: int
         ) -> tuple[np.ndarray, int, list[tuple[str, list[tuple[float, float] | None]]]]:
    """(int16 samples, Hz, [(token name, [(start_s, end_s) or None per word])]) under ``_LOCK``."""
    lib = _library()
    if name not in _VOICES:
        _VOICES[name] = _LoadedVoice(name)
    voice = _VOICES[name]
    # Set both every time (they live on the voice), so no call depends on the one before.
    lib.feat_set_float(voice.features, b"duration_stretch", voice.stretch * duration_factor(rate_wpm))
    if voice.f0_mean is not None:
        lib.feat_set_float(voice.features, b"int_f0_target_mean", voice.f0_mean * pitch_factor(pitch))
    utt = lib.flite_synth_text(text.encode("utf-8"), voice.ptr)
    if not utt:
        raise SynthesisError(f"Flite ({name}) failed to synthesize {text[:80]!r}")
    try:
        wave = lib.utt_wave(utt)
        if not wave:
            raise SynthesisError(f"Flite ({name}) produced no audio for {text[:80]!r}")
        w = wave.contents
        if w.num_channels != 1:
            raise SynthesisError(f"Flite ({name}) produced {w.num_channels} channels")
        samples = (np.ctypeslib.as_array(w.samples, shape=(w.num_samples,)).copy()
                   if w.num_samples > 0 else np.zeros(0, np.int16))
        hz = int(w.sample_rate)
        tokens = []
        relation = lib.utt_relation(utt, b"Token")
        tok = lib.relation_head(relation) if relation else None
        while tok:
            tok_name = (lib.ffeature_string(tok, b"name") or b"").decode("utf-8", "replace")
            times: list[tuple[float, float] | None] = []
            word = lib.item_daughter(tok)
            while word:
                syl = lib.item_as(word, b"SylStructure")
                span = None
                if syl and lib.item_daughter(syl):
                    start = float(lib.ffeature_float(syl, b"daughter1.daughter1.R:Segment.p.end"))
                    end = float(lib.ffeature_float(syl, b"daughtern.daughtern.R:Segment.end"))
                    if end > start:
                        span = (start, end)
                times.append(span)
                word = lib.item_next(word)
            tokens.append((tok_name, times))
            tok = lib.item_next(tok)
    finally:
        lib.delete_utterance(utt)
    return samples, hz, tokens


def synthesize(text: str, name: str, rate_wpm: int, pitch: int, sample_rate: int, seed: int) -> Synthesis:
    del seed  # Flite has no randomness
    if _library() is None:
        raise SynthesisError(f"Flite is not installed; {INSTALL_HINT}")
    if name not in VOICE_LIBS or _voice_lib(name) is None:
        raise SynthesisError(f"unknown Flite voice {name!r}; installed: {', '.join(list_voices())}")
    text = " ".join(text.split())
    with _LOCK:
        samples, hz, tokens = _run(text, name, rate_wpm, pitch)
    if len(samples) == 0:
        raise SynthesisError(f"Flite ({name}) produced no audio for {text[:80]!r}")
    return finish_tokens(samples.astype(np.float32) / 32768.0, hz, text, tokens, sample_rate, "flite", name)
