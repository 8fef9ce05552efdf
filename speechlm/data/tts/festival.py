"""The ``festival`` engine: the Festival Speech Synthesis System (Debian ``festival`` + voice packages).

Each call runs ``festival --batch`` on a Scheme script (in a temporary folder) that selects the voice,
synthesizes the text as one utterance, saves the wave and prints the Token relation: every token
(Festival's whitespace tokens, punctuation split off into features) with its Word items and, for
each word that has syllables, the end of the segment before its first segment and the end of its
last segment. So the timings are Festival's own segment boundaries. Festival's tokenizer expands
tokens into several words ("1995" -> nineteen ninety five, "$5" -> five dollars, "Tom's" -> Tom 's)
and turns punctuation into silent words; each whitespace word of the text collects the spoken
words of the tokens found in it.

Voices (``list_voices()`` lists the installed ones): ``kal_diphone`` (``festvox-kallpc16k``),
``ked_diphone`` (``festvox-kdlpc16k``), and the HTS voice ``us-slt-hts`` (``festvox-us-slt-hts``,
``voice_cmu_us_slt_arctic_hts``, 32 kHz, a reserved speaker); any voice folder's own name is
accepted too. ``rate_wpm`` scales the voice's ``Duration_Stretch`` by 175/rate (the HTS voices
ignore that parameter: for them hts_engine's speed ``-r`` is set to rate/175). ``pitch`` scales
the target F0 mean of the diphone voices' linear-regression intonation (``int_lr_params``
``target_f0_mean``, 105 Hz for kal) by 2**((pitch-50)/50 * 6/12), i.e. +-6 semitones at 0/100; the
HTS voices have no such simple control (hts_engine's ``-fm`` has no effect there), so ``pitch``
does not change them. Festival is deterministic; calls are independent processes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import wave as wavefile
from functools import lru_cache
from pathlib import Path

import numpy as np

from speechlm.data.tts._common import (
    Synthesis,
    SynthesisError,
    duration_factor,
    finish,
    pitch_factor,
    tokens_to_words,
    word_spans,
)

INSTALL_HINT = "install Festival and a voice: apt-get install festival festvox-kallpc16k"
VOICE_ROOTS = (Path("/usr/share/festival/voices"), Path("/usr/local/share/festival/voices"))
TIMEOUT_S = 300


def _short_name(folder: str) -> str:
    m = re.fullmatch(r"cmu_([a-z]+)_([a-z0-9]+)_arctic_hts", folder)
    return f"{m.group(1)}-{m.group(2)}-hts" if m else folder


@lru_cache(maxsize=1)
def _voice_folders() -> dict[str, str]:
    """Short voice name -> Festival's voice folder name (``voice_<folder>`` selects it)."""
    found: dict[str, str] = {}
    for root in VOICE_ROOTS:
        if root.is_dir():
            for scm in sorted(root.glob("*/*/festvox/*.scm")):
                folder = scm.parent.parent.name
                if scm.stem == folder:
                    found.setdefault(_short_name(folder), folder)
    return found


def list_voices() -> list[str]:
    return sorted(_voice_folders()) if shutil.which("festival") else []


def available() -> bool:
    return bool(list_voices())


def _resolve(name: str) -> str:
    folders = _voice_folders()
    if name in folders:
        return folders[name]
    if name in folders.values():
        return name
    raise SynthesisError(f"unknown Festival voice {name!r}; installed: {', '.join(list_voices()) or 'none'}")


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _script(text: str, folder: str, rate_wpm: int, pitch: int, wav: Path) -> str:
    stretch = duration_factor(rate_wpm)
    lines = [
        f"(voice_{folder})",
        f"(Parameter.set 'Duration_Stretch (* (Parameter.get 'Duration_Stretch) {stretch:.6f}))",
        "(if (and (boundp 'int_lr_params) (assoc 'target_f0_mean int_lr_params))",
        ("    (set! int_lr_params (cons (list 'target_f0_mean (* (car (cdr (assoc 'target_f0_mean "
         f"int_lr_params))) {pitch_factor(pitch):.6f})) int_lr_params)))"),
    ]
    if folder.endswith("_hts"):
        lines.append(f"(set! hts_engine_params (append hts_engine_params (list (list \"-r\" {1 / stretch:.6f}))))")
    lines += [
        f"(set! speechlm_utt (Utterance Text {_scheme_string(text)}))",
        "(utt.synth speechlm_utt)",
        f"(utt.save.wave speechlm_utt {_scheme_string(str(wav))} 'riff)",
        "(define (speechlm_word w)",
        "  (if (> (length (item.relation.daughters w 'SylStructure)) 0)",
        "      (format t \"W\\t%f\\t%f\\n\"",
        "              (item.feat w \"R:SylStructure.daughter1.daughter1.R:Segment.p.end\")",
        "              (item.feat w \"R:SylStructure.daughtern.daughtern.R:Segment.end\"))",
        "      (format t \"W\\t-\\n\")))",
        "(define (speechlm_tokens tok)",
        "  (if tok (begin (format t \"T\\t%s\\n\" (item.name tok))",
        "                 (mapcar speechlm_word (item.daughters tok))",
        "                 (speechlm_tokens (item.next tok)))))",
        "(speechlm_tokens (utt.relation.first speechlm_utt 'Token))",
        "(format t \"SPEECHLM-END\\n\")",
    ]
    return "\n".join(lines) + "\n"


def parse_tokens(stdout: str) -> list[tuple[str, list[tuple[float, float] | None]]]:
    tokens: list[tuple[str, list[tuple[float, float] | None]]] = []
    for line in stdout.splitlines():
        if line.startswith("T\t"):
            tokens.append((line[2:], []))
        elif line.startswith("W\t") and tokens:
            parts = line.split("\t")
            span = None
            if len(parts) == 3:
                start, end = float(parts[1]), float(parts[2])
                span = (start, end) if end > start else None
            tokens[-1][1].append(span)
    return tokens


def word_times(text: str, tokens: list[tuple[str, list[tuple[float, float] | None]]]
               ) -> list[tuple[float, float] | None]:
    """(start_s, end_s) per whitespace word of ``text`` (None if Festival spoke nothing for it)."""
    owners = tokens_to_words(text, [t for t, _ in tokens])
    per_word: list[list[tuple[float, float]]] = [[] for _ in word_spans(text)]
    for owner, (_, spans) in zip(owners, tokens):
        per_word[owner].extend(s for s in spans if s is not None)
    return [(min(s for s, _ in p), max(e for _, e in p)) if p else None for p in per_word]


def synthesize(text: str, name: str, rate_wpm: int, pitch: int, sample_rate: int, seed: int) -> Synthesis:
    del seed  # Festival has no randomness
    exe = shutil.which("festival")
    if exe is None:
        raise SynthesisError(f"Festival is not installed; {INSTALL_HINT}")
    folder = _resolve(name)
    text = " ".join(text.split())
    with tempfile.TemporaryDirectory(prefix="speechlm-festival-") as tmp:
        wav, script = Path(tmp) / "out.wav", Path(tmp) / "synth.scm"
        script.write_text(_script(text, folder, rate_wpm, pitch, wav), encoding="utf-8")
        try:
            proc = subprocess.run([exe, "--batch", str(script)], check=False, capture_output=True, cwd=tmp,
                                  timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise SynthesisError(f"Festival ({name}) took over {TIMEOUT_S} s for {text[:80]!r}") from None
        stdout = proc.stdout.decode("utf-8", "replace")
        stderr = proc.stderr.decode("utf-8", "replace").strip()
        if proc.returncode != 0 or "SPEECHLM-END" not in stdout or not wav.is_file():
            raise SynthesisError(f"Festival ({name}) failed (exit {proc.returncode}) for {text[:80]!r}: "
                                 f"{(stderr or stdout)[-2000:]}")
        with wavefile.open(str(wav), "rb") as f:
            hz, channels, width = f.getframerate(), f.getnchannels(), f.getsampwidth()
            raw = f.readframes(f.getnframes())
    if width != 2:
        raise SynthesisError(f"Festival ({name}) wrote {8 * width}-bit audio, expected 16-bit")
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    if len(samples) == 0:
        raise SynthesisError(f"Festival ({name}) produced no audio for {text[:80]!r}")
    times = word_times(text, parse_tokens(stdout))
    return finish(samples, hz, text, times, sample_rate, "festival", f"festival:{name}")
