"""Latency of one answer from a trained run: a spoken clip through SpeechLMPipeline.generate, timed per stage
(tools/benchmarks/bench_inference.py)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from speechlm.atomic import atomic_write_text
from speechlm.inference import SpeechLMPipeline

TEXT = ("Tom went to the store to buy some bread and milk. On the way home he met his old friend, "
        "and they talked about the weather for a while.")
STAGES = (("vad_s", "voice activity"), ("encode_s", "encoder"), ("align_s", "aligner (free)"), ("connector_s", "connector"),
          ("first_token_s", "first token"), ("total_s", "whole answer"))


def spoken_clip(seconds: float, sample_rate: int = 16000) -> torch.Tensor:
    """``seconds`` of eSpeak NG reading :data:`TEXT` (cut, or padded with silence)."""
    from speechlm.data.audio import resample
    from speechlm.data.tts import synthesize

    s = synthesize(TEXT, voice="en-us")
    wave = resample(s.wave, s.sample_rate, sample_rate)
    n = int(seconds * sample_rate)
    return wave[:n] if wave.numel() >= n else torch.cat([wave, wave.new_zeros(n - wave.numel())])


def run(args: argparse.Namespace) -> dict:
    """One warm-up answer, ``args.repeats`` timed ones; the table and the JSON report."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = SpeechLMPipeline.from_run(args.run, device=args.device)
    load_s = time.perf_counter() - t0
    clip = spoken_clip(args.clip_s, pipe.sample_rate)
    options = {"sample_rate": pipe.sample_rate, "max_new_tokens": args.max_new_tokens}
    pipe.generate(clip, **options)  # warm-up: first calls allocate and build kernels
    results = [pipe.generate(clip, **options) for _ in range(args.repeats)]
    timings = {k: [r.timings[k] for r in results] for k, _ in STAGES}
    last = results[-1]
    n_answer = len(last.token_ids)
    decode_s = statistics.median(r.timings["total_s"] - r.timings["first_token_s"] for r in results)
    report = {
        "date": datetime.date.today().isoformat(), "run": args.run,
        "connector": str(pipe.folders.connector) if pipe.folders else "", "device": args.device,
        "threads": args.threads, "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "torch": torch.__version__, "clip_s": args.clip_s, "repeats": args.repeats, "load_s": round(load_s, 2),
        "speech_tokens": len(last.tokens), "answer_tokens": n_answer, "answer": last.answer,
        "transcript": last.transcript,
        "median_s": {k: round(statistics.median(v), 4) for k, v in timings.items()},
        "min_s": {k: round(min(v), 4) for k, v in timings.items()},
        "decode_tokens_per_s": round((n_answer - 1) / decode_s, 1) if n_answer > 1 and decode_s > 0 else None,
    }
    print(f"{args.run}: {args.clip_s:g} s clip, {len(last.tokens)} speech tokens, answer of {n_answer} tokens, "
          f"{args.threads} thread(s), {args.repeats} repeats, load average {report['load_average_1min']} on "
          f"{report['cpus']} CPUs (models loaded in {load_s:.1f} s)")
    print("\n| stage | median (s) | fastest (s) |\n|---|---|---|")
    for key, name in STAGES:
        print(f"| {name} | {report['median_s'][key]:.3f} | {report['min_s'][key]:.3f} |")
    print(f"\nanswer: {last.answer!r}\ntranscript: {last.transcript!r}\n")
    print(json.dumps(report, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return report
