"""Behaviour checks of the converted default models (speechlm.models.convert): the LM prefers real text to the
same words scrambled; Whisper transcribes a synthesized sentence (it speaks with speechlm.data.tts, hence eval)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np

from speechlm.data.tts import synthesize
from speechlm.errors import ModelError


def lm_perplexity(model, tokenizer, text: str, prefix_token: str | None = None) -> float:
    """Perplexity of ``text`` under a causal LM, optionally after one ``prefix_token`` (not scored)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids  # (1, T)
    labels = ids
    if prefix_token is not None:
        ids = torch.cat([torch.tensor([[tokenizer.convert_tokens_to_ids(prefix_token)]]), ids], dim=1)
        labels = torch.cat([torch.tensor([[-100]]), labels], dim=1)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    return float(torch.exp(loss))


def scramble_words(text: str, seed: int = 0) -> str:
    """The same words in a shuffled order (a reproducible derangement-ish shuffle)."""
    words = text.split()
    rng = random.Random(seed)
    shuffled = words[:]
    while len(words) > 1 and shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(shuffled)


def check_smollm2(folder: Path, text: str) -> tuple[float, float]:
    """Load the converted LM and return perplexity of ``(text, text scrambled)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    # SmolLM2 was pretrained on documents separated by <|endoftext|>: the natural start of a text.
    plain = lm_perplexity(model, tokenizer, text, prefix_token="<|endoftext|>")
    return plain, lm_perplexity(model, tokenizer, scramble_words(text), prefix_token="<|endoftext|>")


def normalize_words(text: str) -> str:
    """Lower case, letters/digits/apostrophes only: the form WER is computed on."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def transcribe(folder: Path, wave_16k: np.ndarray) -> str:
    """Transcribe mono 16 kHz audio (1-D float, <= 30 s) with a converted Whisper folder."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    feats = processor(np.asarray(wave_16k, dtype=np.float32), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(feats.input_features, max_new_tokens=128)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def check_whisper(folder: Path, text: str) -> tuple[str, float]:
    """Synthesize ``text`` with eSpeak, transcribe it; returns ``(transcript, word error rate)``."""
    import jiwer

    synth = synthesize(text, sample_rate=16000)
    wave = synth.wave.numpy() if hasattr(synth.wave, "numpy") else np.asarray(synth.wave)
    if synth.sample_rate != 16000:
        raise ModelError(f"synthesize() returned {synth.sample_rate} Hz audio, asked for 16000")
    hyp = transcribe(folder, wave)
    return hyp, float(jiwer.wer(normalize_words(text), normalize_words(hyp) or "<empty>"))
