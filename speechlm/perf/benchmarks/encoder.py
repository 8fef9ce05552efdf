"""Encoder throughput on the real Whisper base, variable-length input against the standard 30 s padding
(tools/benchmarks/bench_encoder.py)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch

from speechlm.data.tts import synthesize
from speechlm.models.convert import prepare_model
from speechlm.models.encoder import SpeechEncoder
from speechlm.paths import WHISPER_BASE


def speech_clips(n: int, clip_s: float) -> list[torch.Tensor]:
    """``n`` clips of ~``clip_s`` seconds of synthetic read speech at 16 kHz."""
    spec = importlib.util.find_spec("gensim")
    corpus = Path(spec.origin).parent / "test" / "test_data" / "lee_background.cor"
    sentences = [s.strip() + "." for s in corpus.read_text(encoding="utf-8").split(".") if len(s.split()) > 5]
    clips, i = [], 0
    while len(clips) < n:
        text = ""
        while len(text.split()) < clip_s * 2.6:  # ~2.6 words a second at 175 wpm (a bit more, then cut)
            text += " " + sentences[i % len(sentences)]
            i += 1
        wave = synthesize(text.strip(), voice="en-us").wave
        clips.append(wave[: int(clip_s * 16000)])
    return clips


def throughput(enc: SpeechEncoder, clips: list[torch.Tensor], batch: int, repeats: int) -> tuple[float, float]:
    """(audio s per wall s, audio s per process CPU s), best of ``repeats``; CPU time is less hurt by a busy machine."""
    audio_s = sum(c.numel() for c in clips) / 16000
    enc(clips[:batch])  # warm-up
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(0, len(clips), batch):
            enc(clips[s: s + batch])
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return audio_s / wall, audio_s / cpu


def run(args: argparse.Namespace) -> None:
    """Throughput of both modes at batch 1 and ``args.batch``, then how close their features are."""
    torch.set_num_threads(args.threads)
    folder, _ = prepare_model(WHISPER_BASE)
    clips = speech_clips(args.clips, args.clip_s)
    audio_s = sum(c.numel() for c in clips) / 16000
    print(f"Whisper base ({folder}), {len(clips)} clips, {audio_s:.1f} s of speech, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    var = SpeechEncoder.from_pretrained(str(folder))
    pad = SpeechEncoder.from_pretrained(str(folder), whisper_pad_to_30s=True)
    for batch in sorted({1, args.batch}):
        for name, enc in (("variable-length", var), ("pad-to-30s", pad)):
            rate, cpu_rate = throughput(enc, clips, batch, args.repeats)
            print(f"  {name:16s} batch {batch}: {rate:7.1f} audio s / wall s  ({cpu_rate:6.1f} audio s / CPU s)")
    a, b = var(clips[:2]), pad(clips[:2])
    assert a.lengths.tolist() == b.lengths.tolist()
    for i in range(2):
        n = a.lengths[i]
        cos = torch.nn.functional.cosine_similarity(a.features[i, -1, :n], b.features[i, -1, :n], dim=-1)
        print(f"  clip {i}: {n} frames, per-frame cosine variable vs padded: mean {cos.mean():.3f}, "
              f"min {cos.min():.3f} (first 5 frames {cos[:5].mean():.3f}, last 5 {cos[-5:].mean():.3f}); "
              f"max |feature| {a.features[i].abs().max():.1f}")
