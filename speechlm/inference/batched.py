"""Several requests' answers through one KV-cached decode loop (the server's batching, speechlm.serving).

    from speechlm.inference.batched import DecodeRequest, decode_batch

    reqs = [DecodeRequest(pipe.prefix(prompt, pipe.speech(clip))) for clip in clips]
    outs = decode_batch(pipe.model, pipe.tokenizer, reqs, on_piece=lambda i, piece: ...)
    outs[0].answer, outs[0].token_ids, outs[0].finish_reason

The prefixes (text and speech segments, as :meth:`SpeechLMPipeline.prefix` builds them) are left-padded into one
batch with an attention mask and position ids that count real positions only (:meth:`SpeechLM.decoder`, the
same loop the one-at-a-time path drives), so a row's logits do not depend on the other rows: greedy answers are
the ones :meth:`SpeechLMPipeline.generate` gives for each request alone (tested). Every row keeps its own
sampling options (temperature, top-p, seed, no-repeat n-grams), its own stop strings and token limit, and its
own :class:`TextAssembler`, so streamed pieces join to exactly its answer. Finished rows still take a token
(their outputs are ignored) until the whole batch is done; a row whose ``cancelled()`` turns true is finished.

:class:`PrefixCache` is the one-sequence variant for speech that arrives while it is recorded: the prefix is
fed to the LLM piece by piece (text, then speech vectors as they come), so at the end only the last vectors and
the prompt's tail remain before the first answer token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from speechlm.inference import TextAssembler
from speechlm.inference.decoding import next_token
from speechlm.models.speechlm import IncrementalDecoder, Segment, SpeechLM, SpeechSegment, TextSegment


@dataclass
class DecodeRequest:
    """One request's prefix and decoding options (the meaning of each as in :meth:`SpeechLMPipeline.generate`)."""

    prefix: list[Segment]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ("\n",)
    seed: int | None = None
    no_repeat_ngram: int = 0
    cancelled: Callable[[], bool] = field(default=lambda: False)


@dataclass
class DecodeOutput:
    answer: str
    token_ids: list[int]  # every generated token (a stop string's tokens included; EOS not)
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens), "cancelled"
    first_token_s: float  # seconds from the batch's start to this row's first token
    total_s: float


def prefix_length(prefix: Sequence[Segment]) -> int:
    """LLM positions a prefix takes (text tokens + speech vectors): a request's prompt tokens."""
    return sum(len(s.ids) if isinstance(s, TextSegment) else int(s.embeds.shape[0]) for s in prefix)


class _Row:
    def __init__(self, req: DecodeRequest, tokenizer, device: torch.device):
        self.req = req
        self.text = TextAssembler(tokenizer, tuple(req.stop or ()))
        self.eos = {tokenizer.eos_token_id} - {None}
        self.generator = None
        if req.seed is not None and req.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(int(req.seed))
        self.tokens: list[int] = []
        self.done = False
        self.reason = "length"
        self.first_s: float | None = None
        self.total_s = 0.0

    def take(self, logits: torch.Tensor, elapsed_s: float) -> tuple[int, str]:
        """The row's next token from its (V,) logits and the answer text it releases; marks the row done at EOS,
        a stop string or its token limit (the text's last piece is then released too)."""
        t = next_token(logits, self.tokens, self.req.temperature, self.req.top_p, self.generator,
                       self.req.no_repeat_ngram)
        if self.first_s is None:
            self.first_s = elapsed_s
        piece = ""
        if t in self.eos:
            self.done, self.reason = True, "stop"
        else:
            self.tokens.append(t)
            piece = self.text.push(t)
            if self.text.stopped:
                self.done, self.reason = True, "stop"
            elif len(self.tokens) >= self.req.max_new_tokens:
                self.done = True
        if self.done:
            piece += self.text.finish()
            self.total_s = elapsed_s
        return t, piece


@torch.no_grad()
def decode_batch(model: SpeechLM, tokenizer, requests: Sequence[DecodeRequest],
                 on_piece: Callable[[int, str], None] | None = None,
                 decoder: IncrementalDecoder | None = None) -> list[DecodeOutput]:
    """Answer every request in one left-padded batch; ``on_piece(row, text)`` gets each row's text pieces as
    they are decoded (they join to that row's answer). ``decoder``: go on from a decoder that already holds the
    prefixes (the requests' own ``prefix`` is then not read; :class:`PrefixCache`)."""
    if not requests:
        return []
    t0 = time.perf_counter()
    rows = [_Row(r, tokenizer, model.device) for r in requests]
    dec = decoder if decoder is not None else model.decoder([list(r.prefix) for r in requests])
    while True:
        logits = dec.logits  # (B, V)
        nxt = torch.zeros(len(rows), dtype=torch.long)
        for i, row in enumerate(rows):
            if row.done:
                continue
            if row.req.cancelled():
                row.done, row.reason = True, "cancelled"
                continue
            nxt[i], piece = row.take(logits[i], time.perf_counter() - t0)
            if piece and on_piece is not None:
                on_piece(i, piece)
        if all(r.done for r in rows):
            break
        dec.advance(nxt)
    end = time.perf_counter() - t0
    return [DecodeOutput(r.text.answer, list(r.text.ids), r.reason, r.first_s if r.first_s is not None else end,
                         r.total_s or end) for r in rows]


class PrefixCache:
    """One sequence's LLM prefix fed piece by piece into the KV cache, then greedy/sampled answers from it.

    ``extend(segment)`` runs the LLM on the new positions only (:meth:`IncrementalDecoder.extend`; the cache holds
    the rest), so calling it for each speech vector as it arrives leaves only the tail of the prompt for the end.
    The logits equal those of the whole prefix run at once (same positions, causal attention), up to
    floating-point rounding."""

    def __init__(self, model: SpeechLM):
        self.model = model
        self.decoder: IncrementalDecoder | None = None  # started by the first non-empty segment

    @property
    def length(self) -> int:
        """LLM positions fed so far."""
        return self.decoder.length if self.decoder is not None else 0

    @torch.no_grad()
    def extend(self, segment: Segment) -> None:
        if (len(segment.ids) if isinstance(segment, TextSegment) else segment.embeds.shape[0]) == 0:
            return
        if self.decoder is None:
            self.decoder = self.model.decoder([[segment]])
            return
        m = self.model
        if isinstance(segment, TextSegment):
            emb = m.llm_embed(torch.tensor(segment.ids, dtype=torch.long, device=m.device))
        else:
            assert isinstance(segment, SpeechSegment)
            emb = segment.embeds
        self.decoder.extend(emb[None])

    @torch.no_grad()
    def answer(self, tokenizer, req: DecodeRequest, on_piece: Callable[[str], None] | None = None) -> DecodeOutput:
        """Decode from the cached prefix (``req.prefix`` is ignored: the cache is the prefix)."""
        if self.decoder is None:
            raise ValueError("the prefix is empty")
        emit = (lambda _i, piece: on_piece(piece)) if on_piece is not None else None
        return decode_batch(self.model, tokenizer, [req], emit, decoder=self.decoder)[0]
