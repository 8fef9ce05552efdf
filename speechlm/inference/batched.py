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

from speechlm.eval.asr import repeated_ngram_bans
from speechlm.inference import TextAssembler, pick_token
from speechlm.models.speechlm import Segment, SpeechLM, SpeechSegment, TextSegment


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
        self.generator = None
        if req.seed is not None and req.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(int(req.seed))
        self.tokens: list[int] = []
        self.done = False
        self.reason = "length"
        self.first_s: float | None = None
        self.total_s = 0.0


@torch.no_grad()
def decode_batch(model: SpeechLM, tokenizer, requests: Sequence[DecodeRequest],
                 on_piece: Callable[[int, str], None] | None = None) -> list[DecodeOutput]:
    """Answer every request in one left-padded batch; ``on_piece(row, text)`` gets each row's text pieces as
    they are decoded (they join to that row's answer)."""
    if not requests:
        return []
    t0 = time.perf_counter()
    eos = {tokenizer.eos_token_id} - {None}
    rows = [_Row(r, tokenizer, model.device) for r in requests]
    dec = model.decoder([list(r.prefix) for r in requests])

    def emit(i: int, piece: str) -> None:
        if piece and on_piece is not None:
            on_piece(i, piece)

    while True:
        logits = dec.logits.float()  # (B, V)
        nxt = torch.zeros(len(rows), dtype=torch.long)
        for i, row in enumerate(rows):
            if row.done:
                continue
            if row.req.cancelled():
                row.done, row.reason = True, "cancelled"
                continue
            lg = logits[i]
            bans = repeated_ngram_bans(row.tokens, row.req.no_repeat_ngram)
            if bans:
                lg = lg.index_fill(0, torch.tensor(sorted(bans), device=lg.device), float("-inf"))
            t = pick_token(lg, row.req.temperature, row.req.top_p, row.generator)
            nxt[i] = t
            if row.first_s is None:
                row.first_s = time.perf_counter() - t0
            if t in eos:
                row.done, row.reason = True, "stop"
            else:
                row.tokens.append(t)
                emit(i, row.text.push(t))
                if row.text.stopped:
                    row.done, row.reason = True, "stop"
                elif len(row.tokens) >= row.req.max_new_tokens:
                    row.done = True
            if row.done:
                emit(i, row.text.finish())
                row.total_s = time.perf_counter() - t0
        if all(r.done for r in rows):
            break
        dec.advance(nxt)
    end = time.perf_counter() - t0
    return [DecodeOutput(r.text.answer, list(r.text.ids), r.reason, r.first_s if r.first_s is not None else end,
                         r.total_s or end) for r in rows]


class PrefixCache:
    """One sequence's LLM prefix fed piece by piece into the KV cache, then greedy/sampled answers from it.

    ``extend(segment)`` runs the LLM on the new positions only (the cache holds the rest), so calling it for
    each speech vector as it arrives leaves only the tail of the prompt for the end. The logits equal those of
    the whole prefix run at once (same positions, causal attention), up to floating-point rounding."""

    def __init__(self, model: SpeechLM):
        self.model = model
        self.past = None
        self.length = 0
        self.logits: torch.Tensor | None = None  # (V,) after the last position

    @torch.no_grad()
    def extend(self, segment: Segment) -> None:
        m = self.model
        if isinstance(segment, TextSegment):
            if not segment.ids:
                return
            emb = m.llm_embed(torch.tensor(segment.ids, dtype=torch.long, device=m.device)).to(m.llm_dtype)
        else:
            assert isinstance(segment, SpeechSegment)
            if segment.embeds.shape[0] == 0:
                return
            emb = segment.embeds.to(m.device, m.llm_dtype)
        n = emb.shape[0]
        attn = torch.ones(1, self.length + n, dtype=torch.long, device=m.device)
        pos = torch.arange(self.length, self.length + n, device=m.device)[None]
        out = m.llm(inputs_embeds=emb[None], attention_mask=attn, position_ids=pos, past_key_values=self.past,
                    use_cache=True)
        self.past, self.length = out.past_key_values, self.length + n
        self.logits = out.logits[0, -1]

    @torch.no_grad()
    def answer(self, tokenizer, req: DecodeRequest, on_piece: Callable[[str], None] | None = None) -> DecodeOutput:
        """Decode from the cached prefix (``req.prefix`` is ignored: the cache is the prefix)."""
        if self.logits is None:
            raise ValueError("the prefix is empty")
        t0 = time.perf_counter()
        eos = {tokenizer.eos_token_id} - {None}
        row = _Row(req, tokenizer, self.model.device)
        while True:
            lg = self.logits.float()
            bans = repeated_ngram_bans(row.tokens, req.no_repeat_ngram)
            if bans:
                lg = lg.index_fill(0, torch.tensor(sorted(bans), device=lg.device), float("-inf"))
            t = pick_token(lg, req.temperature, req.top_p, row.generator)
            if row.first_s is None:
                row.first_s = time.perf_counter() - t0
            if t in eos:
                row.reason = "stop"
                break
            row.tokens.append(t)
            piece = row.text.push(t)
            if piece and on_piece:
                on_piece(piece)
            if row.text.stopped:
                row.reason = "stop"
                break
            if len(row.tokens) >= req.max_new_tokens:
                break
            self.extend(TextSegment([t]))
        tail = row.text.finish()
        if tail and on_piece:
            on_piece(tail)
        total = time.perf_counter() - t0
        return DecodeOutput(row.text.answer, list(row.text.ids), row.reason, row.first_s or total, total)
