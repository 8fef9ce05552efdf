"""What the worker thread does with a batch of chat requests: each clip through the pipeline's front end
(encoder, aligner in free mode, connector: :meth:`SpeechLMPipeline.speech`), each prompt around its vectors
(:meth:`SpeechLMPipeline.prefix`), then all answers in one decode loop (:func:`decode_batch`). A request that
asks for the Whisper cascade adds one more row: Whisper's transcript in place of the speech, the same LLM.

A clip in which the pipeline's voice-activity detector finds no speech (``no_speech``) follows the pipeline's
policy: ``refuse`` (the default) gets an empty answer without decoding, flagged in the extras.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from speechlm.errors import ConfigError, SpeechLMError
from speechlm.inference import SPEECH, Speech, SpeechLMPipeline
from speechlm.inference.batched import DecodeRequest, decode_batch, prefix_length
from speechlm.models.speechlm import SpeechSegment, TextSegment
from speechlm.serving.protocol import APIError, ChatRequest
from speechlm.serving.scheduler import Job


class Transcriber(Protocol):
    """The cascade's speech recogniser (e.g. :class:`speechlm.eval.asr.WhisperCascade`)."""

    sample_rate: int

    def transcribe(self, waves: list[torch.Tensor]) -> list[str]: ...


def empty_speech(pipe: SpeechLMPipeline, n: int = 0) -> Speech:
    """A Speech of ``n`` zero vectors (none: the cascade's text-only prompt; one: a placeholder)."""
    d = pipe.model.llm.get_input_embeddings().weight.shape[1]
    return Speech(SpeechSegment(torch.zeros(n, d, device=pipe.model.device), ids=[0] * n), "", [], 0.0, [], {})


def prompt_pieces(pipe: SpeechLMPipeline, prompt: str, chat: bool) -> tuple[TextSegment, TextSegment]:
    """(the text before the speech, BOS first; the text after it) of a prompt, as :meth:`SpeechLMPipeline.prefix`
    builds them."""
    segs = pipe.prefix(prompt, empty_speech(pipe, 1), chat)
    return segs[0], segs[2] if len(segs) == 3 else TextSegment([])


class PipelineEngine:
    """The model side of the server: a pipeline, optionally a cascade transcriber."""

    def __init__(self, pipe: SpeechLMPipeline, cascade: Transcriber | None = None, run: str = ""):
        self.pipe = pipe
        self.cascade = cascade
        self.run = run

    def info(self) -> dict[str, Any]:
        f = self.pipe.folders
        return {"run": self.run, "connector": str(f.connector) if f else "", "llm": str(f.llm) if f else "",
                "chat_template": bool(getattr(self.pipe.tokenizer, "chat_template", None)),
                "cascade": self.cascade is not None, "sample_rate": self.pipe.sample_rate}

    def _cascade_prefix(self, req: ChatRequest, transcript: str) -> list:
        """The prompt with Whisper's transcript as text where the speech would go (no speech vectors)."""
        prompt = req.prompt.replace(SPEECH, transcript.replace(SPEECH, "") + SPEECH)
        return self.pipe.prefix(prompt, empty_speech(self.pipe), req.chat)

    def run_batch(self, jobs: list[Job]) -> None:
        pipe = self.pipe
        rows: list[DecodeRequest] = []
        owners: list[tuple[int, str]] = []  # (job index, "ssr" | "cascade") per decode row
        state: list[dict[str, Any]] = []
        for k, job in enumerate(jobs):
            req: ChatRequest = job.request
            st: dict[str, Any] = {"error": None}
            state.append(st)
            try:
                t0 = time.perf_counter()
                speech = pipe.speech((req.wave, req.sample_rate))
                prefix = pipe.prefix(req.prompt, speech, req.chat)
                st.update(speech=speech, prefix_len=prefix_length(prefix), front_s=time.perf_counter() - t0)
                opts = {"max_new_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                        "stop": req.stop, "seed": req.seed, "no_repeat_ngram": req.no_repeat_ngram,
                        "cancelled": job.cancelled.is_set}
                # no speech: the pipeline's policy ("refuse": an empty answer, no decoding; "answer": the prompt alone)
                refuse = speech.no_speech and pipe.no_speech == "refuse"
                st["refused"] = refuse
                if not refuse:
                    rows.append(DecodeRequest(prefix, **opts))
                    owners.append((k, "ssr"))
                if req.cascade and self.cascade is not None:
                    from speechlm.data.audio import resample

                    wave = resample(req.wave, req.sample_rate, self.cascade.sample_rate)
                    [text] = self.cascade.transcribe([wave])
                    st["cascade_transcript"] = text
                    rows.append(DecodeRequest(self._cascade_prefix(req, text), **{**opts, "cancelled": lambda: False}))
                    owners.append((k, "cascade"))
            except ConfigError as e:
                st["error"] = APIError(400, str(e), param="speechlm.chat" if req.chat else None)
            except SpeechLMError as e:
                st["error"] = APIError(400, str(e), code="invalid_audio")
        for job, st in zip(jobs, state):
            if st["error"] is not None:
                job.put("error", st["error"])

        def on_piece(i: int, piece: str) -> None:
            k, kind = owners[i]
            if kind == "ssr":
                jobs[k].put("piece", piece)

        t_dec = time.perf_counter()
        outs = decode_batch(pipe.model, pipe.tokenizer, rows, on_piece) if rows else []
        results: dict[tuple[int, str], Any] = {owner: out for owner, out in zip(owners, outs)}
        for k, (job, st) in enumerate(zip(jobs, state)):
            if st["error"] is not None:
                continue
            speech = st["speech"]
            out = results.get((k, "ssr"))
            extras = speech.to_dict()
            extras["prompt"] = job.request.prompt
            timings = {**{n: round(v, 4) for n, v in speech.timings.items()},
                       "queue_s": round((job.started or t_dec) - job.arrived, 4),
                       "front_end_s": round(st["front_s"], 4)}
            if out is not None:
                timings["first_token_s"] = round(t_dec + out.first_token_s - job.arrived, 4)
                timings["total_s"] = round(t_dec + out.total_s - job.arrived, 4)
            else:
                timings["total_s"] = round(time.perf_counter() - job.arrived, 4)
            if extras.get("no_speech"):
                extras["warnings"].append("no speech detected: " + ("not answered" if st["refused"]
                                                                   else "answered from the prompt alone"))
            extras["timings"] = timings
            casc = results.get((k, "cascade"))
            if casc is not None:
                extras["cascade"] = {"transcript": st["cascade_transcript"], "answer": casc.answer}
            job.put("done", {"answer": out.answer if out else "", "finish_reason": out.finish_reason if out else "stop",
                             "prompt_tokens": st["prefix_len"], "completion_tokens": len(out.token_ids) if out else 0,
                             "extras": extras, "wave": speech.wave, "tokens": speech.tokens})
