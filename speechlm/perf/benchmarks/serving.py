"""Serving benchmarks (tools/benchmarks/bench_serving.py): throughput of the OpenAI-compatible server with batching
against one request at a time, and the latency of speech streamed in.

* **Throughput.** The server (speechlm.serving.server, in this process on a free port) gets ``--requests``
  chat requests at once over HTTP (httpx), each a spoken clip of ``--clip-s`` seconds, greedy, no stop string,
  ``--max-tokens`` new tokens each; once with ``max_batch=1`` (one at a time through the same scheduler) and once
  with ``max_batch=--batch``. Reported: wall seconds, requests/s, answer tokens/s, and the ratio.
  The front end (encoder, aligner, connector) still runs clip by clip; only the decoder is batched.
* **Streaming.** A :class:`StreamingSession` gets the clip in 0.1 s chunks (no sleeping: the latency of a token
  assumes real-time arrival, see :attr:`StreamedToken.latency_s`). Reported, for the tokens closed before the end
  of the audio: the token -> vector latency (median, p90) and the same for the last token of each word (from the
  end of the word's audio to its vector), the passes and their mean compute against the hop (real-time factor), the first answer token
  after the end of the audio, against the offline path (the whole clip encoded after its end), and how far the
  streamed vectors are from the offline ones (cosine, when both decoded the same tokens); once re-encoding the
  whole buffer every hop, once only from ``--context-s`` before the last closed token.

``--run`` is a trained run; ``--random`` builds a random SSR connector and charCTC aligner over the embedded
Whisper base + SmolLM2-135M (the real model shapes, untrained weights: timing only).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from speechlm.atomic import atomic_write_text
from speechlm.inference import DEFAULT_PROMPT, SpeechLMPipeline
from speechlm.perf.benchmarks.inference import spoken_clip


def random_run(folder: Path) -> Path:
    """A run folder with a random SSR connector + charCTC aligner for the embedded Whisper base and SmolLM2-135M."""
    from transformers import AutoConfig

    from alignment.ctc_model import CTCAligner, char_ctc_config
    from speechlm.models.connectors import build_connector
    from speechlm.paths import SMOLLM2_135M, WHISPER_BASE, default_model

    enc, llm = default_model(WHISPER_BASE), default_model(SMOLLM2_135M)
    d_enc = AutoConfig.from_pretrained(enc).d_model
    llm_cfg = AutoConfig.from_pretrained(llm)
    torch.manual_seed(0)
    build_connector({"name": "ssr", "d_enc": d_enc, "d_llm": llm_cfg.hidden_size, "d_model": 256, "n_heads": 4,
                     "n_layers": 2, "stack": 2, "encoder_name": WHISPER_BASE, "encoder_layers": [6],
                     "llm_name": SMOLLM2_135M, "llm_vocab_size": llm_cfg.vocab_size}
                    ).save_pretrained(folder / "stage2" / "connector")
    CTCAligner(char_ctc_config(input_dim=d_enc, d_model=128, layers=1, heads=2, dropout=0.0, encoder_name=str(enc),
                               encoder_layers=[6])).save_pretrained(folder / "aligner")
    return folder


def _request(clip: torch.Tensor, sr: int, max_tokens: int) -> dict[str, Any]:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, clip.numpy(), sr, format="WAV")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return {"model": "speechlm", "max_tokens": max_tokens, "stop": [], "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "input_audio",
                                                       "input_audio": {"data": data, "format": "wav"}}]}]}


def throughput(pipe: SpeechLMPipeline, body: dict[str, Any], n: int, max_batch: int) -> dict[str, Any]:
    import httpx

    from speechlm.serving.config import ServerConfig
    from speechlm.serving.server import BackgroundServer, create_app

    cfg = ServerConfig(max_batch=max_batch, max_wait_ms=20, queue_size=max(n, 1), max_tokens=256,
                       request_timeout_s=3600)
    app = create_app(pipe, cfg)

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=n + 4)) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json=body) for _ in range(n)))

    with BackgroundServer(app) as url:
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=3600).raise_for_status()  # warm-up
        app.state.scheduler.batches.clear()
        t0 = time.perf_counter()
        rs = asyncio.run(fire(url))
        wall = time.perf_counter() - t0
    for r in rs:
        r.raise_for_status()
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in rs)
    return {"max_batch": max_batch, "requests": n, "wall_s": round(wall, 3), "requests_per_s": round(n / wall, 3),
            "answer_tokens_per_s": round(tokens / wall, 1), "answer_tokens": tokens,
            "batches": list(app.state.scheduler.batches)}


def streaming(pipe: SpeechLMPipeline, clip: torch.Tensor, hop_s: float, margin_s: float, max_tokens: int,
              context_s: float = 0.0) -> dict[str, Any]:
    from speechlm.inference.batched import DecodeRequest
    from speechlm.serving.streaming import StreamingSession

    sr = pipe.sample_rate
    s = StreamingSession(pipe, DEFAULT_PROMPT, hop_s=hop_s, margin_s=margin_s, context_s=context_s)
    step = int(0.1 * sr)
    for k in range(0, clip.numel(), step):
        s.push(clip[k:k + step].numpy())
    closed_early = len(s.tokens)
    out = s.answer(DecodeRequest([], max_new_tokens=max_tokens))
    first_stream = s.finish_s + out.first_token_s
    pipe.generate((clip, sr), max_new_tokens=max_tokens)  # warm
    offline = pipe.generate((clip, sr), max_new_tokens=max_tokens)
    speech = pipe.speech((clip, sr))
    lat = sorted(t.latency_s for t in s.tokens[:closed_early]) or [float("nan")]
    # a word's last token: the next one starts a new word (its text begins with a space)
    words = sorted(t.latency_s for t, nxt in zip(s.tokens[:closed_early], s.tokens[1:closed_early + 1])
                   if nxt.token[:1].isspace()) or [float("nan")]
    # streamed against offline: the token sequences matched (difflib), then the vectors of the matched tokens
    import difflib

    off_ids, str_ids = list(speech.segment.ids or []), list(s.segment.ids or [])
    sm = difflib.SequenceMatcher(a=off_ids, b=str_ids, autojunk=False)
    pairs = [(b.a + k, b.b + k) for b in sm.get_matching_blocks() for k in range(b.size)]
    drift: dict[str, Any] = {"streamed_tokens": len(str_ids), "offline_tokens": len(off_ids),
                             "matched_tokens": len(pairs), "token_match_ratio": round(sm.ratio(), 3),
                             "streamed_transcript": s.transcript, "offline_transcript": speech.transcript}
    if pairs:
        a = speech.segment.embeds[[i for i, _ in pairs]].float()
        b = s.segment.embeds[[j for _, j in pairs]].float()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        drift.update(cos_mean=round(float(cos.mean()), 4), cos_min=round(float(cos.min()), 4))
    passes = s.passes[:-1] or s.passes
    return {"clip_s": round(clip.numel() / sr, 2), "hop_s": hop_s, "margin_s": margin_s, "context_s": context_s,
            "tokens_closed_before_end": closed_early, "tokens": len(s.tokens),
            "token_to_vector_s": {"median": round(statistics.median(lat), 3), "p90": round(lat[int(0.9 * (len(lat) - 1))], 3)},
            "word_end_to_vector_s": {"median": round(statistics.median(words), 3), "words": len(words)},
            "passes": len(s.passes), "pass_mean_s": round(statistics.mean(passes), 3),
            "real_time_factor": round(statistics.mean(passes) / hop_s, 3),
            "first_answer_token_after_end_s": {"streamed": round(first_stream, 3),
                                               "offline": round(offline.timings["first_token_s"], 3)},
            "drift": drift}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="speechlm-bench-serving-") as tmp:
        run_dir = random_run(Path(tmp)) if args.random else Path(args.run)
        t0 = time.perf_counter()
        pipe = SpeechLMPipeline.from_run(run_dir, device=args.device)
        load_s = time.perf_counter() - t0
    clip = spoken_clip(args.clip_s, pipe.sample_rate)
    body = _request(clip, pipe.sample_rate, args.max_tokens)
    single = throughput(pipe, body, args.requests, 1)
    batched = throughput(pipe, body, args.requests, args.batch)
    stream_clip = spoken_clip(args.stream_clip_s, pipe.sample_rate)
    stream = [streaming(pipe, stream_clip, args.hop_s, args.margin_s, args.max_tokens, c) for c in (0.0, args.context_s)]
    report = {"date": datetime.date.today().isoformat(), "run": "random (whisper-base + smollm2-135m)" if args.random
              else args.run, "device": args.device, "threads": args.threads, "cpus": os.cpu_count(),
              "load_average_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__, "load_s": round(load_s, 1),
              "clip_s": args.clip_s, "max_tokens": args.max_tokens, "one_at_a_time": single, "batched": batched,
              "throughput_ratio": round(batched["requests_per_s"] / single["requests_per_s"], 2),
              "streaming": stream}
    print(f"{report['run']}: {args.requests} requests of a {args.clip_s:g} s clip, {args.max_tokens} answer tokens "
          f"each, {args.threads} thread(s), load average {report['load_average_1min']} on {report['cpus']} CPUs")
    print("\n| server | wall (s) | requests/s | answer tokens/s | batches |\n|---|---|---|---|---|")
    for name, r in (("one at a time (max_batch 1)", single), (f"batched (max_batch {args.batch})", batched)):
        print(f"| {name} | {r['wall_s']:.2f} | {r['requests_per_s']:.2f} | {r['answer_tokens_per_s']:.1f} | "
              f"{len(r['batches'])} |")
    print(f"\nthroughput ratio batched / one at a time: {report['throughput_ratio']:.2f}x\n")
    print("| streaming (re-encoded) | token -> vector median (s) | word end -> vector median (s) | pass (s) | "
          "first answer token after the end, streamed / offline (s) |\n|---|---|---|---|---|")
    for r in stream:
        d = r["drift"]
        print(f"drift (context {r['context_s']:g} s): {d['matched_tokens']} of {d['offline_tokens']} offline tokens "
              f"matched, vector cosine mean {d.get('cos_mean')} (min {d.get('cos_min')})")
    for r in stream:
        what = "whole buffer" if not r["context_s"] else f"from {r['context_s']:g} s before the last closed token"
        print(f"| {what} | {r['token_to_vector_s']['median']:.3f} | {r['word_end_to_vector_s']['median']:.3f} | "
              f"{r['pass_mean_s']:.3f} | {r['first_answer_token_after_end_s']['streamed']:.3f} / "
              f"{r['first_answer_token_after_end_s']['offline']:.3f} |")
    print()
    print(json.dumps(report, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return report
