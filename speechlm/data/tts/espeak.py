"""The ``espeak`` engine: eSpeak NG (via ``espeakng_loader``), with reference word timings.

eSpeak's WORD events do not cover every word: it merges short function words into the preceding
word group ("of the" -> one event). Word timings are therefore derived from PHONEME events
(each carries the text position of its word group and its audio time): every whitespace word is
mapped to the group that contains its first character, and a group holding several words is split
between them by aligning (edit distance) the group's phonemes with each word's own phonemes (the
word synthesized alone): "of the" = V v | D I. A word spans from its first phoneme's start to
its last phoneme's end; pauses ("_" phonemes) belong to no word. ``tests/test_tts.py`` checks a
merged boundary against eSpeak's own phoneme event.

Audio is trimmed/padded so that it starts ``LEAD_S`` before the first phoneme and ends ``TAIL_S``
after the last word, whatever eSpeak's own leading/trailing silence was.
"""

from __future__ import annotations

import _ctypes
import ctypes
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from speechlm.data.audio import resample
from speechlm.data.manifest import WordTiming
from speechlm.data.tts._common import LEAD_S, TAIL_S, Synthesis, SynthesisError, check_args

# speak_lib.h (eSpeak NG 1.52) constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
_PARAM_RATE = 1
_PARAM_PITCH = 3
_EE_OK = 0
_RAND_SEED = 0


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """``espeak_EVENT`` of speak_lib.h: 40 bytes on 64-bit (pointer-aligned user_data and id)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character offset of the word group
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms from the start of the output
        ("sample", ctypes.c_int),  # sample index at the engine's rate
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))


@dataclass
class _Phoneme:
    text_position: int  # 1-based char offset of its word group
    time_s: float
    name: str

    @property
    def is_pause(self) -> bool:
        return self.name.startswith("_")


class _Engine:
    """A freshly loaded and initialised libespeak-ng; use under ``_LOCK`` and :meth:`close` after.

    eSpeak's wave generator keeps static state between utterances (even across
    espeak_Terminate/espeak_Initialize): the same text came out a few samples longer or shorter
    depending on what was spoken before. Loading the library afresh for every utterance
    (dlopen after dlclose resets its statics, ~15 ms) makes the output depend only on the inputs.
    """

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.restype = ctypes.c_int
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.restype = ctypes.c_int
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_ng_SetRandSeed.restype = None
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib.espeak_Synth.restype = ctypes.c_int
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        # espeak_Initialize wants the folder that *contains* espeak-ng-data.
        data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self.engine_hz = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent,
                                                    _INITIALIZE_PHONEME_EVENTS)
        if self.engine_hz <= 0:
            raise SynthesisError(f"espeak_Initialize failed with data at {data_parent.decode()}")
        self._chunks: list[np.ndarray] = []
        self._phonemes: list[_Phoneme] = []
        self._word_positions: list[int] = []
        self._callback = _CALLBACK(self._on_audio)  # kept referenced: C holds a raw pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self._voice: bytes | None = None

    def close(self) -> None:
        self.lib.espeak_Terminate()
        _ctypes.dlclose(self.lib._handle)

    def _on_audio(self, wav, n_samples: int, events) -> int:
        if wav and n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                name = ev.id.string.decode("utf-8", "replace")
                self._phonemes.append(_Phoneme(ev.text_position, ev.audio_position / 1000.0, name))
            elif ev.type == _EVENT_WORD:
                self._word_positions.append(ev.text_position)
            i += 1
        return 0

    def run(self, text: str, voice: str, rate_wpm: int, pitch: int
            ) -> tuple[np.ndarray, list[_Phoneme], list[int]]:
        """Synthesize ``text``; returns (int16 samples at engine_hz, phoneme events, WORD positions)."""
        name = voice.encode()
        variant = voice.partition("+")[2]
        # eSpeak silently ignores an unknown "+variant"; refuse it instead.
        if variant and variant not in list_english_voices(variants=True):
            raise SynthesisError(f"unknown eSpeak voice variant {variant!r} in {voice!r}")
        if name != self._voice:
            if self.lib.espeak_SetVoiceByName(name) != _EE_OK:
                self._voice = None
                raise SynthesisError(f"unknown eSpeak voice {voice!r}; English accents: "
                                     f"{', '.join(list_english_voices())} (+ a variant, e.g. en-us+m3)")
            self._voice = name
        # Set after the voice: selecting a voice resets rate and pitch.
        self.lib.espeak_SetParameter(_PARAM_RATE, int(rate_wpm), 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self._chunks, self._phonemes, self._word_positions = [], [], []
        # Noise sources (fricatives, aspiration) draw from libc's rand(), whose state other
        # utterances advance; reseed so each utterance's noise depends on nothing else.
        self.lib.espeak_ng_SetRandSeed(_RAND_SEED)
        # The Klatt voices (variants such as +caleb) draw their noise from libc's rand() itself: reseed it too,
        # else the same utterance came out different depending on what the process had spoken before (and so
        # on which worker of the corpus builder it landed on).
        _LIBC.srand(_RAND_SEED)
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, _CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise SynthesisError(f"espeak_Synth failed (error {err}) for text {text[:80]!r}")
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return samples, self._phonemes, self._word_positions


#: The C library of this process (its rand() is the one the Klatt voices draw from).
_LIBC = ctypes.CDLL(None)
_LIBC.srand.restype = None
_LIBC.srand.argtypes = [ctypes.c_uint]

# One library instance at a time per process: the C library is global state.
_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def list_english_voices(variants: bool = False) -> list[str]:
    """eSpeak English accents (``en-us``, ``en-gb-x-rp``, ...); with ``variants`` also ``+m3``-style names."""
    import espeakng_loader

    data = Path(espeakng_loader.get_data_path())
    accents = sorted(p.name.lower() for p in (data / "lang" / "gmw").glob("en*")
                     if p.name.lower() != "en-shaw")  # Shavian alphabet: not Latin-script text
    if not variants:
        return accents
    return sorted(  # variant files are voice-independent: append as "en-us+m3"
p.name for p in (data / "voices" / "!v").iterdir() if p.is_file())


def _word_spans(text: str) -> list[tuple[str, int, int]]:
    """Whitespace words with their 1-based [start, end] character positions."""
    spans, pos = [], 0
    for word in text.split():
        start = text.index(word, pos)
        spans.append((word, start + 1, start + len(word)))
        pos = start + len(word)
    return spans


_ALONE: dict[tuple[str, str, int, int], list[str]] = {}


def _bare(name: str) -> str:
    """Phoneme name without stress marks or variant suffixes ("'a2" -> "a", "a#" -> "a"), for matching.

    A name that is only a digit is a phoneme of its own ("0", the LOT vowel) and stays.
    """
    name = name.lstrip("',%=")
    stripped = name.rstrip("0123456789#")
    return stripped or name


def _phonemes_alone(engine: _Engine, word: str, voice: str, rate_wpm: int, pitch: int) -> list[str]:
    """Bare names of the phonemes eSpeak speaks for ``word`` on its own; cached."""
    key = (word, voice, rate_wpm, pitch)
    if key not in _ALONE:
        _, phonemes, _ = engine.run(word, voice, rate_wpm, pitch)
        _ALONE[key] = [_bare(p.name) for p in phonemes if not p.is_pause]
    return _ALONE[key]


def _split_group(names: list[str], alone: list[list[str]]) -> list[int]:
    """Index of the first phoneme of each word in a merged word group.

    ``names``: the group's phonemes as spoken; ``alone``: each word's phonemes spoken alone.
    Context changes a few phonemes ("of" V v -> @ v, "have" loses its h, "the" D@ -> DI), so the
    two sequences are aligned by edit distance; each word starts at its first aligned phoneme.
    """
    ref = [n for seq in alone for n in seq]
    label = [k for k, seq in enumerate(alone) for _ in seq]
    n, m = len(names), len(ref)
    cost = np.zeros((n + 1, m + 1))
    cost[:, 0], cost[0, :] = np.arange(n + 1), np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            sub = cost[i - 1, j - 1] + (0 if names[i - 1] == ref[j - 1] else 1)
            cost[i, j] = min(sub, cost[i - 1, j] + 1, cost[i, j - 1] + 1)
    owner: list[int | None] = [None] * n
    i, j = n, m
    # Backtrack; on ties prefer a match, then an inserted phoneme (which joins the word before it,
    # like a linking "r-"), then a substitution.
    while i > 0 and j > 0:
        if names[i - 1] == ref[j - 1] and cost[i, j] == cost[i - 1, j - 1]:
            owner[i - 1] = label[j - 1]
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i - 1, j] + 1:
            i -= 1
        elif cost[i, j] == cost[i - 1, j - 1] + 1:
            owner[i - 1] = label[j - 1]
            i, j = i - 1, j - 1
        else:
            j -= 1
    # An inserted phoneme (e.g. a linking ";") belongs to the word before it.
    prev = 0
    for i in range(n):
        prev = owner[i] = prev if owner[i] is None else owner[i]
    n_words = len(alone)
    cuts = [0]
    for k in range(1, n_words):
        first = next((i for i in range(n) if owner[i] >= k), n)
        # Every word keeps at least one phoneme.
        cuts.append(min(max(first, cuts[-1] + 1), n - (n_words - k)))
    return cuts


def _word_times(engine: _Engine, text: str, phonemes: list[_Phoneme], duration_s: float, voice: str, rate_wpm: int,
                pitch: int) -> list[tuple[float, float]]:
    """(start_s, end_s) per whitespace word, in engine time, from the phoneme events."""
    spans = _word_spans(text)
    # Each phoneme's end is the next event's start (pauses included), the last one ends the audio.
    ends = [p.time_s for p in phonemes[1:]] + [duration_s]
    # Each spoken phoneme belongs to the word containing its group's first character; a word eSpeak
    # split into several groups ("1995" -> "nineteen ninety-five") collects all of them.
    word_starts = [start for _, start, _ in spans]
    per_word: list[list[tuple[float, float, str]]] = [[] for _ in spans]  # (start_s, end_s, name)
    for p, end in zip(phonemes, ends):
        if not p.is_pause and end > p.time_s:
            w = max(0, int(np.searchsorted(word_starts, p.text_position, side="right")) - 1)
            per_word[w].append((p.time_s, end, p.name))
    if not any(per_word):
        raise SynthesisError(f"eSpeak produced no speech for {text[:80]!r}")
    # Clusters: a word with phonemes plus the following words without (merged into its group);
    # words before the first spoken one join the first cluster.
    clusters: list[list[int]] = []
    for i, ph in enumerate(per_word):
        if ph or not clusters:
            clusters.append([i])
        else:
            clusters[-1].append(i)
    if not per_word[clusters[0][0]]:
        clusters[1] = clusters[0] + clusters[1]
        clusters.pop(0)
    times: list[tuple[float, float]] = [(0.0, 0.0)] * len(spans)
    for word_ids in clusters:
        members = sorted(m for i in word_ids for m in per_word[i])
        if len(word_ids) == 1:
            times[word_ids[0]] = (members[0][0], members[-1][1])
            continue
        n = len(members)
        if n >= len(word_ids):
            alone = [_phonemes_alone(engine, spans[i][0], voice, rate_wpm, pitch) for i in word_ids]
            cuts = _split_group([_bare(name) for _, _, name in members], alone) + [n]
            for k, i in enumerate(word_ids):
                seg = members[cuts[k]:cuts[k + 1]]
                times[i] = (seg[0][0], seg[-1][1])
        else:
            # Fewer phonemes than words (rare): split the group's span by character counts.
            t0, t1 = members[0][0], members[-1][1]
            chars = [len(spans[i][0]) for i in word_ids]
            cum = np.concatenate([[0], np.cumsum(chars)]) / sum(chars)
            for k, i in enumerate(word_ids):
                times[i] = (float(t0 + (t1 - t0) * cum[k]), float(t0 + (t1 - t0) * cum[k + 1]))
    return times


def synthesize(text: str, voice: str = "en-us", rate_wpm: int = 175, pitch: int = 50,
               sample_rate: int = 16000, seed: int = 0) -> Synthesis:
    """Speak ``text`` with eSpeak NG; returns the waveform and one timing per whitespace word.

    Deterministic: the same arguments give the same samples in any process and after any other
    call (the library is loaded afresh for each call). ``seed`` does not change the audio; it is
    kept for callers that draw rate/pitch jitter per seed. Raises :class:`SynthesisError` for empty
    text, an unknown voice or variant, or rate/pitch out of eSpeak's range. Thread-safe (one call
    at a time per process); processes are independent.
    """
    del seed
    check_args(text, rate_wpm, pitch)
    with _LOCK:
        engine = _Engine()
        try:
            samples, phonemes, _ = engine.run(text, voice, rate_wpm, pitch)
            hz = engine.engine_hz
            duration_s = len(samples) / hz
            times = _word_times(engine, text, phonemes, duration_s, voice, rate_wpm, pitch)
        finally:
            engine.close()
    # Same silence margins for every clip: cut eSpeak's own margins, then pad with zeros.
    first_s, last_s = times[0][0], times[-1][1]
    lo, hi = round(first_s * hz), min(len(samples), round(last_s * hz))
    lead, tail = round(LEAD_S * hz), round(TAIL_S * hz)
    start = max(0, lo - lead)
    core = samples[start:min(len(samples), hi + tail)].astype(np.float32) / 32768.0
    pad_front = lead - (lo - start)
    pad_back = max(0, (hi + tail) - min(len(samples), hi + tail))
    audio = np.concatenate([np.zeros(pad_front, np.float32), core, np.zeros(pad_back, np.float32)])
    shift_s = pad_front / hz - start / hz
    wave = resample(torch.from_numpy(audio), hz, sample_rate).contiguous()
    total_s = wave.numel() / sample_rate
    words = []
    for (word, _, _), (t0, t1) in zip(_word_spans(text), times):
        s, e = t0 + shift_s, t1 + shift_s
        words.append(WordTiming(word, round(max(0.0, float(s)), 4), round(min(total_s, float(e)), 4)))
    return Synthesis(wave=wave, sample_rate=sample_rate, words=words, engine="espeak", voice=f"espeak:{voice}")
