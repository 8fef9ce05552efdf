"""Inference with a trained SpeechLM: audio (+ a prompt) in, an answer out. The CLI and the web demo call this.

    from speechlm.inference import SpeechLMPipeline

    pipe = SpeechLMPipeline.from_run("runs/tiny")          # stage2 (else stage1) connector + aligner + models
    result = pipe.generate("clip.wav")                      # default prompt: repeat the text
    result.answer, result.transcript, result.tokens[0], result.timings
    pipe.generate("clip.wav", "Summarize: {speech}\\nAnswer:", temperature=0.7, top_p=0.9, seed=1)
    for piece in pipe.generate("clip.wav", stream=True):   # text pieces as they are decoded
        print(piece, end="")
    pipe.score("clip.wav", " the cat sat")                  # log p(continuation | BOS + speech)

What happens to one clip (:meth:`SpeechLMPipeline.speech`): the audio is read by ``speechlm.data.audio``
(any rate, resampled to the encoder's); the voice-activity detector (:mod:`speechlm.data.vad`, Silero; ``vad``
configures it) finds the speech regions, padded by a few tens of ms, and only they are encoded and decoded, so
silence and noise never become tokens. A region longer than ``max_clip_s`` (30 s) is cut into windows of at most
``chunk_s`` (25 s), each cut placed at the quietest 20 ms of the window's last ``search_s`` (5) seconds; per
window the frozen encoder runs, the aligner decodes its own transcript in *free* mode and gives one end frame
per LLM token, and the connector reads out one vector per token. The windows' vectors, transcript tokens and
boundaries (shifted by the window's start: times stay in the clip's time) are concatenated.

A clip without speech (nothing detected, or nothing decoded from it: ``Speech.no_speech``) gives no vectors;
``no_speech="refuse"`` (the default) answers it with an empty answer without running the LLM, ``"answer"``
answers the prompt alone; the result is flagged either way (``no_speech``, ``speech_s``, a warning), and
:meth:`SpeechLMPipeline.score` raises :class:`NoSpeechError`. ``VADConfig(enabled=False)`` decodes whole clips.

The prompt is text, then the speech vectors, then text: one ``{speech}`` placeholder
(``"Summarize: {speech}\\nAnswer:"``); the sequence starts with BOS. ``chat=True`` puts the whole prompt into
a user turn of the tokenizer's chat template (``apply_chat_template``, generation prompt added).

Decoding (:func:`sample_tokens`) is the KV-cache loop of :meth:`SpeechLM.generate` for one sequence, with
temperature / top-p sampling (``temperature=0``: greedy, the same tokens as ``SpeechLM.generate``), optional
no-repeat n-grams, and stops at EOS, after ``max_new_tokens`` or at the first ``stop`` string once the answer
has begun (leading whitespace does not stop it: a model that starts with a newline still answers; the stop
string is not part of the answer). The answer is the decoded text without leading/trailing whitespace; with ``stream=True`` its
pieces come as they are decoded (text that might still become a stop string is held back), and they join to
exactly the answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechlm.data.vad import VADConfig, VoiceActivity
from speechlm.errors import AlignmentError, AudioError, ConfigError, ModelError
from speechlm.eval.asr import DEFAULT_PROMPT
from speechlm.eval.scoring import start_ids, text_ids
from speechlm.inference.decoding import TextAssembler, pick_token, sample_tokens  # noqa: F401 -- also imported from here
from speechlm.inference.runs import RUN_CONNECTORS, RunFolders, resolve_run  # noqa: F401 -- also imported from here
from speechlm.models.speechlm import Segment, SpeechLM, SpeechSegment, TextSegment

SPEECH = "{speech}"
DEFAULT_STOP = ("\n",)  # the default prompt asks for one line
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
#: What :meth:`SpeechLMPipeline.generate` does with a clip without speech: an empty answer, or the prompt alone.
NO_SPEECH_POLICIES = ("refuse", "answer")


class NoSpeechError(AudioError):
    """A clip in which no speech was found where speech is needed (:meth:`SpeechLMPipeline.score`)."""


def no_speech_warning(policy: str) -> str:
    """The warning a result without speech carries, saying what was done about it."""
    if policy == "refuse":
        return "no speech detected: not answered (no_speech='refuse'; 'answer' answers the prompt alone)"
    return "no speech detected: answered from the prompt alone, without speech (no_speech='answer')"


# ------------------------------------------------------------------------------------------ results
@dataclass
class TokenSpan:
    """One LLM token of the aligner's transcript and the audio it covers, in seconds from the clip's start.

    ``end_s`` is the token's aligned end; ``start_s`` the previous token's end (the segment the SSR
    connector reads), for the first token of a window the start of its first word."""

    token: str
    id: int
    start_s: float
    end_s: float


@dataclass
class Speech:
    """One clip turned into LLM input: connector vectors (one per transcript token) and what made them."""

    segment: SpeechSegment  # embeds (N, d_llm), ids = the N transcript tokens (None: connector without boundaries)
    transcript: str  # what the aligner decoded (free mode); "" for connectors without boundaries
    tokens: list[TokenSpan]
    duration_s: float
    chunks: list[tuple[float, float]]  # (start_s, end_s) of each window the clip was cut into
    timings: dict[str, float]  # encode_s, align_s, connector_s
    warnings: list[str] = field(default_factory=list)
    wave: torch.Tensor | None = None  # (T,) at the encoder's rate (for pictures)
    elapsed_s: float = 0.0  # wall seconds from the audio to the vectors (loading included)
    speech_s: float = 0.0  # seconds of detected speech (the padded regions; the whole clip without the detector)
    regions: list[tuple[float, float]] = field(default_factory=list)  # (start_s, end_s) of the detected speech

    @property
    def no_speech(self) -> bool:
        """True when no speech vector reaches the LLM (nothing detected, or nothing decoded from it)."""
        return int(self.segment.embeds.shape[0]) == 0

    def to_dict(self) -> dict[str, Any]:
        """What was heard, as JSON (the server's extras; :meth:`InferenceResult.to_dict` has the same fields)."""
        return speech_fields(self.transcript, self.duration_s, self.tokens, self.chunks, self.speech_s,
                             self.no_speech, self.regions, self.warnings)


def speech_fields(transcript: str, duration_s: float, tokens: Sequence[TokenSpan], chunks: Sequence[tuple[float, float]],
                  speech_s: float, no_speech: bool, regions: Sequence[tuple[float, float]],
                  warnings: Sequence[str]) -> dict[str, Any]:
    """The JSON of one clip's hearing: transcript, token times, windows, detected speech, warnings (rounded)."""
    return {"transcript": transcript, "duration_s": round(duration_s, 3),
            "tokens": [{"token": t.token, "id": t.id, "start_s": round(t.start_s, 3), "end_s": round(t.end_s, 3)}
                       for t in tokens],
            "chunks": [[round(a, 3), round(b, 3)] for a, b in chunks],
            "speech_s": round(speech_s, 3), "no_speech": no_speech,
            "speech_regions": [[round(a, 3), round(b, 3)] for a, b in regions], "warnings": list(warnings)}


@dataclass
class InferenceResult:
    answer: str
    transcript: str
    tokens: list[TokenSpan]
    timings: dict[str, float]  # encode_s, align_s, connector_s, first_token_s, total_s (wall seconds)
    duration_s: float
    prompt: str
    token_ids: list[int]  # every generated token (a stop string's tokens included; EOS not)
    chunks: list[tuple[float, float]]
    warnings: list[str] = field(default_factory=list)
    speech_s: float = 0.0  # seconds of detected speech
    no_speech: bool = False  # True: no speech reached the LLM (the answer follows the no_speech policy)
    speech_regions: list[tuple[float, float]] = field(default_factory=list)  # (start_s, end_s), clip time

    @property
    def boundaries(self) -> list[tuple[float, float]]:
        """(start_s, end_s) per transcript token."""
        return [(t.start_s, t.end_s) for t in self.tokens]

    def to_dict(self) -> dict[str, Any]:
        heard = speech_fields(self.transcript, self.duration_s, self.tokens, self.chunks, self.speech_s,
                              self.no_speech, self.speech_regions, self.warnings)
        return {"prompt": self.prompt, "answer": self.answer, **heard,
                "timings": {k: round(v, 4) for k, v in self.timings.items()}}


class GenerationStream:
    """Iterator over the answer's text pieces (``stream=True``); ``result`` is the InferenceResult once exhausted."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: InferenceResult | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as e:
            self.result = e.value
            raise


def window_wave(wave: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``wave[start:end]``, with zeros where the window reaches before 0 or past the clip's end (a speech region's
    padding at a clip's edge: the clip decodes as it would with silence around it)."""
    n = int(wave.shape[0])
    piece = wave[max(start, 0):min(end, n)]
    if start >= 0 and end <= n:
        return piece
    return torch.nn.functional.pad(piece, (max(0, -start), max(0, end - n)))


def clamp_spans(spans: list[TokenSpan], duration_s: float) -> list[TokenSpan]:
    """Token times kept inside the clip (a window's padding may reach past its edges)."""
    for t in spans:
        t.start_s, t.end_s = min(max(t.start_s, 0.0), duration_s), min(max(t.end_s, 0.0), duration_s)
    return spans


def check_policy(policy: str) -> str:
    if policy not in NO_SPEECH_POLICIES:
        raise ConfigError(f"no_speech must be one of {', '.join(NO_SPEECH_POLICIES)}, got {policy!r}")
    return policy


def split_prompt(prompt: str) -> tuple[str, str]:
    """(text before, text after) the one ``{speech}`` placeholder."""
    if prompt.count(SPEECH) != 1:
        raise ConfigError(f"the prompt needs exactly one {SPEECH} placeholder where the speech goes: {prompt!r}")
    before, after = prompt.split(SPEECH)
    return before, after


def prompt_from_instruction(instruction: str) -> str:
    """A prompt from an instruction typed by a user: unchanged when it has the ``{speech}`` placeholder, else
    ``"<instruction>\\nText: {speech}\\nAnswer:"``; empty: the default (repeat the text)."""
    instruction = instruction.strip()
    if not instruction:
        return DEFAULT_PROMPT
    if SPEECH in instruction:
        return instruction
    return f"{instruction}\nText: {SPEECH}\nAnswer:"


# ------------------------------------------------------------------------------------------ pipeline
class SpeechLMPipeline:
    """A loaded SpeechLM (encoder + connector + frozen LLM) and its aligner, ready for answers and scores.

    ``vad``: the voice-activity settings (a :class:`VADConfig`, or a shared :class:`VoiceActivity`; default on);
    ``no_speech``: what :meth:`generate` does with a clip without speech (``"refuse"`` or ``"answer"``)."""

    def __init__(self, model: SpeechLM, aligner: Any = None, chunk_s: float = 25.0, max_clip_s: float = 30.0,
                 search_s: float = 5.0, vad: VADConfig | VoiceActivity | None = None, no_speech: str = "refuse"):
        if model.encoder is None:
            raise ModelError("the pipeline needs a SpeechLM with its speech encoder")
        if model.tokenizer is None:
            raise ModelError("the pipeline needs a SpeechLM with its tokenizer")
        if not 0 < search_s < chunk_s <= max_clip_s:
            raise ConfigError(f"need 0 < search_s < chunk_s <= max_clip_s, got {search_s}, {chunk_s}, {max_clip_s}")
        self.no_speech = check_policy(no_speech)
        self.vad = vad if isinstance(vad, VoiceActivity) else VoiceActivity(vad)
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.aligner = aligner
        self.uses_boundaries = model.connector.cfg.name == "ssr"
        if self.uses_boundaries and aligner is None:
            raise ModelError("an SSR connector needs an aligner for its token boundaries")
        if aligner is not None:
            from alignment.aligner import check_encoder

            check_encoder(aligner.model, model.encoder)
        self.sample_rate = int(model.encoder.sample_rate)
        self.chunk_s, self.max_clip_s, self.search_s = chunk_s, max_clip_s, search_s
        self.folders: RunFolders | None = None

    @classmethod
    def from_run(cls, run: str | Path = "runs/tiny", *, connector: str | Path | None = None,
                 aligner: str | Path | None = None, llm: str | Path | None = None, encoder: str | Path | None = None,
                 device: str = "cpu", dtype: str = "auto", **kw: Any) -> SpeechLMPipeline:
        """Load a trained run (or a connector folder); see :func:`resolve_run` for what is looked up where.
        ``dtype``: the LLM's precision (``auto``: bf16 on a CUDA device that has it, else fp32)."""
        from speechlm.eval.scoring import load_front_end
        from speechlm.training.build import eval_dtype, load_llm

        folders = resolve_run(run, connector, aligner, llm, encoder)
        llm_model, tok = load_llm(str(folders.llm), eval_dtype(dtype, device))
        model, front = load_front_end(str(folders.connector), llm_model.to(device), tok, str(folders.aligner or ""),
                                      "free", str(folders.encoder), device)
        pipe = cls(model, front.aligner, **kw)
        pipe.folders = folders
        return pipe

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, llm: str | Path | None = None, encoder: str | Path | None = None,
                        device: str = "cpu", dtype: str = "auto", **kw: Any) -> SpeechLMPipeline:
        """Load a folder exported by ``tools/export.py`` (or a Hub repo id of one): see
        :mod:`speechlm.inference.pretrained`; ``llm``/``encoder`` point at local copies of the frozen models."""
        from speechlm.inference.pretrained import load_pretrained

        p = load_pretrained(folder, llm=llm, encoder=encoder, device=device, dtype=dtype)
        pipe = cls(p.model, p.aligner, **kw)
        pipe.folders = RunFolders(p.connector, p.aligner_folder, p.llm, p.encoder)
        return pipe

    # -------------------------------------------------------------------------------- audio, speech
    def load(self, audio: Any, sample_rate: int | None = None) -> torch.Tensor:
        """A clip as a 1-D float32 waveform at the encoder's rate: from a path (any format soundfile reads),
        a 1-D tensor/array with ``sample_rate``, or a ``(wave, sample_rate)`` tuple."""
        from speechlm.data.audio import load_audio, resample

        if isinstance(audio, (str, os.PathLike)):
            return load_audio(audio, self.sample_rate)
        if isinstance(audio, tuple) and len(audio) == 2:
            audio, sample_rate = audio
        if sample_rate is None:
            raise AudioError("a waveform needs its sample_rate")
        arr = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
        if np.issubdtype(arr.dtype, np.integer):
            arr = arr / float(np.iinfo(arr.dtype).max + 1)
        if arr.ndim != 1:
            raise AudioError(f"a waveform must be 1-D (samples,), got shape {tuple(arr.shape)}")
        if arr.size == 0:
            raise AudioError("audio is empty")
        if not np.isfinite(arr).all():
            raise AudioError("audio contains NaN or infinite samples")
        return resample(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), int(sample_rate), self.sample_rate)

    def chunk_bounds(self, wave: torch.Tensor) -> list[tuple[int, int]]:
        """(start, end) samples of the windows a clip is encoded in: the whole clip up to ``max_clip_s``, else
        windows of at most ``chunk_s``, each ending in the middle of the quietest 20 ms of its last ``search_s``
        (and leaving at least 1 s for the last window)."""
        sr, n = self.sample_rate, int(wave.shape[0])
        if n <= self.max_clip_s * sr:
            return [(0, n)]
        hop, out, start = int(0.02 * sr), [], 0
        while n - start > self.chunk_s * sr:
            hi = min(start + int(self.chunk_s * sr), n - sr)
            lo = max(start + sr, hi - int(self.search_s * sr))
            frames = wave[lo:hi][: (hi - lo) // hop * hop].reshape(-1, hop)
            cut = lo + int(frames.pow(2).mean(1).argmin()) * hop + hop // 2 if len(frames) else hi
            out.append((start, cut))
            start = cut
        return [*out, (start, n)]

    def speech_windows(self, wave: torch.Tensor) -> tuple[list[tuple[int, int]], list[tuple[float, float]], float]:
        """(windows to encode as (start, end) samples, speech regions in seconds, vad seconds) of a clip: each
        region the voice-activity detector finds (:attr:`vad`; the whole clip when it is disabled), cut into
        :meth:`chunk_bounds` windows when it is long. Nothing outside the regions is encoded or decoded."""
        t0, sr, n = time.perf_counter(), self.sample_rate, int(wave.shape[0])
        found = self.vad.detect(wave, sr)
        if not self.vad.cfg.enabled:
            return self.chunk_bounds(wave), [(0.0, n / sr)], time.perf_counter() - t0
        # each region with its whole padding: zeros where it reaches past the clip (see :func:`window_wave`)
        extents = found.sample_bounds(sr, n, extents=True)
        windows = [(a + s, a + e) for a, b in extents for s, e in self.chunk_bounds(window_wave(wave, a, b))]
        frames = self.model.encoder.frame_lengths(torch.tensor([e - s for s, e in windows] or [0]))
        windows = [w for w, f in zip(windows, frames.tolist()) if f > 0]  # too short for one encoder frame
        return windows, found.regions, time.perf_counter() - t0

    @torch.no_grad()
    def speech(self, audio: Any, sample_rate: int | None = None) -> Speech:
        """One clip (see :meth:`load`; a Speech is returned as it is) -> connector vectors, transcript, boundaries,
        from the detected speech only (:meth:`speech_windows`); no speech: no vectors and a warning."""
        if isinstance(audio, Speech):
            return audio
        t0 = time.perf_counter()
        wave = self.load(audio, sample_rate)
        sr = self.sample_rate
        bounds, regions, vad_s = self.speech_windows(wave)
        parts = [self._embed_window(window_wave(wave, s, e), s / sr) for s, e in bounds]
        ids = [t for p in parts for t in p[1]] if self.uses_boundaries else None
        timings = {k: sum(p[4][k] for p in parts) for k in ("encode_s", "align_s", "connector_s")}
        d = self.model.llm.get_input_embeddings().weight.shape[1]
        embeds = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, d, device=self.model.device)
        warnings = [w for p in parts for w in p[5]] + ([] if bounds else ["no speech detected in the clip"])
        return Speech(SpeechSegment(embeds, ids=ids), " ".join(p[3] for p in parts if p[3]),
                      clamp_spans([t for p in parts for t in p[2]], wave.shape[0] / sr), wave.shape[0] / sr,
                      [(max(s, 0) / sr, min(e, wave.shape[0]) / sr) for s, e in bounds],
                      {**timings, "vad_s": vad_s}, warnings, wave, time.perf_counter() - t0,
                      sum(e - s for s, e in regions), regions)

    def free_align(self, features: torch.Tensor, lengths: torch.Tensor, label: str = "?") -> Any:
        """The aligner in free mode on one window's encoder frames (1, L, T, D): its transcript's tokens and their
        end frames at the connector's rate (an AlignmentResult); AlignmentError when it decodes nothing."""
        [res] = self.aligner.align(features, lengths, [None], utt_ids=[label],
                                   target_frame_rate_hz=self.model.connector.cfg.frame_rate_hz,
                                   target_num_frames=[int(lengths[0])])
        return res

    def _embed_window(self, wave: torch.Tensor, offset_s: float
                      ) -> tuple[torch.Tensor, list[int], list[TokenSpan], str, dict[str, float], list[str]]:
        """(vectors (N, d_llm), token ids, spans, transcript, timings, warnings) of one window."""
        model, dev = self.model, self.model.device
        t0 = time.perf_counter()
        enc = model.encoder([wave])
        t1 = time.perf_counter()
        features, lengths = enc.features, enc.lengths
        if not self.uses_boundaries:
            out = model.speech_embeds(features.to(dev), lengths.to(dev))
            t2 = time.perf_counter()
            return (out.embeds[0][out.mask[0]], [], [], "", {"encode_s": t1 - t0, "align_s": 0.0,
                                                             "connector_s": t2 - t1}, [])
        rate = model.connector.cfg.frame_rate_hz
        warnings = []
        try:
            res = self.free_align(features, lengths, f"{offset_s:.2f}s")
        except AlignmentError as e:  # e.g. the aligner heard no speech: no vectors for this window
            res = None
            warnings.append(f"window at {offset_s:.2f} s: no speech decoded ({e})")
        t2 = time.perf_counter()
        if res is None or not res.token_ids:
            d = model.llm.get_input_embeddings().weight.shape[1]
            return (torch.zeros(0, d, device=dev), [], [], "",
                    {"encode_s": t1 - t0, "align_s": t2 - t1, "connector_s": 0.0}, warnings)
        bounds = torch.tensor([res.token_boundaries], dtype=torch.long, device=dev)
        out = model.speech_embeds(features.to(dev), lengths.to(dev), bounds, torch.ones_like(bounds, dtype=torch.bool))
        t3 = time.perf_counter()
        ends = [offset_s + (b + 1) / rate for b in res.token_boundaries]
        first = offset_s + (res.words[0].start_s if res.words else 0.0)
        starts = [min(first, ends[0])] + ends[:-1]
        spans = [TokenSpan(self.tokenizer.decode([t], clean_up_tokenization_spaces=False), int(t), s, e)
                 for t, s, e in zip(res.token_ids, starts, ends, strict=True)]
        return (out.embeds[0][out.mask[0]], list(res.token_ids), spans, res.text,
                {"encode_s": t1 - t0, "align_s": t2 - t1, "connector_s": t3 - t2}, warnings)

    # -------------------------------------------------------------------------------- prompts
    def prefix(self, prompt: str, speech: Speech, chat: bool = False) -> list[Segment]:
        """[text before, speech vectors, text after] of a prompt with one ``{speech}``; BOS first
        (``chat``: the tokenizer's chat template around the prompt as a user turn, with the generation prompt)."""
        tok = self.tokenizer
        before, after = split_prompt(prompt)
        if chat:
            if not getattr(tok, "chat_template", None):
                raise ConfigError("this tokenizer has no chat template: use chat=False")
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            before, after = split_prompt(text)
            pre = text_ids(tok, before) or start_ids(tok)
        else:
            pre = start_ids(tok) + text_ids(tok, before)
        post = text_ids(tok, after)
        voice = [] if speech.no_speech else [speech.segment]  # no speech: no vectors reach the LLM
        return [TextSegment(pre), *voice] + ([TextSegment(post)] if post else [])

    # -------------------------------------------------------------------------------- answers
    def generate(self, audio: Any, prompt: str = DEFAULT_PROMPT, *, sample_rate: int | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = DEFAULT_STOP, seed: int | None = None, chat: bool = False,
                 no_repeat_ngram: int = 0, stream: bool = False, no_speech: str | None = None
                 ) -> InferenceResult | list[InferenceResult] | GenerationStream:
        """Answer ``prompt`` about one clip (an InferenceResult) or a list of clips (a list of them); a clip is
        anything :meth:`load` takes, or a :class:`Speech` from :meth:`speech` (e.g. to plot it first).

        ``temperature`` 0 is greedy; above 0 samples (``top_p`` nucleus, ``seed`` for a reproducible draw).
        Decoding stops at EOS, after ``max_new_tokens`` or at the first of the ``stop`` strings.
        ``stream=True`` (one clip) returns a :class:`GenerationStream` of text pieces instead.
        A clip without speech (``Speech.no_speech``) follows ``no_speech`` (default: the pipeline's policy):
        ``"refuse"`` gives an empty answer, ``"answer"`` answers the prompt alone; both flag the result
        (``no_speech=True`` and a warning).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        policy = check_policy(self.no_speech if no_speech is None else no_speech)
        options = {"sample_rate": sample_rate, "max_new_tokens": max_new_tokens, "temperature": temperature,
                   "top_p": top_p, "stop": stop, "seed": seed, "chat": chat, "no_repeat_ngram": no_repeat_ngram,
                   "no_speech": policy}
        if isinstance(audio, list):
            if stream:
                raise ValueError("stream=True answers one clip at a time")
            return [self.generate(a, prompt, **options) for a in audio]
        # timings run from the audio: a Speech made earlier brings the seconds it took
        t0 = time.perf_counter() - (audio.elapsed_s if isinstance(audio, Speech) else 0.0)
        speech = self.speech(audio, sample_rate)
        prefix = self.prefix(prompt, speech, chat)  # errors here, not at the first next()
        refuse = speech.no_speech and policy == "refuse"  # then the LLM does not run at all
        if speech.no_speech:
            speech = replace(speech, warnings=[*speech.warnings, no_speech_warning(policy)])
        pieces = GenerationStream(self._decode(speech, prompt, prefix, t0, 0 if refuse else max_new_tokens,
                                               temperature, top_p, tuple(stop or ()), seed, no_repeat_ngram))
        if stream:
            return pieces
        for _ in pieces:
            pass
        assert pieces.result is not None
        return pieces.result

    def _decode(self, speech: Speech, prompt: str, prefix: list[Segment], t0: float, max_new_tokens: int,
                temperature: float, top_p: float, stop: tuple[str, ...], seed: int | None, no_repeat_ngram: int
                ) -> Iterator[str]:
        tok = self.tokenizer
        eos = {tok.eos_token_id} - {None}
        generator = None
        if seed is not None and temperature > 0:
            generator = torch.Generator(device=self.model.device).manual_seed(int(seed))
        text = TextAssembler(tok, stop)
        tokens = sample_tokens(self.model, prefix, temperature, top_p, generator, no_repeat_ngram)
        first_s = None
        try:
            for _ in range(max_new_tokens):
                t = next(tokens)
                first_s = time.perf_counter() - t0 if first_s is None else first_s
                if t in eos:
                    break
                piece = text.push(t)
                if piece:
                    yield piece
                if text.stopped:
                    break
        finally:
            tokens.close()
        tail = text.finish()
        if tail:
            yield tail
        total = time.perf_counter() - t0
        timings = {**speech.timings, "first_token_s": first_s if first_s is not None else total, "total_s": total}
        return InferenceResult(text.answer, speech.transcript, speech.tokens, timings, speech.duration_s, prompt,
                               list(text.ids), speech.chunks, speech.warnings, speech.speech_s, speech.no_speech,
                               speech.regions)

    @torch.no_grad()
    def score(self, audio: Any, continuation: str | list[str], prompt: str = SPEECH, *, sample_rate: int | None = None,
              chat: bool = False) -> float | list[float]:
        """Log-likelihood (natural log, summed over its tokens) of text ``continuation`` after the prompt with
        the clip's speech (default: BOS + speech); a list of clips gives a list (one continuation each, or
        the same for all). A clip without speech raises :class:`NoSpeechError` (nothing to score it on)."""
        clips = audio if isinstance(audio, list) else [audio]
        conts = continuation if isinstance(continuation, list) else [continuation] * len(clips)
        if len(conts) != len(clips):
            raise ValueError(f"{len(clips)} clips but {len(conts)} continuations")
        ids = [text_ids(self.tokenizer, c) for c in conts]
        if any(not x for x in ids):
            raise ValueError("a continuation has no tokens")
        speeches = [self.speech(a, sample_rate) for a in clips]
        for i, (a, sp) in enumerate(zip(clips, speeches, strict=True)):
            if sp.no_speech:
                name = str(a) if isinstance(a, (str, os.PathLike)) else f"clip {i}"
                what = "no speech detected" if not sp.regions else "nothing decoded from the detected speech"
                raise NoSpeechError(f"{name}: {what}; a continuation cannot be scored without speech")
        prefixes = [self.prefix(prompt, sp, chat) for sp in speeches]
        scores = [float(lp.sum()) for lp in self.model.score(prefixes, ids)]
        return scores if isinstance(audio, list) else scores[0]
