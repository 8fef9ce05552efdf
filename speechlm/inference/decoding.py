"""Token-by-token decoding for one sequence: the next token from logits (greedy, or temperature / top-p
sampling), the KV-cached token loop, and the answer text assembled from the tokens (stop strings, pieces that
join to the answer). :mod:`speechlm.inference.pipeline` answers with them; its names are re-exported there."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from speechlm.eval.asr import repeated_ngram_bans
from speechlm.models.speechlm import Segment, SpeechLM


def pick_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> int:
    """The next token from ``(V,)`` logits: the argmax (``temperature <= 0``), else a sample of
    ``softmax(logits / temperature)`` cut to the smallest set of tokens holding ``top_p`` of the mass."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < top_p  # the mass before a token is below top_p: always keeps the best one
        probs = torch.zeros_like(probs).scatter(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def next_token(logits: torch.Tensor, history: Sequence[int], temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None, no_repeat_ngram: int = 0) -> int:
    """:func:`pick_token` from ``(V,)`` logits after banning every token that would repeat an n-gram of
    ``history`` (the tokens generated so far; ``no_repeat_ngram`` 0: no bans)."""
    logits = logits.float()
    bans = repeated_ngram_bans(history, no_repeat_ngram)
    if bans:
        logits = logits.index_fill(0, torch.tensor(sorted(bans), device=logits.device), float("-inf"))
    return pick_token(logits, temperature, top_p, generator)


@torch.no_grad()
def sample_tokens(model: SpeechLM, prefix: Sequence[Segment], temperature: float = 0.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, no_repeat_ngram: int = 0) -> Iterator[int]:
    """Tokens after one mixed text/speech ``prefix``, one per ``next()``, driving :meth:`SpeechLM.decoder`
    (the KV-cached loop greedy generation uses too). Endless: the caller stops it (EOS, a limit, a stop
    string); the forward pass for a token runs only when the next one is asked for."""
    dec = model.decoder([list(prefix)])
    tokens: list[int] = []
    while True:
        t = next_token(dec.logits[0], tokens, temperature, top_p, generator, no_repeat_ngram)
        tokens.append(t)
        yield t
        dec.advance(torch.tensor([t]))


class TextAssembler:
    """Generated token ids -> answer text pieces: cut at the first stop string after the leading whitespace,
    outer whitespace dropped, and only text that can no longer change released (not a possible stop-string
    start, not half a UTF-8 character, not trailing whitespace), so the pieces always join to the answer."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self.released = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        lead = len(text) - len(text.lstrip())  # stops count once the answer has begun (a leading "\n" is no answer)
        cuts = [text.find(s, lead) for s in self.stop if s in text[lead:]]
        if cuts:
            text, self.stopped = text[:min(cuts)], True
        self.text = text
        return self._release(final=self.stopped)

    def finish(self) -> str:
        return self._release(final=True)

    @property
    def answer(self) -> str:
        return self.text.strip()

    def _release(self, final: bool) -> str:
        safe = self.text.lstrip()
        if not final:
            safe = safe.rstrip("\ufffd")  # a character whose bytes are not all out yet
            hold = max((k for s in self.stop for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
            safe = safe[:len(safe) - hold]
        safe = safe.rstrip()
        if not safe.startswith(self.released):  # decoding changed released text (rare); keep what was given
            return ""
        piece, self.released = safe[len(self.released):], safe
        return piece
