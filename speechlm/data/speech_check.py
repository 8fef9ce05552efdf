"""Is there enough speech in a clip for its transcript? The import and corpus gate built on the voice-activity
detector (:mod:`speechlm.data.vad`).

A clip is **implausible** when the detector finds no speech in it, or less than :data:`MIN_SPEECH_S_PER_WORD`
seconds of speech per word of its transcript. That floor is 0.05 s per word, i.e. 20 words per second: about
three times the fastest sustained human speech (auctioneers and speed-talkers reach 6-7 words per second;
read speech is 2.5-3) and 3.5 times below the fewest seconds per word of any clip of the tiny corpus (0.18 s
per word over its test, valid and 600 train clips). A clip under it is silence, noise, a truncated file or
the wrong transcript, never fast speech. The detected speech counts the detector's padded regions
(:attr:`VoiceActivityResult.speech_s`).

    flagged = check_rows(rows)                       # [(row, why), ...] for the rows that fail
    rows = gate_rows(rows, skip_bad=True, bad_rows=bad)   # without them, each named in bad_rows and the log

The importers (``check_speech=True``) and the corpus builder run the gate; :func:`gate_rows` reuses their
``skip_bad`` / ``bad_rows`` convention: without ``skip_bad`` a flagged clip stops the import with a
:class:`ManifestError` that names every flagged clip; with it they are left out and listed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from speechlm.data.manifest import Utterance
from speechlm.data.vad import VoiceActivity
from speechlm.errors import AudioError, ManifestError

log = logging.getLogger(__name__)

#: Least detected speech per transcript word (seconds) a clip must have: 20 words/s, ~3x the fastest speech.
MIN_SPEECH_S_PER_WORD = 0.05
#: How many flagged clips an error message lists before "... and N more".
LISTED = 20


def speech_problem(speech_s: float, text: str, min_s_per_word: float = MIN_SPEECH_S_PER_WORD) -> str | None:
    """Why ``speech_s`` seconds of detected speech cannot hold ``text`` (None: they can)."""
    words = len(text.split())
    if speech_s <= 0:
        return f"no speech detected for a {words}-word transcript"
    if words and speech_s < min_s_per_word * words:
        return (f"{speech_s:.2f} s of speech detected for a {words}-word transcript (less than "
                f"{min_s_per_word} s per word)")
    return None


def check_clip(wave: Any, sample_rate: int, text: str, vad: VoiceActivity | None = None,
               min_s_per_word: float = MIN_SPEECH_S_PER_WORD) -> str | None:
    """Why a 1-D clip cannot be ``text`` spoken (no or too little speech), or None when it can."""
    found = (vad or VoiceActivity()).detect(wave, sample_rate)
    return speech_problem(found.speech_s, text, min_s_per_word)


def _check_row(row: Utterance, vad: VoiceActivity, min_s_per_word: float) -> str | None:
    from speechlm.data.audio import load_audio
    from speechlm.data.vad import VAD_SAMPLE_RATE

    try:
        wave = load_audio(row.audio_path, VAD_SAMPLE_RATE)
    except AudioError as e:
        return str(e)
    return check_clip(wave, VAD_SAMPLE_RATE, row.text, vad, min_s_per_word)


def check_rows(rows: Sequence[Utterance], vad: VoiceActivity | None = None, workers: int = 1,
               min_s_per_word: float = MIN_SPEECH_S_PER_WORD, progress: bool = False
               ) -> list[tuple[Utterance, str]]:
    """``(row, why)`` for each row whose audio holds no or too little speech for its text (an unreadable
    file is flagged with its error), in the rows' order. ``workers`` threads share the one detector."""
    from tqdm import tqdm

    vad = vad or VoiceActivity()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        found = list(tqdm(pool.map(lambda r: _check_row(r, vad, min_s_per_word), rows), total=len(rows),
                          desc="speech check", unit="clip", disable=not progress))
    return [(row, why) for row, why in zip(rows, found, strict=True) if why is not None]


def describe(row: Utterance, why: str) -> str:
    return f"{row.id} ({row.audio_path}): {why}"


def gate_rows(rows: Sequence[Utterance], skip_bad: bool = False, bad_rows: list[str] | None = None,
              vad: VoiceActivity | None = None, workers: int = 1, progress: bool = False) -> list[Utterance]:
    """The rows that pass :func:`check_rows`. Flagged rows: with ``skip_bad`` each is logged, appended to
    ``bad_rows`` (when given) and left out; without it a :class:`ManifestError` names them all."""
    flagged = check_rows(rows, vad, workers, progress=progress)
    if not flagged:
        return list(rows)
    lines = [describe(row, why) for row, why in flagged]
    if not skip_bad:
        more = f"\n  ... and {len(lines) - LISTED} more" if len(lines) > LISTED else ""
        raise ManifestError(f"{len(lines)} clip(s) with no or too little speech for their transcript "
                            "(skip_bad / --skip-bad leaves them out):\n  " + "\n  ".join(lines[:LISTED]) + more)
    for line in lines:
        log.warning("skipping: %s", line)
    if bad_rows is not None:
        bad_rows.extend(lines)
    dropped = {id(row) for row, _ in flagged}
    return [r for r in rows if id(r) not in dropped]


def check_manifest(path: str | Path, workers: int = 1, progress: bool = True) -> tuple[int, list[str]]:
    """(rows checked, one line per flagged clip) of a manifest (tools/check_speech.py)."""
    from speechlm.data.manifest import read_manifest

    rows = read_manifest(path)
    return len(rows), [describe(r, why) for r, why in check_rows(rows, workers=workers, progress=progress)]
