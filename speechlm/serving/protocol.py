"""OpenAI's chat-completions wire format for speech: a request's JSON -> :class:`ChatRequest`, results -> the
``chat.completion`` / ``chat.completion.chunk`` JSON, and errors in OpenAI's ``{"error": {...}}`` shape.

A request is answered about one clip: exactly one ``input_audio`` content part (``{"data": base64, "format":
"wav" | "mp3" | "flac"}``) among the messages. The text parts of the system and user messages, joined by
newlines, are the instruction: with a ``{speech}`` placeholder it is the prompt as written; without, the speech
follows it as ``"<instruction>\\nText: {speech}\\nAnswer:"``; no text at all: the default prompt (repeat the text)
-- the rule of :func:`speechlm.inference.prompt_from_instruction`, as on the page. Options: ``max_tokens`` (or
``max_completion_tokens``), ``temperature`` (default 0: greedy, unlike OpenAI's 1), ``top_p``, ``stop``,
``seed``, ``n`` (1 only), ``stream``, ``stream_options.include_usage``; speechlm's own under ``"speechlm"``:
``chat`` (the tokenizer's chat template), ``cascade`` (also answer through the Whisper cascade), ``picture``
(the boundary PNG), ``no_repeat_ngram``.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from speechlm.inference import DEFAULT_STOP, prompt_from_instruction
from speechlm.serving.config import ServerConfig

AUDIO_FORMATS = ("wav", "mp3", "flac")
EXTRA = "speechlm"  # the response field with speechlm's extras (transcript, tokens, speech_s, no_speech, ...)


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """One parsed request: the audio (decoded, at its own rate), the prompt and the decoding options."""

    wave: torch.Tensor  # (samples,) float32, mono
    sample_rate: int
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = DEFAULT_STOP
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    chat: bool = False
    cascade: bool = False
    picture: bool = False
    no_repeat_ngram: int = 0
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def duration_s(self) -> float:
        return self.wave.shape[0] / self.sample_rate


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def decode_audio(data: str, fmt: str, cfg: ServerConfig) -> tuple[torch.Tensor, int]:
    """base64 audio of a content part -> (mono float32 wave, sample rate), with the size and length limits."""
    import soundfile as sf

    if fmt not in AUDIO_FORMATS:
        raise _bad(f"input_audio.format must be one of {list(AUDIO_FORMATS)}, got {fmt!r}", "input_audio.format",
                   "unsupported_audio_format")
    if not isinstance(data, str) or not data:
        raise _bad("input_audio.data must be a non-empty base64 string", "input_audio.data", "invalid_audio")
    if len(data) * 3 // 4 > cfg.max_upload_bytes + 3:
        raise APIError(413, f"the audio is {len(data) * 3 / 4 / 1048576:.1f} MB; this server takes up to "
                            f"{cfg.max_upload_bytes / 1048576:g} MB", code="audio_too_large", param="input_audio.data")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("input_audio.data is not valid base64", "input_audio.data", "invalid_base64") from None
    if len(raw) > cfg.max_upload_bytes:
        raise APIError(413, f"the audio is {len(raw) / 1048576:.1f} MB; this server takes up to "
                            f"{cfg.max_upload_bytes / 1048576:g} MB", code="audio_too_large", param="input_audio.data")
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            seconds = f.frames / f.samplerate
            if seconds > cfg.max_audio_s:
                raise _bad(f"the clip is {seconds:.1f} s long; this server takes clips up to {cfg.max_audio_s:g} s",
                           "input_audio.data", "audio_too_long")
            arr = f.read(dtype="float32", always_2d=True)
            sr = f.samplerate
    except APIError:
        raise
    except Exception:  # noqa: BLE001 -- soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise _bad(f"input_audio.data is not an audio file this server can read (format {fmt!r}; wav, mp3 or flac)",
                   "input_audio.data", "invalid_audio") from None
    if arr.shape[0] == 0:
        raise _bad("the audio is empty", "input_audio.data", "invalid_audio")
    mono = arr.mean(axis=1) if arr.shape[1] > 1 else arr[:, 0]
    if not np.isfinite(mono).all():
        raise _bad("the audio contains NaN or infinite samples", "input_audio.data", "invalid_audio")
    if mono.shape[0] / sr > cfg.max_audio_s:  # headers can lie about the length
        raise _bad(f"the clip is {mono.shape[0] / sr:.1f} s long; this server takes clips up to {cfg.max_audio_s:g} s",
                   "input_audio.data", "audio_too_long")
    return torch.from_numpy(np.ascontiguousarray(mono)), int(sr)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise _bad(f"{key} must be a number in [{lo:g}, {hi:g}], got {v!r}", key)
    return float(v)


def parse_chat_request(body: Any, cfg: ServerConfig) -> ChatRequest:
    """Check and read a ``POST /v1/chat/completions`` body (see the module's docstring); APIError otherwise."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != cfg.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {cfg.model_name!r}", "model",
                       "model_not_found", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    texts, audio = [], []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user"):
            role = m.get("role") if isinstance(m, dict) else None
            raise _bad(f"messages[{k}]: role {role!r} is not supported (system, developer or user; one turn)",
                       f"messages[{k}].role")
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise _bad(f"messages[{k}].content must be a string or a list of parts", f"messages[{k}].content")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
                audio.append(part["input_audio"])
            else:
                raise _bad(f"messages[{k}].content[{j}]: expected a part of type 'text' or 'input_audio'",
                           f"messages[{k}].content[{j}]")
    if len(audio) != 1:
        raise _bad(f"a request needs exactly one input_audio part, got {len(audio)}", "messages", "audio_required")
    if body.get("n", 1) not in (1, None):
        raise _bad("n must be 1", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = cfg.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    if max_tokens > cfg.max_tokens:
        raise _bad(f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens}", "max_tokens",
                   "max_tokens_too_large")
    stop = body.get("stop", None)
    if stop is None:
        stop_t = DEFAULT_STOP
    elif isinstance(stop, str):
        stop_t = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stop_t = tuple(stop)
    else:
        raise _bad("stop must be a string or a list of at most 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"seed must be an integer, got {seed!r}", "seed")
    extra = body.get(EXTRA) or {}
    if not isinstance(extra, dict):
        raise _bad(f"{EXTRA} must be an object", EXTRA)
    so = body.get("stream_options") or {}
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise _bad("top_p must be above 0", "top_p")
    nrg = extra.get("no_repeat_ngram", 0)
    if isinstance(nrg, bool) or not isinstance(nrg, int) or nrg < 0:
        raise _bad(f"{EXTRA}.no_repeat_ngram must be a non-negative integer", f"{EXTRA}.no_repeat_ngram")
    wave, sr = decode_audio(audio[0].get("data"), str(audio[0].get("format", "wav")).lower(), cfg)
    instruction = "\n".join(t for t in texts if t.strip())
    return ChatRequest(wave=wave, sample_rate=sr, prompt=prompt_from_instruction(instruction), max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, stop=stop_t, seed=seed, stream=bool(body.get("stream")),
                       include_usage=bool(isinstance(so, dict) and so.get("include_usage")),
                       chat=bool(extra.get("chat")), cascade=bool(extra.get("cascade")),
                       picture=bool(extra.get("picture")), no_repeat_ngram=nrg)


# ------------------------------------------------------------------------------------------ responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(req: ChatRequest, model: str, answer: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, extras: dict[str, Any]) -> dict[str, Any]:
    """The ``chat.completion`` object of a finished answer."""
    return {"id": req.id, "object": "chat.completion", "created": req.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens), EXTRA: extras}


def chunk(req: ChatRequest, model: str, delta: dict[str, Any] | None = None, finish_reason: str | None = None,
          extra: dict[str, Any] | None = None, with_choice: bool = True) -> dict[str, Any]:
    """One ``chat.completion.chunk`` event (``with_choice=False``: the usage-only chunk, no choices)."""
    out: dict[str, Any] = {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": model,
                           "choices": ([{"index": 0, "delta": delta or {}, "finish_reason": finish_reason,
                                         "logprobs": None}] if with_choice else [])}
    if extra:
        out.update(extra)
    return out
