"""The ``festival`` engine: the Festival Speech Synthesis System (Debian ``festival`` + voice packages).

Each Python process keeps one long-lived ``festival --pipe`` process (started on first use, for all
voices; ended at interpreter exit, or with ``close()``) and sends it one job per call: a Scheme
expression that restores the state a job changes (``Duration_Stretch``, ``int_lr_params``,
``hts_engine_params``, as saved when the process started), selects the voice, synthesizes the text
as one utterance, saves the wave and prints the Token relation, followed by a marker unique to the
job that the caller waits for. So every call gives the same samples and timings as a fresh
``festival --batch`` process on the same script (``synthesize(..., persistent=False)`` runs one),
without paying Festival's start-up on every call. A process that crashes (Festival segfaults on
punctuation-only text such as "...") is restarted once and the job retried; a second failure is a
``SynthesisError`` with Festival's stderr. Threads share the process under a lock; a forked child
starts its own.

The printed Token relation holds every token (Festival's whitespace tokens, punctuation split off
into features) with its Word items and, for each word that has syllables, the end of the segment
before its first segment and the end of its last segment. So the timings are Festival's own segment
boundaries. Festival's tokenizer expands tokens into several words ("1995" -> nineteen ninety five,
"$5" -> five dollars, "Tom's" -> Tom 's) and turns punctuation into silent words; each whitespace
word of the text collects the spoken words of the tokens found in it.

Voices (``list_voices()`` lists the installed ones): ``kal_diphone`` (``festvox-kallpc16k``),
``ked_diphone`` (``festvox-kdlpc16k``), and the HTS voice ``us-slt-hts`` (``festvox-us-slt-hts``,
``voice_cmu_us_slt_arctic_hts``, 32 kHz, a reserved speaker); any voice folder's own name is
accepted too. ``rate_wpm`` scales the voice's ``Duration_Stretch`` by 175/rate (the HTS voices
ignore that parameter: for them hts_engine's speed ``-r`` is set to rate/175). ``pitch`` scales
the target F0 mean of the diphone voices' linear-regression intonation (``int_lr_params``
``target_f0_mean``, 105 Hz for kal) by 2**((pitch-50)/50 * 6/12), i.e. +-6 semitones at 0/100; the
HTS voices have no such simple control (hts_engine's ``-fm`` has no effect there), so ``pitch``
does not change them. Festival is deterministic.
"""

from __future__ import annotations

import atexit
import io
import os
import re
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import wave as wavefile
from functools import lru_cache
from pathlib import Path

import numpy as np

from speechlm.data.tts._common import (
    Synthesis,
    SynthesisError,
    duration_factor,
    finish_tokens,
    pitch_factor,
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


def _job_lines(text: str, folder: str, rate_wpm: int, pitch: int, wav: Path) -> list[str]:
    """The Scheme that selects the voice, sets rate and pitch, synthesizes ``text`` and saves ``wav``."""
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
    ]
    return lines


#: Helpers that print the Token relation (defined once per Festival process).
_DEFINES = [
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
]
_PRINT = [
    "(speechlm_tokens (utt.relation.first speechlm_utt 'Token))",
    "(format t \"SPEECHLM-END\\n\")",
]


def _script(text: str, folder: str, rate_wpm: int, pitch: int, wav: Path) -> str:
    """The whole script of a one-shot ``festival --batch`` run."""
    return "\n".join(_job_lines(text, folder, rate_wpm, pitch, wav) + _DEFINES + _PRINT) + "\n"


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


#: Festival's state that a job changes (rate, pitch, HTS speed), saved when the process starts and
#: restored before every job, so no job sees what an earlier one set (a fresh process would not).
_SAVE_STATE = [
    "(define speechlm_stretch0 (Parameter.get 'Duration_Stretch))",
    "(define speechlm_lr0_set (boundp 'int_lr_params))",
    "(define speechlm_lr0 (if speechlm_lr0_set int_lr_params nil))",
    "(define speechlm_hts0_set (boundp 'hts_engine_params))",
    "(define speechlm_hts0 (if speechlm_hts0_set hts_engine_params nil))",
]
_RESTORE_STATE = [
    "(Parameter.set 'Duration_Stretch speechlm_stretch0)",
    "(if speechlm_lr0_set (set! int_lr_params speechlm_lr0))",
    "(if speechlm_hts0_set (set! hts_engine_params speechlm_hts0))",
]


class _Died(Exception):
    """The Festival process ended (crashed) during a job."""

    def __init__(self, returncode: int | None, stdout: str, stderr: str):
        super().__init__(returncode)
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


class _Server:
    """One long-lived ``festival --pipe`` process that runs one job (one utterance) at a time.

    A job is one ``(begin ...)`` expression (restore the saved state, select the voice, set rate and
    pitch, synthesize, save the wave, print the tokens, print SPEECHLM-END), followed by a line
    that prints a marker unique to the job and flushes stdout; the answer is what stdout holds
    before the marker. A Scheme error aborts the job's expression (no SPEECHLM-END) but not the
    process; a crash closes stdout. stderr is drained while waiting (Festival writes it unbuffered,
    so the job's messages are in the pipe before the marker arrives).
    """

    def __init__(self, exe: str):
        self.owner = os.getpid()
        self.tag = uuid.uuid4().hex
        self.jobs = 0
        self.wav = Path(tempfile.gettempdir()) / f"speechlm-festival-{self.owner}-{self.tag}.wav"
        self.proc = subprocess.Popen([exe, "--pipe"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
        self._out = b""
        self._err = b""
        try:
            self._send("\n".join(_DEFINES + _SAVE_STATE) + "\n")
        except OSError:
            pass  # it died at once: the first job finds out (and says why)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _send(self, data: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data.encode("utf-8"))
        self.proc.stdin.flush()

    def run(self, job: str, timeout_s: float) -> tuple[str, str]:
        """(stdout, stderr) of ``job``; raises _Died if the process ends, TimeoutError after timeout_s."""
        self.jobs += 1
        marker = f"SPEECHLM-DONE {self.tag} {self.jobs}"
        self._err = b""
        try:
            self._send(f"{job}\n(format t \"{marker}\\n\")\n(fflush nil)\n")
        except (BrokenPipeError, ValueError, OSError):
            self._died()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out_fd, err_fd = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        end = (marker + "\n").encode("utf-8")
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(out_fd, selectors.EVENT_READ)
            sel.register(err_fd, selectors.EVENT_READ)
            while (at := self._out.find(end)) < 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 65536)
                    if key.fd == err_fd:
                        self._err = (self._err + chunk)[-65536:]
                        if not chunk:
                            sel.unregister(err_fd)
                    elif chunk:
                        self._out += chunk
                    else:
                        self._died()
            while err_fd in sel.get_map() and any(key.fd == err_fd for key, _ in sel.select(0)):
                chunk = os.read(err_fd, 65536)  # what stderr still holds
                if not chunk:
                    break
                self._err = (self._err + chunk)[-65536:]
        stdout, self._out = self._out[:at], self._out[at + len(end):]
        return stdout.decode("utf-8", "replace"), self._err.decode("utf-8", "replace")

    def _died(self):
        try:
            returncode = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it closed stdout but lives on: end it
            self.proc.kill()
            returncode = self.proc.wait()
        assert self.proc.stderr is not None
        try:
            self._err += self.proc.stderr.read()
        except (OSError, ValueError):
            pass
        raise _Died(returncode, self._out.decode("utf-8", "replace"), self._err.decode("utf-8", "replace"))

    def close(self) -> None:
        """End the process (EOF on its stdin, then kill) and remove the wave file."""
        if os.getpid() != self.owner:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        self.wav.unlink(missing_ok=True)


_LOCK = threading.Lock()
_SERVER: _Server | None = None  # this Python process's Festival process (all voices)


def _drop() -> None:
    global _SERVER
    server, _SERVER = _SERVER, None
    if server is not None:
        if server.alive():
            server.proc.kill()
        server.close()


def close() -> None:
    """End this process's Festival process (also run at interpreter exit); the next call starts one."""
    with _LOCK:
        _drop()


def _after_fork_in_child() -> None:
    # A forked child must not talk to (or wait for) its parent's Festival process: close its copies
    # of the pipes, so that the parent's EOF still ends it, and start its own when it needs one.
    global _LOCK, _SERVER
    _LOCK = threading.Lock()
    if _SERVER is not None:
        for f in (_SERVER.proc.stdin, _SERVER.proc.stdout, _SERVER.proc.stderr):
            if f is not None:
                try:
                    f.close()  # this process's copy only; stdin was flushed after each job
                except (OSError, ValueError):
                    pass
        _SERVER.proc.returncode = 0  # not this process's child: never wait for it
        _SERVER = None


def _at_exit() -> None:
    got = _LOCK.acquire(timeout=5)  # a thread may still be in a job: end the process anyway
    try:
        _drop()
    finally:
        if got:
            _LOCK.release()


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _failed(name: str, text: str, returncode: int | None, stdout: str, stderr: str) -> SynthesisError:
    exit_ = f" (exit {returncode})" if returncode is not None else ""
    detail = (stderr.strip() or stdout)[-2000:]
    return SynthesisError(f"Festival ({name}) failed{exit_} for {text[:80]!r}: {detail}")


def _run_persistent(exe: str, text: str, name: str, folder: str, rate_wpm: int, pitch: int) -> tuple[str, bytes]:
    """(stdout, wave file bytes) from this process's Festival process; one that crashed (or had
    died) is restarted once and the job retried."""
    global _SERVER
    for attempt in (1, 2):
        if _SERVER is not None and not _SERVER.alive():
            _drop()
        if _SERVER is None:
            try:
                _SERVER = _Server(exe)
            except OSError as e:
                raise SynthesisError(f"cannot start Festival ({exe}): {e}") from None
        server = _SERVER
        server.wav.unlink(missing_ok=True)
        job = "(begin\n" + "\n".join(_RESTORE_STATE + _job_lines(text, folder, rate_wpm, pitch, server.wav)
                                     + _PRINT) + ")"
        try:
            stdout, stderr = server.run(job, TIMEOUT_S)
        except _Died as died:
            _drop()
            if attempt == 1:
                continue
            raise _failed(name, text, died.returncode, died.stdout, died.stderr) from None
        except TimeoutError:
            _drop()
            raise SynthesisError(f"Festival ({name}) took over {TIMEOUT_S} s for {text[:80]!r}") from None
        try:
            if "SPEECHLM-END" not in stdout or not server.wav.is_file():
                _drop()  # a Scheme error left the job half done: start clean next time
                raise _failed(name, text, None, stdout, stderr)
            return stdout, server.wav.read_bytes()
        finally:
            server.wav.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _run_once(exe: str, text: str, name: str, folder: str, rate_wpm: int, pitch: int) -> tuple[str, bytes]:
    """(stdout, wave file bytes) from a fresh ``festival --batch`` process."""
    with tempfile.TemporaryDirectory(prefix="speechlm-festival-") as tmp:
        wav, script = Path(tmp) / "out.wav", Path(tmp) / "synth.scm"
        script.write_text(_script(text, folder, rate_wpm, pitch, wav), encoding="utf-8")
        try:
            proc = subprocess.run([exe, "--batch", str(script)], check=False, capture_output=True, cwd=tmp,
                                  timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise SynthesisError(f"Festival ({name}) took over {TIMEOUT_S} s for {text[:80]!r}") from None
        stdout = proc.stdout.decode("utf-8", "replace")
        stderr = proc.stderr.decode("utf-8", "replace")
        if proc.returncode != 0 or "SPEECHLM-END" not in stdout or not wav.is_file():
            raise _failed(name, text, proc.returncode, stdout, stderr)
        return stdout, wav.read_bytes()


def synthesize(text: str, name: str, rate_wpm: int, pitch: int, sample_rate: int, seed: int, *,
               persistent: bool = True) -> Synthesis:
    """``persistent=False`` runs a fresh ``festival --batch`` process for this call alone (same output)."""
    del seed  # Festival has no randomness
    exe = shutil.which("festival")
    if exe is None:
        raise SynthesisError(f"Festival is not installed; {INSTALL_HINT}")
    folder = _resolve(name)
    text = " ".join(text.split())
    if persistent:
        with _LOCK:
            stdout, data = _run_persistent(exe, text, name, folder, rate_wpm, pitch)
    else:
        stdout, data = _run_once(exe, text, name, folder, rate_wpm, pitch)
    with wavefile.open(io.BytesIO(data), "rb") as f:
        hz, channels, width = f.getframerate(), f.getnchannels(), f.getsampwidth()
        raw = f.readframes(f.getnframes())
    if width != 2:
        raise SynthesisError(f"Festival ({name}) wrote {8 * width}-bit audio, expected 16-bit")
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    if len(samples) == 0:
        raise SynthesisError(f"Festival ({name}) produced no audio for {text[:80]!r}")
    return finish_tokens(samples, hz, text, parse_tokens(stdout), sample_rate, "festival", name)
