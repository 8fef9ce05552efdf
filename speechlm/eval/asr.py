"""Zero-shot ASR from connector vectors (greedy read-out through the frozen LLM), WER, and the Whisper cascade.

The read-out prompt is text around the speech vectors: ``prompt`` holds one ``{speech}`` placeholder,
e.g. ``"Repeat the text.\\nText: {speech}\\nRepeat:"``; the LLM then generates greedily until EOS or a
newline. Stage-1 vectors imitate the LLM's own embeddings of the transcript, so a frozen LLM that can
copy text can copy them.

The cascade baseline is what a user would pick instead: Whisper transcribes, the LLM reads the text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from speechlm.errors import ModelError
from speechlm.eval.scoring import SpeechFrontEnd, SpeechInput, start_ids, text_ids

DEFAULT_PROMPT = "Repeat the text exactly.\nText: {speech}\nRepeat:"


def normalize_text(text: str) -> str:
    """Lower case, digits as words ("26" -> "twenty six", as our references spell them), punctuation removed
    (apostrophes kept), whitespace collapsed: the WER convention here."""
    from alignment.tokens import number_to_words

    text = text.lower().replace("\u2019", "'").replace(",", "")  # "1,000" is one number
    text = re.sub(r"\d+", lambda m: f" {number_to_words(int(m.group()))} ", text)
    text = re.sub(r"[^a-z' ]+", " ", text)
    return " ".join(text.split())


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (jiwer) on normalised text; an empty normalised reference is an error."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError("one hypothesis per reference")
    refs = [normalize_text(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("a reference transcript is empty after normalisation")
    return float(jiwer.wer(refs, [normalize_text(h) for h in hypotheses]))


def read_asr_inputs(manifest: str | Path, sample_rate: int = 16000, limit: int | None = None,
                    split: str | None = None) -> list[SpeechInput]:
    """Utterances of a manifest (the project's JSONL format) as SpeechInputs with reference transcripts."""
    from speechlm.data.audio import load_audio
    from speechlm.data.manifest import read_manifest

    rows = [u for u in read_manifest(manifest) if split is None or u.split == split][:limit]
    return [SpeechInput(load_audio(u.audio_path, sample_rate, expected_sr=u.sample_rate), u.text, u.id) for u in rows]


@torch.no_grad()
def transcribe_speechlm(model: Any, front: SpeechFrontEnd, inputs: Sequence[SpeechInput], prompt: str = DEFAULT_PROMPT,
                        max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy read-out of each utterance's connector vectors through the frozen LLM."""
    from speechlm.models.speechlm import TextSegment

    if prompt.count("{speech}") != 1:
        raise ValueError("the ASR prompt needs exactly one {speech} placeholder")
    tok = model.tokenizer
    before, after = prompt.split("{speech}")
    pre_ids, post_ids = start_ids(tok) + text_ids(tok, before), text_ids(tok, after)
    # Stop at EOS or at the first newline token: the read-out is one line.
    stops = {i for i in (tok.eos_token_id,) if i is not None} | set(text_ids(tok, "\n"))
    out: list[str] = []
    for k in range(0, len(inputs), batch_size):
        segs = front.embed(inputs[k:k + batch_size])
        prefixes = [[TextSegment(pre_ids), s] + ([TextSegment(post_ids)] if post_ids else []) for s in segs]
        for ids in model.generate(prefixes, max_new_tokens=max_new_tokens, eos=sorted(stops)):
            out.append(tok.decode(ids, skip_special_tokens=True).strip())
    return out


class WhisperCascade:
    """Whisper (a converted ``WhisperForConditionalGeneration`` folder) as the cascade's transcriber."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder}: no Whisper model folder (run tools/prepare_models.py)")
        self.processor = WhisperProcessor.from_pretrained(str(folder))
        self.model = WhisperForConditionalGeneration.from_pretrained(str(folder), torch_dtype=torch.float32)
        self.model.to(device).eval()
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)

    @torch.no_grad()
    def transcribe(self, waves: Sequence[torch.Tensor], batch_size: int = 8) -> list[str]:
        out: list[str] = []
        for k in range(0, len(waves), batch_size):
            chunk = [w.cpu().numpy() for w in waves[k:k + batch_size]]
            feats = self.processor(chunk, sampling_rate=self.sample_rate, return_tensors="pt").input_features
            ids = self.model.generate(feats.to(self.model.device), language="en", task="transcribe", max_new_tokens=200)
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out
