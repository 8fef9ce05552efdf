"""Likelihood scoring shared by every evaluation: text-only LLM scores, option choice, the speech front end.

A *continuation* is scored on exactly its own tokens: ``log p(c_1..c_n | prefix)`` as a per-token
``(n,)`` tensor; the evaluators compare options by its sum (``summed``) or its mean (``length_norm``).
Text is tokenised piecewise: the prefix alone, then the continuation alone with its leading space, so
the tokens of an option never depend on the tokens of the context (BPE splits at spaces anyway).

The speech front end turns waveforms into :class:`~speechlm.models.speechlm.SpeechSegment` s: frozen
encoder -> aligner boundaries (``free``: the aligner decodes its own transcript, the honest test-time
mode; ``forced``: the reference transcript is aligned, a labelled upper bound) -> connector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SCORINGS = ("summed", "length_norm")
BOUNDARY_MODES = ("free", "forced")


def rotation_partner(n: int, k: int, acceptable: Callable[[int], bool]) -> int | None:
    """The control conditions' pairing of item ``k`` of ``n``: the item half the set further on (deterministic,
    and away from neighbours in the set's order, which may share a topic), or the next one after it that
    ``acceptable(j)`` accepts; ``None`` when no other item is acceptable."""
    return next((j % n for j in range(k + n // 2, k + n // 2 + n) if j % n != k and acceptable(j % n)), None)


# ------------------------------------------------------------------------------------------ text
def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def start_ids(tokenizer: Any) -> list[int]:
    """The token every scored sequence starts with (BOS, else EOS), so the first real token is predicted.

    Without it the first token of a prefix would have nothing to be predicted from, and the speech
    conditions (whose first position is a connector vector) could not score from position 0.
    """
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tok is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token to start sequences with")
    return [int(tok)]


@torch.no_grad()
def score_text(llm: torch.nn.Module, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
               batch_size: int = 16) -> list[torch.Tensor]:
    """Per-token log-probs ``(n_i,)`` of ``continuations[i]`` after ``prefixes[i]`` under a causal LM.

    The LM reads ``prefix + continuation[:-1]`` (the last token is only a target), so requests that
    share that input, e.g. the four one-token answer letters of a question, share one forward pass.
    Inputs are right-padded and run in length-sorted batches; results come back in input order.
    The prefix must be non-empty (start it with :func:`start_ids`).
    """
    if len(prefixes) != len(continuations):
        raise ValueError("one continuation per prefix")
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i, (p, c) in enumerate(zip(prefixes, continuations)):
        if not p or not c:
            raise ValueError("prefix and continuation must both be non-empty")
        groups.setdefault((tuple(p), tuple(c[:-1])), []).append(i)
    device = llm.get_input_embeddings().weight.device
    keys = sorted(groups, key=lambda k: len(k[0]) + len(k[1]))
    out: list[torch.Tensor | None] = [None] * len(prefixes)
    for start in range(0, len(keys), batch_size):
        chunk = keys[start:start + batch_size]
        seqs = [list(p) + list(c) for p, c in chunk]
        s = max(len(x) for x in seqs)
        ids = torch.zeros(len(chunk), s, dtype=torch.long, device=device)
        attn = torch.zeros(len(chunk), s, dtype=torch.long, device=device)
        for r, x in enumerate(seqs):
            ids[r, :len(x)] = torch.tensor(x, device=device)
            attn[r, :len(x)] = 1
        logits = llm(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, S, V)
        for r, key in enumerate(chunk):
            n_p = len(key[0])
            for i in groups[key]:
                n_c = len(continuations[i])
                # logits at p-1 predict the token at p: continuation tokens sit at n_p .. n_p+n_c-1
                logp = F.log_softmax(logits[r, n_p - 1:n_p + n_c - 1].float(), dim=-1)  # (n_c, V)
                target = torch.tensor(list(continuations[i]), device=device)
                out[i] = logp.gather(1, target[:, None]).squeeze(1).cpu()
    return out  # type: ignore[return-value]


@torch.no_grad()
def next_token_logprobs(model: Any, prefixes: Sequence[Sequence[Any]]) -> torch.Tensor:
    """``(B, V)`` log-distribution of the token after each mixed text/speech prefix (one pass each).

    Equal to :meth:`SpeechLM.score` of a one-token continuation, but every candidate token (e.g. the
    four answer letters) is read from the same pass.
    """
    inputs = model.build_inputs([list(p) for p in prefixes], padding_side="right")
    logits = model.lm_logits(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)  # (B, S, V)
    last = inputs.attention_mask.sum(1) - 1  # (B,) last real position
    return F.log_softmax(logits[torch.arange(len(prefixes)), last].float(), dim=-1).cpu()


def aggregate(logprobs: torch.Tensor, scoring: str) -> float:
    """One option's score from its per-token log-probs: ``summed`` or ``length_norm`` (mean per token)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, not {scoring!r}")
    if logprobs.numel() == 0:
        return float("-inf")
    return float(logprobs.sum()) if scoring == "summed" else float(logprobs.mean())


def choose(option_logprobs: Sequence[torch.Tensor], scoring: str) -> int:
    """Index of the best-scoring option (the first one on ties)."""
    scores = [aggregate(lp, scoring) for lp in option_logprobs]
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


# ---------------------------------------------------------------------------------------- speech
@dataclass
class SpeechInput:
    """One utterance to turn into connector vectors: the waveform and, where known, its transcript."""

    wave: torch.Tensor  # (T,) float32 at the encoder's sample rate
    text: str | None = None  # reference transcript (needed for forced boundaries only)
    id: str = "?"
    speaker: str | None = None  # the voice or manifest speaker ("festival:ked_diphone/r175/p50"), for by-engine reports


class SpeechFrontEnd:
    """Waveforms -> SpeechSegments through a SpeechLM's encoder, an aligner and its connector.

    ``aligner`` is an :class:`alignment.aligner.Aligner` (any object with the same ``align`` method).
    Connectors without token boundaries (the stack/conv/Q-Former baselines) need no aligner; their
    segments carry no transcript ids, so they cannot be scored in the all-speech ("S") condition.
    ``aligner_encoder``: the encoder whose frames the aligner reads when they are not the connector's (an
    aligner trained with an adapted encoder: :meth:`alignment.aligner.Aligner.load_encoder`).
    """

    def __init__(self, model: Any, aligner: Any = None, mode: str = "free", aligner_encoder: Any = None):
        if mode not in BOUNDARY_MODES:
            raise ValueError(f"boundary mode must be one of {BOUNDARY_MODES}, not {mode!r}")
        if model.encoder is None:
            raise ValueError("the SpeechLM needs its speech encoder to evaluate from audio")
        self.model = model
        self.aligner = aligner
        self.aligner_encoder = aligner_encoder
        self.mode = mode
        self.uses_boundaries = model.connector.cfg.name == "ssr"
        self.failures: list[str] = []  # utterances that got no boundaries (see _align)
        # None, or a dict: then every input is embedded once, its segment kept for the next call that passes the
        # same SpeechInput object (an evaluation that scores the same audio under several conditions sets it)
        self.memo: dict[int, tuple[SpeechInput, Any]] | None = None
        if self.uses_boundaries and aligner is None:
            raise ValueError("the SSR connector needs an aligner for test-time boundaries")

    @property
    def label(self) -> str:
        """What made the boundaries, for reports: ``free`` / ``forced`` / ``none`` (baseline connector)."""
        return self.mode if self.uses_boundaries else "none"

    def _align(self, features: torch.Tensor, lengths: torch.Tensor, texts: list[str | None], ids: list[str],
               target_lengths: torch.Tensor) -> list[Any]:
        """Aligner results on the aligner's frames, boundaries on the connector's ``target_lengths`` frames; an
        utterance the aligner cannot handle (e.g. free mode decodes nothing from a short word) gets no tokens:
        an empty segment, counted in ``failures``, never a crash."""
        from types import SimpleNamespace

        from speechlm.errors import AlignmentError

        rate = self.model.connector.cfg.frame_rate_hz
        try:
            return self.aligner.align(features, lengths, texts, utt_ids=ids, target_frame_rate_hz=rate,
                                      target_num_frames=[int(n) for n in target_lengths])
        except AlignmentError:
            pass
        out = []
        for b in range(len(texts)):
            try:
                [r] = self.aligner.align(features[b:b + 1], lengths[b:b + 1], texts[b:b + 1], utt_ids=ids[b:b + 1],
                                         target_frame_rate_hz=rate, target_num_frames=[int(target_lengths[b])])
            except AlignmentError as e:
                log.warning("no boundaries (%s): the utterance gets no speech vectors", e)
                self.failures.append(str(e))
                r = SimpleNamespace(token_ids=[], token_boundaries=[])
            out.append(r)
        return out

    def embed(self, inputs: Sequence[SpeechInput]) -> list[Any]:
        """One SpeechSegment per input (ids = the aligned transcript tokens for SSR, else None); with ``memo``
        set, only the inputs it has not seen go through the encoder, aligner and connector."""
        if self.memo is None:
            return self._embed(inputs)
        todo = list({id(x): x for x in inputs if id(x) not in self.memo}.values())
        if todo:  # the input is kept with its segment, so its id() cannot be reused while the memo holds it
            self.memo.update((id(x), (x, seg)) for x, seg in zip(todo, self._embed(todo)))
        return [self.memo[id(x)][1] for x in inputs]

    @torch.no_grad()
    def _embed(self, inputs: Sequence[SpeechInput]) -> list[Any]:
        from speechlm.models.speechlm import SpeechSegment

        enc = self.model.encoder([x.wave for x in inputs])
        features, lengths = enc.features, enc.lengths
        if not self.uses_boundaries:
            out = self.model.speech_embeds(features, lengths)
            return self.model.speech_segments(out)
        texts = [None if self.mode == "free" else x.text for x in inputs]
        if self.mode == "forced" and any(t is None for t in texts):
            raise ValueError("forced boundaries need the reference transcript of every utterance")
        if self.aligner_encoder is not None:
            own = self.aligner_encoder([x.wave for x in inputs])
            results = self._align(own.features, own.lengths, texts, [x.id for x in inputs], lengths)
        else:
            results = self._align(features, lengths, texts, [x.id for x in inputs], lengths)
        n = max(1, max(len(r.token_ids) for r in results))
        bounds = torch.zeros(len(inputs), n, dtype=torch.long)
        mask = torch.zeros(len(inputs), n, dtype=torch.bool)
        for b, r in enumerate(results):
            bounds[b, :len(r.token_boundaries)] = torch.tensor(r.token_boundaries, dtype=torch.long)
            mask[b, :len(r.token_boundaries)] = True
        dev = self.model.device
        out = self.model.speech_embeds(features.to(dev), lengths.to(dev), bounds.to(dev), mask.to(dev))
        segs = self.model.speech_segments(out, ids=[list(r.token_ids) for r in results])
        return [SpeechSegment(s.embeds, ids=s.ids) for s in segs]


def connector_label(folder: str, among: Sequence[str] = ()) -> str:
    """A connector's name in reports: its folder's last two parts (``stage2/connector``), or as many more as it takes
    to tell it apart from the other folders ``among`` (``ab_kl/stage2/connector`` beside ``tiny/stage2/connector``)."""
    from pathlib import Path

    parts = Path(folder).resolve().parts
    others = [Path(f).resolve().parts for f in among if Path(f).resolve().parts != parts]
    k = 2
    while k < len(parts) and any(o[-k:] == parts[-k:] for o in others):
        k += 1
    return "/".join(parts[-k:])


def load_front_end(connector_folder: str, llm: torch.nn.Module, tokenizer: Any, aligner_folder: str = "",
                   mode: str = "free", encoder_folder: str = "", device: str = "cpu",
                   encoder_adapt_folder: str = "") -> tuple[Any, SpeechFrontEnd]:
    """(SpeechLM, SpeechFrontEnd) for a saved connector on ``llm``: its encoder (the folder the connector
    names, inside the models cache unless ``encoder_folder`` is given) and, for SSR, an aligner folder.

    An encoder adaptation trained with the connector (``model.encoder_adapt``) is installed, frozen: the one in
    ``encoder_adapt_folder``, else the ``encoder_adapt/`` folder the stage exported beside the connector."""
    from pathlib import Path

    from speechlm.errors import ModelError
    from speechlm.models.connectors import load_connector
    from speechlm.models.encoder import SpeechEncoder
    from speechlm.models.speechlm import SpeechLM
    from speechlm.paths import models_dir

    cfg = load_connector(connector_folder, llm=llm).cfg
    enc_path = Path(encoder_folder) if encoder_folder else models_dir() / Path(cfg.encoder_name or "whisper-base").name
    if not enc_path.is_dir():
        raise ModelError(f"{enc_path}: encoder folder of connector {connector_folder} not found")
    encoder = SpeechEncoder(str(enc_path), layers=tuple(cfg.encoder_layers or (-1,)))
    adapt = Path(encoder_adapt_folder) if encoder_adapt_folder else Path(connector_folder).parent / "encoder_adapt"
    if encoder_adapt_folder or adapt.is_dir():
        encoder.adapt({"train": False}, folder=adapt)
    model = SpeechLM.from_pretrained(connector_folder, llm, tokenizer=tokenizer, encoder=encoder).to(device).eval()
    aligner = None
    if cfg.name == "ssr":
        if not aligner_folder:
            raise ModelError(f"connector {connector_folder} is SSR: give an aligner folder for test-time boundaries")
        from alignment.aligner import Aligner

        aligner = Aligner.from_pretrained(aligner_folder, tokenizer, device=device)
        if aligner.encoder_adapt is not None:  # its frames: the encoder with the aligner's own adaptation
            return model, SpeechFrontEnd(model, aligner, mode, aligner_encoder=aligner.load_encoder(enc_path))
    return model, SpeechFrontEnd(model, aligner, mode)
