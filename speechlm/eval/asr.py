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


def _split_prompt(prompt: str) -> tuple[str, str]:
    if prompt.count("{speech}") != 1:
        raise ValueError("the ASR prompt needs exactly one {speech} placeholder")
    before, after = prompt.split("{speech}")
    return before, after


_LINE_ENDS: dict[int, list[int]] = {}  # vocabulary hash -> line-end ids (decoding a whole vocabulary takes ~0.2 s)


def line_end_ids(tok: Any) -> list[int]:
    """EOS and every token whose text holds a newline (a newline alone, two of them, a full stop and a
    newline, ...): where one line of read-out ends."""
    key = hash((frozenset(tok.get_vocab().items()), tok.eos_token_id))
    if key not in _LINE_ENDS:
        ids = {i for i in range(len(tok)) if "\n" in tok.decode([i])}
        ids |= {i for i in (tok.eos_token_id,) if i is not None} | set(text_ids(tok, "\n"))
        _LINE_ENDS[key] = sorted(ids)
    return _LINE_ENDS[key]


def _read_out(model: Any, prefixes: list[list[Any]], max_new_tokens: int) -> list[str]:
    """Greedy generation of one line: it stops at EOS or a newline, but not before its first token."""
    tok = model.tokenizer
    ids = model.generate(prefixes, max_new_tokens=max_new_tokens, eos=line_end_ids(tok), min_new_tokens=1)
    return [tok.decode(x, skip_special_tokens=True).strip() for x in ids]


@torch.no_grad()
def transcribe_speechlm(model: Any, front: SpeechFrontEnd, inputs: Sequence[SpeechInput], prompt: str = DEFAULT_PROMPT,
                        max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy read-out of each utterance's connector vectors through the frozen LLM."""
    from speechlm.models.speechlm import TextSegment

    tok = model.tokenizer
    before, after = _split_prompt(prompt)
    pre_ids, post_ids = start_ids(tok) + text_ids(tok, before), text_ids(tok, after)
    out: list[str] = []
    for k in range(0, len(inputs), batch_size):
        segs = front.embed(inputs[k:k + batch_size])
        prefixes = [[TextSegment(pre_ids), s] + ([TextSegment(post_ids)] if post_ids else []) for s in segs]
        out += _read_out(model, prefixes, max_new_tokens)
    return out


@torch.no_grad()
def transcribe_text_oracle(model: Any, texts: Sequence[str], prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64,
                           batch_size: int = 8) -> list[str]:
    """The read-out's ceiling: the same prompt and decoding with the reference transcript itself in place of
    the speech vectors. A connector whose vectors equalled the LLM's embeddings would get this WER."""
    from speechlm.models.speechlm import TextSegment

    tok = model.tokenizer
    before, after = _split_prompt(prompt)
    out: list[str] = []
    for k in range(0, len(texts), batch_size):
        prefixes = [[TextSegment(start_ids(tok) + text_ids(tok, before + t + after))] for t in texts[k:k + batch_size]]
        out += _read_out(model, prefixes, max_new_tokens)
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
