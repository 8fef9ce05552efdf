"""Speech in while it is recorded: the encoder, the aligner (free mode) and the causal SSR connector run on the
audio received so far, and each LLM token's vector is emitted once its boundary is closed; the vectors go into
the LLM's KV cache as they come, so at the end of the audio only the last vectors and the prompt's tail are left
before the first answer token.

What is exact and what is not. The SSR connector with the causal mask reads token i's vector from the stacked
frames up to its boundary only, so given the same encoder frames and boundaries the vectors computed on a prefix
of the audio equal the offline ones (tested: max abs difference below 1e-5 in fp32). Whisper is not streamable
that way: its encoder attends over the whole clip in both directions (and is trained on 30 s windows), so a frame
changes as audio is added after it, and the aligner's free-mode transcript of a partial clip can change too. The
scheme here is the closest correct one: every ``hop_s`` of new audio the whole buffer (at most the last
``window_s``, 30 s) is re-encoded and re-aligned, and a token is *closed* -- its vector emitted, never revised --
when a later word has begun and at least ``margin_s`` of audio follows its boundary, or when ``close_after_s`` of
audio follows it (a pause). Its vector then comes from frames that saw ``margin_s`` or more of right context
instead of the whole clip: the difference to the offline vectors is measured and reported, not zero. The cost is
one encoder + aligner pass over the buffer per hop: quadratic in the clip length (a 10 s clip at 0.5 s hops is
20 passes over 5 s of audio on average), which is why ``window_s`` bounds it. ``context_s`` > 0 bounds it harder:
each pass re-encodes only from ``context_s`` before the last closed token (linear cost, a short final pass, less
left context for Whisper).

Silence is gated as offline (issue 30): each pass runs the pipeline's voice-activity detector on the audio it
would encode, encodes from where detected speech begins, and emits only tokens that end inside detected speech; a
stream with none ends with ``no_speech`` and, under the pipeline's default policy (``refuse``), an empty answer
without running the LLM.

:class:`StreamingSession` is the model side (run it on the thread that owns the model); :func:`serve_session`
is the WebSocket endpoint ``/v1/audio/stream``:

* client -> server: optionally ``{"type": "start", "instruction": ..., "max_tokens": 64, "chat": false}`` first;
  then binary messages of 16 kHz mono PCM (``pcm_s16le``, or ``f32le`` if the start message says
  ``"format": "f32le"``), as recorded; then ``{"type": "end"}``.
* server -> client: ``{"type": "tokens", "tokens": [{token, id, start_s, end_s, audio_s, latency_s}]}`` as
  tokens close (``audio_s``: audio received when it closed; ``latency_s``: from the end of the token's audio
  to its vector, if the audio came in real time), then ``{"type": "delta", "content": ...}`` pieces of the
  answer, then ``{"type": "done", "answer", "transcript", "usage", "latency": {...}}``; ``{"type": "error",
  "error": {...}}`` (OpenAI's error shape) on bad input, then the socket closes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from speechlm.errors import AlignmentError
from speechlm.inference import SpeechLMPipeline, prompt_from_instruction
from speechlm.inference.batched import DecodeOutput, DecodeRequest, PrefixCache
from speechlm.models.speechlm import SpeechSegment
from speechlm.serving.config import ServerConfig
from speechlm.serving.engine import prompt_pieces
from speechlm.serving.protocol import APIError

#: (features (1, L, T, D), lengths (1,)) of a wave.
FeaturesFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: (token ids, boundaries at the connector's frame rate) of a window's features.
AlignFn = Callable[[torch.Tensor, torch.Tensor], tuple[list[int], list[int]]]


@dataclass
class StreamedToken:
    token: str
    id: int
    start_s: float
    end_s: float  # the end of its audio (its boundary), from the clip's start
    audio_s: float  # audio received when it was closed
    compute_s: float  # wall seconds of the pass that closed it
    vector: torch.Tensor  # (d_llm,)

    @property
    def latency_s(self) -> float:
        """From the end of the token's audio to its vector, if the audio arrives in real time and each pass
        finishes before the next hop: the audio still awaited after the boundary plus the pass's compute."""
        return self.audio_s - self.end_s + self.compute_s

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token, "id": self.id, "start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3),
                "audio_s": round(self.audio_s, 3), "latency_s": round(self.latency_s, 4)}


class StreamingSession:
    """One recording: ``push(samples)`` as audio arrives, ``finish()`` at its end, then ``answer(...)``."""

    def __init__(self, pipe: SpeechLMPipeline, prompt: str, chat: bool = False, hop_s: float = 0.5,
                 margin_s: float = 0.2, close_after_s: float = 0.8, window_s: float | None = None,
                 context_s: float = 0.0, features_fn: FeaturesFn | None = None, align_fn: AlignFn | None = None,
                 gate: bool = True):
        if not pipe.uses_boundaries:
            raise APIError(400, "streaming speech in needs a connector with token boundaries (SSR)")
        self.pipe, self.sr = pipe, pipe.sample_rate
        self.hop, self.margin_s, self.close_after_s = int(hop_s * self.sr), margin_s, close_after_s
        self.window = int((window_s or pipe.max_clip_s) * self.sr)
        self.context_s = context_s  # > 0: re-encode only from this long before the last closed token
        self.gate = gate  # emit only tokens inside detected speech (the pipeline's voice-activity detector)
        self.rate = float(pipe.model.connector.cfg.frame_rate_hz)
        self.features_fn = features_fn or self._features
        self.align_fn = align_fn or self._align
        pre, self.post = prompt_pieces(pipe, prompt, chat)
        self.prefix_tokens = len(pre.ids) + len(self.post.ids)
        self.cache = PrefixCache(pipe.model)
        self.cache.extend(pre)
        self.chunks: list[torch.Tensor] = []
        self.n = 0  # samples received
        self.last_pass = 0  # samples at the last pass
        self.tokens: list[StreamedToken] = []
        self.passes: list[float] = []  # wall seconds of each pass
        self.finished = False
        self.finish_s = 0.0  # wall seconds of the final pass + the prompt's tail
        self.speech_s = 0.0  # seconds of detected speech (the pipeline's voice-activity detector)

    # ------------------------------------------------------------------------------------- default steps
    def _features(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.pipe.model.encoder([wave])
        return enc.features, enc.lengths

    def _align(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[list[int], list[int]]:
        try:
            res = self.pipe.free_align(features, lengths, "stream")
        except AlignmentError:  # nothing decoded yet
            return [], []
        return list(res.token_ids), list(res.token_boundaries)

    # ------------------------------------------------------------------------------------- audio in
    @property
    def audio_s(self) -> float:
        return self.n / self.sr

    def push(self, samples: np.ndarray | torch.Tensor) -> list[StreamedToken]:
        """Add mono float samples at the encoder's rate; returns the tokens this closed (often none)."""
        if self.finished:
            raise APIError(400, "the stream has ended")
        wave = torch.as_tensor(np.asarray(samples, dtype=np.float32)).reshape(-1)
        if wave.numel():
            self.chunks.append(wave)
            self.n += wave.numel()
        if self.n - self.last_pass >= self.hop:
            return self._pass(final=False)
        return []

    def finish(self) -> list[StreamedToken]:
        """The end of the audio: every token left is closed; the prompt's tail goes into the cache."""
        if self.finished:
            return []
        t0 = time.perf_counter()
        out = self._pass(final=True) if self.n else []
        self.finished = True
        self.cache.extend(self.post)
        self.finish_s = time.perf_counter() - t0
        return out

    def _pass(self, final: bool) -> list[StreamedToken]:
        t0 = time.perf_counter()
        self.last_pass = self.n
        wave = torch.cat(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks = [wave]
        start = max(0, self.n - self.window)
        if self.context_s > 0 and self.tokens:
            start = max(start, int((self.tokens[-1].end_s - self.context_s) * self.sr))
        regions = self._speech_regions(wave[start:], start / self.sr)
        if regions is not None:  # as offline: encode from where speech begins; no speech, nothing to encode
            if not regions:
                return []
            start = max(start, int(regions[0][0] * self.sr))
        offset_s = start / self.sr
        if self.n - start < int(0.1 * self.sr):
            return []
        with torch.no_grad():
            features, lengths = self.features_fn(wave[start:])
            ids, bounds = self.align_fn(features, lengths)
            if not ids:
                return []
            dev = self.pipe.model.device
            b = torch.tensor([bounds], dtype=torch.long, device=dev)
            out = self.pipe.model.speech_embeds(features.to(dev), lengths.to(dev), b, torch.ones_like(b, dtype=torch.bool))
        vectors = out.embeds[0]
        ends = [offset_s + (x + 1) / self.rate for x in bounds]
        if regions is not None:  # silence and noise never become tokens: each token must end inside speech
            slack = 1.0 / self.rate  # a boundary frame ends up to one frame after the sample where speech stops
            keep = [i for i, e in enumerate(ends) if any(a <= e <= b + slack for a, b in regions)]
            ids, ends, vectors = [ids[i] for i in keep], [ends[i] for i in keep], vectors[keep]
        tok = self.pipe.tokenizer
        pieces = [tok.decode([t], clean_up_tokenization_spaces=False) for t in ids]
        last_end = self.tokens[-1].end_s if self.tokens else -1.0
        # tokens up to the last emitted end are out already; several may end on one frame (zero-length segments)
        sharing = sum(1 for x in self.tokens if abs(x.end_s - last_end) < 1e-9)
        closed = []
        for i, end in enumerate(ends):
            if end < last_end - 1e-9:
                continue
            if abs(end - last_end) < 1e-9 and sharing:
                sharing -= 1
                continue
            later_word = any(p[:1].isspace() for p in pieces[i + 1:])
            if not final and not ((later_word and end + self.margin_s <= self.audio_s)
                                  or end + self.close_after_s <= self.audio_s):
                break
            closed.append(i)
        compute = time.perf_counter() - t0
        self.passes.append(compute)
        new = []
        for i in closed:
            start_s = self.tokens[-1].end_s if self.tokens else max(0.0, ends[i] - 1.0 / self.rate)
            new.append(StreamedToken(pieces[i], int(ids[i]), start_s, ends[i], self.audio_s, compute,
                                     vectors[i].detach().clone()))
            self.tokens.append(new[-1])
        if new:
            self.cache.extend(SpeechSegment(torch.stack([x.vector for x in new])))
        return new

    def _speech_regions(self, wave: torch.Tensor, offset_s: float) -> list[tuple[float, float]] | None:
        """Detected speech of this pass's audio, in the recording's time (the pipeline's voice-activity detector);
        None when the gate is off. ``speech_s`` is updated."""
        vad = self.pipe.vad
        if not (self.gate and vad.cfg.enabled):
            self.speech_s = max(self.speech_s, self.audio_s)
            return None
        found = vad.detect(wave, self.sr)
        if offset_s == 0:  # the whole recording so far (no sliding window cut it): its speech is all there is
            self.speech_s = found.speech_s
        else:
            self.speech_s = max(self.speech_s, found.speech_s)
        return [(offset_s + a, offset_s + b) for a, b in found.regions]

    @property
    def no_speech(self) -> bool:
        """The stream ended and no speech vector reached the LLM."""
        return self.finished and not self.tokens

    # ------------------------------------------------------------------------------------- the answer
    @property
    def segment(self) -> SpeechSegment:
        """Every vector emitted so far, in order (the speech the LLM received)."""
        d = self.pipe.model.llm.get_input_embeddings().weight.shape[1]
        vecs = torch.stack([x.vector for x in self.tokens]) if self.tokens else torch.zeros(0, d)
        return SpeechSegment(vecs, ids=[x.id for x in self.tokens])

    @property
    def transcript(self) -> str:
        return "".join(x.token for x in self.tokens).strip()

    def answer(self, req: DecodeRequest, on_piece: Callable[[str], None] | None = None) -> DecodeOutput:
        """The LLM's answer; with no speech, the pipeline's ``no_speech`` policy: ``refuse`` (the default) answers
        nothing and never runs the LLM, ``answer`` answers the prompt alone."""
        if not self.finished:
            self.finish()
        if self.no_speech and self.pipe.no_speech == "refuse":
            return DecodeOutput("", [], "no_speech", 0.0, 0.0)
        return self.cache.answer(self.pipe.tokenizer, req, on_piece)

    @property
    def prompt_tokens(self) -> int:
        return self.prefix_tokens + len(self.tokens)


# ------------------------------------------------------------------------------------------ the endpoint
class SessionLimit:
    """At most ``n`` streaming sessions at once."""

    def __init__(self, n: int):
        self.n, self.open = n, 0

    def acquire(self) -> bool:
        if self.open >= self.n:
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1


async def serve_session(ws: Any, engine: Any, scheduler: Any, cfg: ServerConfig, limit: SessionLimit,
                        check_key: Callable[[], None]) -> None:
    """The WebSocket ``/v1/audio/stream`` (protocol: the module's docstring)."""
    from starlette.websockets import WebSocketDisconnect

    try:
        check_key()
    except APIError:
        await ws.close(code=1008, reason="missing or wrong API key")
        return
    pipe = getattr(engine, "pipe", None)
    await ws.accept()

    async def fail(e: APIError, code: int = 1008) -> None:
        await ws.send_json({"type": "error", "error": e.body()["error"], "status": e.status})
        await ws.close(code=code)

    if pipe is None:
        await fail(APIError(400, "this server's model does not stream speech in"))
        return
    if not limit.acquire():
        await fail(APIError(429, f"{limit.n} streaming sessions are open; retry later", "rate_limit_error",
                            "too_many_sessions"), code=1013)
        return
    try:
        session, fmt, opts = None, "pcm_s16le", {}
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                try:
                    data = json.loads(msg["text"])
                    kind = data.get("type")
                except (ValueError, AttributeError):
                    await fail(APIError(400, "text messages must be JSON objects with a 'type'"))
                    return
                if kind == "start" and session is None:
                    opts = data
                    fmt = data.get("format", "pcm_s16le")
                    if fmt not in ("pcm_s16le", "f32le") or int(data.get("sample_rate", 16000)) != pipe.sample_rate:
                        await fail(APIError(400, f"audio must be {pipe.sample_rate} Hz mono pcm_s16le or f32le"))
                        return
                    continue
                if kind == "end":
                    break
                await fail(APIError(400, f"unexpected message type {kind!r} (start, end, or binary audio)"))
                return
            raw = msg.get("bytes") or b""
            if session is None:
                max_tokens = opts.get("max_tokens", cfg.default_max_tokens)
                if not isinstance(max_tokens, int) or not 1 <= max_tokens <= cfg.max_tokens:
                    await fail(APIError(400, f"max_tokens must be 1..{cfg.max_tokens}", code="max_tokens_too_large"))
                    return
                opts["max_tokens"] = max_tokens
                prompt = prompt_from_instruction(str(opts.get("instruction", "")))
                chat = bool(opts.get("chat"))
                session = await scheduler.call(lambda p=prompt, c=chat: StreamingSession(
                    pipe, p, c, cfg.stream_hop_s, cfg.stream_margin_s, context_s=cfg.stream_context_s))
            width = 2 if fmt == "pcm_s16le" else 4
            if len(raw) % width:
                await fail(APIError(400, f"a {fmt} chunk must be a whole number of {width}-byte samples"))
                return
            samples = (np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0 if width == 2
                       else np.frombuffer(raw, "<f4").astype(np.float32))
            if session.audio_s + len(samples) / session.sr > cfg.max_audio_s:
                await fail(APIError(400, f"the stream is over {cfg.max_audio_s:g} s of audio", code="audio_too_long"))
                return
            new = await scheduler.call(lambda s=samples, sess=session: sess.push(s))
            if new:
                await ws.send_json({"type": "tokens", "tokens": [x.to_dict() for x in new]})
        if session is None:
            await fail(APIError(400, "the stream ended before any audio"))
            return
        t_end = time.perf_counter()
        new = await scheduler.call(session.finish)
        if new:
            await ws.send_json({"type": "tokens", "tokens": [x.to_dict() for x in new]})
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        req = DecodeRequest([], max_new_tokens=opts["max_tokens"], stop=tuple(opts.get("stop") or ("\n",)))
        first: list[float] = []  # wall seconds from the end message to the first answer piece

        def on_piece(p: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, p)

        task = asyncio.ensure_future(scheduler.call(lambda: session.answer(req, on_piece)))
        while not (task.done() and pieces.empty()):
            getter = asyncio.ensure_future(pieces.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                first = first or [time.perf_counter() - t_end]
                await ws.send_json({"type": "delta", "content": getter.result()})
            else:
                getter.cancel()
        out = task.result()
        lat = [x.latency_s for x in session.tokens]
        await ws.send_json({
            "type": "done", "answer": out.answer, "transcript": session.transcript, "finish_reason": out.finish_reason,
            "speech_s": round(session.speech_s, 3), "no_speech": session.no_speech,
            "usage": {"prompt_tokens": session.prompt_tokens, "completion_tokens": len(out.token_ids),
                      "total_tokens": session.prompt_tokens + len(out.token_ids)},
            "latency": {"first_answer_token_s": round(session.finish_s + out.first_token_s, 4),
                        "token_vector_median_s": round(float(np.median(lat)), 4) if lat else None,
                        "first_piece_wall_s": round(first[0], 4) if first else None,
                        "passes": len(session.passes), "audio_s": round(session.audio_s, 3)}})
        await ws.close()
    except WebSocketDisconnect:
        return
    except APIError as e:
        await fail(e)
    finally:
        limit.release()
