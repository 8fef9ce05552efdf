"""Zero-shot ASR from connector vectors (greedy read-out through the frozen LLM), WER, and the Whisper cascade.

The read-out prompt is text around the speech vectors: ``prompt`` holds one ``{speech}`` placeholder,
e.g. ``"Repeat the text.\\nText: {speech}\\nRepeat:"``; the LLM then generates one line greedily. Stage-1
vectors imitate the LLM's own embeddings of the transcript, so a frozen LLM that can copy text can copy them.

The read-out uses what SSR knows: one vector per transcript token, so the transcript's token count
N is known (free boundaries: the tokens the aligner decoded; forced: the reference's). Decoding
(:func:`read_out`) therefore

* generates at most ``N + slack`` tokens (``slack`` 0 by default: the hypothesis cannot be longer than
  the transcript the vectors stand for; raise it when free-mode decoding tends to drop tokens), and at
  most ``max_new_tokens`` (a safety cap, and the only limit for connectors without token boundaries);
* stops at EOS or any token holding a newline (the end of the line);
* is never empty: until a token with a letter or digit is out, stop tokens and tokens without one
  (whitespace, punctuation, special tokens) are barred, so the first choice falls to the best word;
* never repeats an n-gram of its own output (``no_repeat_ngram``, 3 by default, 0 = off, as
  Hugging Face's ``no_repeat_ngram_size`` but over the generated tokens only: the prompt holds the
  transcript itself in the text-oracle row, which must stay copyable), which breaks the loops
  ("the away of the away of ...") that greedy decoding falls into.

The cascade baseline is what a user would pick instead: Whisper transcribes, the LLM reads the text.
``read_librivox_inputs`` reads real read speech (LibriVox, from Debian's ``pocketsphinx-testdata``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from speechlm.errors import ManifestError, ModelError
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
    return [SpeechInput(load_audio(u.audio_path, sample_rate, expected_sr=u.sample_rate), u.text, u.id, u.speaker)
            for u in rows]


def _split_prompt(prompt: str) -> tuple[str, str]:
    if prompt.count("{speech}") != 1:
        raise ValueError("the ASR prompt needs exactly one {speech} placeholder")
    before, after = prompt.split("{speech}")
    return before, after


_VOCAB_SETS: dict[int, tuple[list[int], list[int]]] = {}  # vocabulary hash -> (line ends, wordless ids)


def _vocab_sets(tok: Any) -> tuple[list[int], list[int]]:
    """(line-end ids, wordless ids) of a tokenizer, computed once (decoding a whole vocabulary takes ~0.2 s)."""
    key = hash((frozenset(tok.get_vocab().items()), tok.eos_token_id))
    if key not in _VOCAB_SETS:
        ends, wordless = set(), set()
        for i in range(len(tok)):
            piece = tok.decode([i], skip_special_tokens=True)
            if "\n" in piece:
                ends.add(i)
            if not any(ch.isalnum() for ch in piece):
                wordless.add(i)
        ends |= {i for i in (tok.eos_token_id,) if i is not None} | set(text_ids(tok, "\n"))
        _VOCAB_SETS[key] = sorted(ends), sorted(wordless | ends)
    return _VOCAB_SETS[key]


def line_end_ids(tok: Any) -> list[int]:
    """EOS and every token whose text holds a newline (a newline alone, two of them, a full stop and a
    newline, ...): where one line of read-out ends."""
    return _vocab_sets(tok)[0]


def wordless_ids(tok: Any) -> list[int]:
    """Tokens that put no letter or digit into the text (whitespace, punctuation, special tokens, line
    ends): barred until the read-out has its first word, so a line is never empty."""
    return _vocab_sets(tok)[1]


def repeated_ngram_bans(tokens: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in ``tokens`` (Hugging Face's no-repeat-n-gram rule);
    ``n <= 0``: none."""
    if n <= 0 or len(tokens) < n - 1:
        return set()
    if n == 1:
        return set(tokens)
    tail = tuple(tokens[len(tokens) - n + 1:])
    return {tokens[j + n - 1] for j in range(len(tokens) - n + 1) if tuple(tokens[j:j + n - 1]) == tail}


def token_limits(counts: Sequence[int | None], slack: int = 0, max_new_tokens: int = 256) -> list[int]:
    """Per-utterance generation limits: ``N + slack`` for a transcript of N tokens (at least 1, at most
    ``max_new_tokens``); ``max_new_tokens`` where N is unknown (``None``: a connector without boundaries)."""
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    cap = max_new_tokens if max_new_tokens > 0 else None
    out = []
    for n in counts:
        if n is None:
            if cap is None:
                raise ValueError("the transcript length is unknown (no token boundaries): set max_new_tokens > 0")
            out.append(cap)
        else:
            lim = max(1, n + slack)
            out.append(min(lim, cap) if cap is not None else lim)
    return out


@torch.no_grad()
def read_out(model: Any, prefixes: Sequence[Sequence[Any]], limits: Sequence[int], no_repeat_ngram: int = 3
             ) -> list[list[int]]:
    """Greedy generation of one line per prefix (see the module docstring): at most ``limits[i]`` (>= 1)
    tokens, up to (not including) the first line end, never without a word, no repeated
    ``no_repeat_ngram``-gram. ``model`` is a SpeechLM (its ``build_inputs``, ``llm``, ``llm_embed``);
    the prefixes are its text/speech segment lists. Returns the new token ids."""
    if len(limits) != len(prefixes):
        raise ValueError("one limit per prefix")
    if any(n < 1 for n in limits):
        raise ValueError("every limit must be at least 1 token")
    tok = model.tokenizer
    ends = set(line_end_ids(tok))
    dev = model.device
    wordless_set = set(wordless_ids(tok))
    wordless = torch.tensor(sorted(wordless_set), dtype=torch.long, device=dev)
    dec = model.decoder([list(p) for p in prefixes])
    b = len(prefixes)
    tokens: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    has_word = [False] * b
    for _ in range(max(limits)):
        logits = dec.logits.float()  # (B, V)
        nxt = logits.argmax(-1)
        for i in range(b):
            if done[i]:
                continue
            row = logits[i]
            bans = repeated_ngram_bans(tokens[i], no_repeat_ngram)
            if not has_word[i] or bans:
                row = row.clone()
                if not has_word[i]:
                    row[wordless] = float("-inf")
                if bans:
                    row[torch.tensor(sorted(bans), dtype=torch.long, device=dev)] = float("-inf")
            t = int(row.argmax())
            if row[t] == float("-inf") or t in ends:  # every token barred, or the line ends
                done[i] = True
                continue
            nxt[i] = t
            tokens[i].append(t)
            has_word[i] = has_word[i] or t not in wordless_set
            done[i] = len(tokens[i]) >= limits[i]
        if all(done):
            break
        dec.advance(nxt)
    return tokens


def _decode(tok: Any, ids: list[list[int]]) -> list[str]:
    return [tok.decode(x, skip_special_tokens=True).strip() for x in ids]


@torch.no_grad()
def transcribe_speechlm(model: Any, front: SpeechFrontEnd, inputs: Sequence[SpeechInput], prompt: str = DEFAULT_PROMPT,
                        max_new_tokens: int = 256, batch_size: int = 8, slack: int = 0, no_repeat_ngram: int = 3
                        ) -> list[str]:
    """Greedy read-out of each utterance's connector vectors through the frozen LLM: at most N + ``slack``
    tokens for N vectors (one per transcript token, SSR), see :func:`read_out`."""
    from speechlm.models.speechlm import TextSegment

    tok = model.tokenizer
    before, after = _split_prompt(prompt)
    pre_ids, post_ids = start_ids(tok) + text_ids(tok, before), text_ids(tok, after)
    out: list[str] = []
    for k in range(0, len(inputs), batch_size):
        segs = front.embed(inputs[k:k + batch_size])
        prefixes = [[TextSegment(pre_ids), s] + ([TextSegment(post_ids)] if post_ids else []) for s in segs]
        counts = [int(s.embeds.shape[0]) if getattr(front, "uses_boundaries", False) else None for s in segs]
        out += _decode(tok, read_out(model, prefixes, token_limits(counts, slack, max_new_tokens), no_repeat_ngram))
    return out


@torch.no_grad()
def transcribe_text_oracle(model: Any, texts: Sequence[str], prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 256,
                           batch_size: int = 8, slack: int = 0, no_repeat_ngram: int = 3) -> list[str]:
    """The read-out's ceiling: the same prompt and decoding with the reference transcript itself in place of
    the speech vectors (N = its own token count). A connector whose vectors equalled the LLM's embeddings
    would get this WER."""
    from speechlm.models.speechlm import TextSegment

    tok = model.tokenizer
    before, after = _split_prompt(prompt)
    out: list[str] = []
    for k in range(0, len(texts), batch_size):
        chunk = texts[k:k + batch_size]
        prefixes = [[TextSegment(start_ids(tok) + text_ids(tok, before + t + after))] for t in chunk]
        limits = token_limits([len(text_ids(tok, t)) for t in chunk], slack, max_new_tokens)
        out += _decode(tok, read_out(model, prefixes, limits, no_repeat_ngram))
    return out


# ------------------------------------------------------------------------------ LibriVox read speech
#: Where Debian's ``pocketsphinx-testdata`` puts five LibriVox utterances (Sense and Sensibility, ch. 1).
LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
_TRANSCRIPT_LINE = re.compile(r"^(?P<text>.*?)\s*\((?P<id>[^()\s]+)\)\s*$")


def read_transcription(path: str | Path) -> dict[str, str]:
    """A Sphinx ``transcription`` file (``<s> words </s> (fileid)`` per line) as ``{fileid: words}``."""
    path = Path(path)
    out: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = _TRANSCRIPT_LINE.match(line.strip())
        if not m:
            raise ManifestError(f"{path}:{lineno}: expected '<s> words </s> (fileid)'")
        words = [w for w in m.group("text").split() if w.lower() not in ("<s>", "</s>", "<sil>")]
        if not words:
            raise ManifestError(f"{path}:{lineno}: empty transcript for {m.group('id')!r}")
        out[m.group("id")] = " ".join(words)
    return out


def read_librivox_inputs(folder: str | Path = LIBRIVOX_DIR, sample_rate: int = 16000, limit: int | None = None
                         ) -> list[SpeechInput]:
    """The LibriVox read speech of ``pocketsphinx-testdata`` (``*.wav`` + ``transcription``) as SpeechInputs,
    speaker ``human:librivox/<reading>``; a missing folder says which package to install."""
    from speechlm.data.audio import load_audio

    folder = Path(folder)
    trans = folder / "transcription"
    if not trans.is_file():
        raise ManifestError(f"{folder}: no LibriVox test data ({trans.name} not found); install it with "
                            "`apt-get install pocketsphinx-testdata`, or point librivox_dir at a folder "
                            "of *.wav files and a Sphinx transcription file")
    out = []
    for fid, text in list(read_transcription(trans).items())[:limit]:
        wav = folder / f"{fid}.wav"
        reading = fid.rsplit("-", 1)[0]
        out.append(SpeechInput(load_audio(wav, sample_rate), text, fid, f"human:librivox/{reading}"))
    if not out:
        raise ManifestError(f"{trans}: no utterances")
    return out


class WhisperCascade:
    """Whisper (a converted ``WhisperForConditionalGeneration`` folder) as the cascade's transcriber.

    With ``transcripts`` (a folder) each clip's transcript is kept there by its samples and the model's files
    (:mod:`speechlm.eval.transcripts`), and a clip heard before is not run through Whisper again."""

    #: How it decodes (part of the transcript cache's key: change it when the decoding changes).
    SETTINGS = "generate(language=en, task=transcribe, max_new_tokens=200, greedy)"

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", transcripts: str | Path | None = None):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder}: no Whisper model folder (run tools/prepare_models.py)")
        self.processor = WhisperProcessor.from_pretrained(str(folder))
        self.model = WhisperForConditionalGeneration.from_pretrained(str(folder), torch_dtype=torch.float32)
        self.model.to(device).eval()
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)
        self.cache = None
        if transcripts:
            from speechlm.eval.transcripts import TranscriptCache, model_key

            self.cache = TranscriptCache(transcripts, model_key(folder, self.SETTINGS))

    def transcribe(self, waves: Sequence[torch.Tensor], batch_size: int = 8) -> list[str]:
        """Whisper's text of each clip (16 kHz mono), ``batch_size`` clips a forward pass."""
        from speechlm.eval.transcripts import transcribe_cached

        return transcribe_cached(lambda clips: self._transcribe(clips, batch_size), waves, self.cache)

    @torch.no_grad()
    def _transcribe(self, waves: Sequence[torch.Tensor], batch_size: int) -> list[str]:
        out: list[str] = []
        for k in range(0, len(waves), batch_size):
            chunk = [w.cpu().numpy() for w in waves[k:k + batch_size]]
            feats = self.processor(chunk, sampling_rate=self.sample_rate, return_tensors="pt").input_features
            ids = self.model.generate(feats.to(self.model.device), language="en", task="transcribe", max_new_tokens=200)
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out
