"""SpeechLM: a trainable connector between a frozen speech encoder and a frozen causal LM; scoring and generation.

Sequences mix text and speech as a list of segments per example::

    [TextSegment([bos]), SpeechSegment(embeds (N, d_llm), ids=transcript), TextSegment(ending_ids, target=True)]

``build_inputs`` turns a batch of them into padded ``inputs_embeds (B, S, d_llm)``, ``attention_mask (B, S)``,
``labels (B, S)`` and ``position_ids (B, S)``. Labels follow the Hugging Face convention: ``labels[b, p]`` is
the token AT position p (-100 where not trained) and the loss shifts them (logits at p-1 predict labels at p).
A speech position i carries the connector vector of transcript token i, so its label is that token:
position i-1 predicts token i, exactly as for text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speechlm.errors import ModelError
from speechlm.models.connectors.base import (
    Connector,
    ConnectorOutput,
    check_encoder,
    check_llm,
    llm_identity,
    load_connector,
)

IGNORE = -100


@dataclass
class TextSegment:
    ids: list[int]
    target: bool = False  # its tokens are labels (training) / scored (evaluation)


@dataclass
class SpeechSegment:
    embeds: torch.Tensor  # (N, d_llm) connector vectors, padding removed
    ids: list[int] | None = None  # transcript tokens, one per vector; needed when target
    target: bool = False  # transcript tokens are labels / scored (the "S" condition)


Segment = TextSegment | SpeechSegment


@dataclass
class EmbeddedBatch:
    inputs_embeds: torch.Tensor  # (B, S, d_llm)
    attention_mask: torch.Tensor  # (B, S) long, 1 at real positions
    labels: torch.Tensor  # (B, S) long, -100 where not a target (unshifted, HF convention)
    position_ids: torch.Tensor  # (B, S) long, 0.. over real positions (also with left padding)


class SpeechLM(nn.Module):
    """Connector (trainable) + frozen causal LM (+ optional frozen SpeechEncoder).

    The LLM and encoder have ``requires_grad=False`` and stay in eval mode; ``train()`` only puts the
    LLM in train mode when LoRA or activation checkpointing needs it (HF checkpoints only in train mode).
    """

    def __init__(self, connector: Connector, llm: nn.Module, tokenizer: Any = None, encoder: nn.Module | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        check_llm(connector.cfg, llm, f"connector {connector.cfg.name}")
        if encoder is not None:
            check_encoder(connector.cfg, encoder, f"connector {connector.cfg.name}")
        # Record which models the connector belongs to, so save_pretrained names them.
        name, _, vocab = llm_identity(llm)
        connector.cfg.llm_name = connector.cfg.llm_name or name
        connector.cfg.llm_vocab_size = connector.cfg.llm_vocab_size or vocab
        if encoder is not None:
            connector.cfg.encoder_name = connector.cfg.encoder_name or Path(str(encoder.name)).name
            connector.cfg.encoder_layers = connector.cfg.encoder_layers or list(encoder.layers)
        self.connector = connector
        self.llm = llm.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.encoder = None
        if encoder is not None:
            # Frozen, except an adapted SpeechEncoder's adaptation parameters (model.encoder_adapt), which train
            adaptation = [p for p in getattr(encoder, "adaptation_parameters", list)() if p.requires_grad]
            self.encoder = encoder.requires_grad_(False).eval()
            for p in adaptation:
                p.requires_grad_(True)
        self.lora = False
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @classmethod
    def from_pretrained(cls, connector_folder: str | Path, llm: nn.Module | str | Path, tokenizer: Any = None,
                        encoder: nn.Module | None = None, **kwargs: Any) -> SpeechLM:
        """Load a saved connector and attach it to ``llm`` (a HF model or a model folder)."""
        if isinstance(llm, (str, Path)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if not Path(llm).is_dir():
                raise ModelError(f"{llm}: LLM folder not found")
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(llm))
            llm = AutoModelForCausalLM.from_pretrained(str(llm), torch_dtype=torch.float32)
        connector = load_connector(connector_folder, llm=llm, encoder=encoder)
        return cls(connector, llm, tokenizer=tokenizer, encoder=encoder, **kwargs)

    # ------------------------------------------------------------------------------ modes, params
    def train(self, mode: bool = True) -> SpeechLM:
        self.training = mode
        self.connector.train(mode)
        self.llm.train(mode and (self.lora or self.gradient_checkpointing))
        if self.encoder is not None:
            # a SpeechEncoder keeps its base weights in eval mode itself; only its adaptation follows ``mode``
            if getattr(self.encoder, "adaptation", None) is not None:
                self.encoder.train(mode)
            else:
                self.encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def apply_lora(self, r: int = 8, alpha: int = 16, target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
                   dropout: float = 0.0) -> None:
        """Wrap the LLM with PEFT LoRA adapters; only the LoRA matrices (and the connector) train."""
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                         bias="none", task_type="CAUSAL_LM")
        self.llm = get_peft_model(self.llm, cfg)
        for n, p in self.llm.named_parameters():
            p.requires_grad_("lora_" in n)
        self.lora = True
        self.train(self.training)

    def load_lora(self, folder: str | Path, trainable: bool = False) -> None:
        """Wrap the LLM with a saved PEFT LoRA adapter (e.g. the supervised mid-training stage's); with
        ``trainable`` its matrices go on training, otherwise they stay frozen with the rest of the LLM."""
        from peft import PeftModel

        if self.lora:
            raise ModelError(f"{folder}: the LLM already has a LoRA adapter")
        if not (Path(folder) / "adapter_config.json").is_file():
            raise ModelError(f"{folder}: no LoRA adapter here (adapter_config.json missing)")
        self.llm = PeftModel.from_pretrained(self.llm, str(folder), is_trainable=trainable)
        for n, p in self.llm.named_parameters():
            p.requires_grad_(trainable and "lora_" in n)
        self.lora = True
        self.train(self.training)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    # ---------------------------------------------------------------------------------- embeddings
    def llm_embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The LLM's raw input-embedding rows (unscaled): ids (...) -> (..., d_llm)."""
        return self.llm.get_input_embeddings()(ids)

    def speech_embeds(self, features: torch.Tensor, frame_lengths: torch.Tensor, boundaries: torch.Tensor | None = None,
                      token_mask: torch.Tensor | None = None) -> ConnectorOutput:
        """Connector vectors: features (B, L, T, D_enc), frame_lengths (B,) -> embeds (B, N, d_llm), mask (B, N)."""
        return self.connector(features, frame_lengths, boundaries, token_mask)

    def speech_embeds_from_audio(self, waves: list[torch.Tensor], boundaries: torch.Tensor | None = None,
                                 token_mask: torch.Tensor | None = None) -> ConnectorOutput:
        """Run the frozen encoder on raw audio, then the connector."""
        if self.encoder is None:
            raise ModelError("this SpeechLM has no encoder; pass features (e.g. from the feature cache)")
        with torch.no_grad():
            enc = self.encoder(waves)
        return self.speech_embeds(enc.features, enc.lengths, boundaries, token_mask)

    @staticmethod
    def speech_segments(out: ConnectorOutput, ids: list[list[int]] | None = None, target: bool = False) -> list[SpeechSegment]:
        """Split a batched ConnectorOutput into one SpeechSegment per example (padding dropped)."""
        segs = []
        for b in range(out.embeds.shape[0]):
            seg_ids = ids[b] if ids is not None else None
            segs.append(SpeechSegment(out.embeds[b][out.mask[b]], ids=seg_ids, target=target))
        return segs

    def build_inputs(self, batch: list[list[Segment]], padding_side: str = "right") -> EmbeddedBatch:
        """Pad a batch of segment lists into LLM inputs.

        ``padding_side="right"`` (training, scoring) puts padding after each sequence; ``"left"``
        (generation) puts it before, so every sequence ends at the last column and new tokens append.
        Position ids count real positions only, so both give the same logits at real positions.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        d = self.llm.get_input_embeddings().weight.shape[1]
        rows_e, rows_l = [], []
        for segments in batch:
            embeds, labels = [], []
            for seg in segments:
                if isinstance(seg, TextSegment):
                    ids = torch.tensor(seg.ids, dtype=torch.long, device=self.device)
                    embeds.append(self.llm_embed(ids).to(self.llm_dtype))
                    labels.append(ids if seg.target else torch.full_like(ids, IGNORE))
                else:
                    n = seg.embeds.shape[0]
                    if seg.embeds.shape[-1] != d:
                        raise ValueError(f"speech segment has width {seg.embeds.shape[-1]}, LLM expects {d}")
                    if seg.ids is not None and len(seg.ids) != n:
                        raise ValueError(f"speech segment has {n} vectors but {len(seg.ids)} transcript tokens")
                    if seg.target and seg.ids is None:
                        raise ValueError("a target speech segment needs its transcript ids")
                    embeds.append(seg.embeds.to(self.device, self.llm_dtype))
                    lab = torch.tensor(seg.ids, dtype=torch.long, device=self.device) if seg.target else None
                    labels.append(lab if lab is not None else torch.full((n,), IGNORE, dtype=torch.long, device=self.device))
            rows_e.append(torch.cat(embeds) if embeds else torch.zeros(0, d, device=self.device, dtype=self.llm_dtype))
            rows_l.append(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=self.device))
        s = max(1, max(len(r) for r in rows_e))
        b = len(batch)
        inputs = torch.zeros(b, s, d, device=self.device, dtype=self.llm_dtype)
        attn = torch.zeros(b, s, dtype=torch.long, device=self.device)
        labels = torch.full((b, s), IGNORE, dtype=torch.long, device=self.device)
        for i, (e, lab) in enumerate(zip(rows_e, rows_l)):
            n = len(e)
            sl = slice(0, n) if padding_side == "right" else slice(s - n, s)
            inputs[i, sl], attn[i, sl], labels[i, sl] = e, 1, lab
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)
        return EmbeddedBatch(inputs, attn, labels, position_ids)

    # ---------------------------------------------------------------------------------- LLM calls
    def lm_logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, S, V) of the LLM on ``inputs_embeds (B, S, d_llm)``; gradients flow to the inputs."""
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=inputs_embeds.to(self.llm_dtype), attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False)
        return out.logits

    def score_segments(self, batch: list[list[Segment]]) -> list[torch.Tensor]:
        """Log-probability of every target token given everything before it: one (n_targets,) tensor per example."""
        inputs = self.build_inputs(batch, padding_side="right")
        if (inputs.labels[:, 0] != IGNORE).any():
            raise ValueError("a scored token sits at position 0 with nothing before it; start the prefix with BOS")
        with torch.no_grad():
            logits = self.lm_logits(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
        out = []
        for b in range(len(batch)):
            pos = (inputs.labels[b, 1:] != IGNORE).nonzero().squeeze(1)  # predicting positions p -> token p+1
            logp = F.log_softmax(logits[b, pos].float(), dim=-1)  # (n, V)
            out.append(logp.gather(1, inputs.labels[b, pos + 1][:, None]).squeeze(1))
        return out

    def score(self, prefixes: list[list[Segment]], continuations: list[list[int]]) -> list[torch.Tensor]:
        """Per-token log-probs (n_i,) of text ``continuations[i]`` after ``prefixes[i]``; ``.sum()`` for the total."""
        if len(prefixes) != len(continuations):
            raise ValueError("one continuation per prefix")
        batch = [_untargeted(p) + [TextSegment(list(c), target=True)] for p, c in zip(prefixes, continuations)]
        return self.score_segments(batch)

    def score_speech(self, prefixes: list[list[Segment]], continuations: list[SpeechSegment]) -> list[torch.Tensor]:
        """The "S" condition: the continuation is speech; score its transcript tokens.

        Position i of the continuation carries the connector vector of transcript token i and predicts
        token i+1; its first token is predicted from the prefix's last position.
        """
        if len(prefixes) != len(continuations):
            raise ValueError("one continuation per prefix")
        batch = [_untargeted(p) + [SpeechSegment(c.embeds, ids=c.ids, target=True)] for p, c in zip(prefixes, continuations)]
        return self.score_segments(batch)

    def decoder(self, prefixes: list[list[Segment]]) -> IncrementalDecoder:
        """A KV-cached decoder over a batch of mixed text/speech ``prefixes`` (left-padded): its ``logits``
        (B, V) are the next-token scores; ``advance(ids)`` appends one token per row. The one decoding loop
        that greedy generation, the ASR read-out and the inference pipeline's sampling all drive."""
        return IncrementalDecoder(self, prefixes)

    @torch.no_grad()
    def generate(self, prefixes: list[list[Segment]], max_new_tokens: int, eos: int | list[int] | None = None,
                 min_new_tokens: int = 0) -> list[list[int]]:
        """Greedy decoding with a KV cache; returns the new token ids per example, up to (not including) EOS.

        The first ``min_new_tokens`` steps cannot pick an EOS id (as Hugging Face's ``min_new_tokens``).
        """
        eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        banned = torch.tensor(sorted(eos_ids), dtype=torch.long, device=self.device)
        dec = self.decoder(prefixes)
        b = len(prefixes)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        tokens: list[list[int]] = [[] for _ in range(b)]
        for step in range(max_new_tokens):
            logits = dec.logits
            if step < min_new_tokens and len(banned):
                logits = logits.index_fill(-1, banned, float("-inf"))
            nxt = logits.argmax(-1)  # (B,)
            for i in range(b):
                if not done[i]:
                    if int(nxt[i]) in eos_ids:
                        done[i] = True
                    else:
                        tokens[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            dec.advance(nxt)
        return tokens


class IncrementalDecoder:
    """Next-token logits after a batch of prefixes, advanced one token per row at a time with the LLM's
    KV cache (see :meth:`SpeechLM.decoder`). Rows that have finished still take a token (any id) so the
    batch stays rectangular; their outputs are simply ignored by the caller."""

    def __init__(self, model: SpeechLM, prefixes: list[list[Segment]]):
        self.model = model
        inputs = model.build_inputs([_untargeted(p) for p in prefixes], padding_side="left")
        self.attn, self.pos = inputs.attention_mask, inputs.position_ids
        with torch.no_grad():
            self._out = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=self.attn,
                                  position_ids=self.pos, use_cache=True)

    @property
    def logits(self) -> torch.Tensor:
        """(B, V) scores of the next token of every row."""
        return self._out.logits[:, -1]

    @property
    def length(self) -> int:
        """Positions held (padding included): a single row's prefix length."""
        return int(self.attn.shape[1])

    @torch.no_grad()
    def advance(self, ids: torch.Tensor) -> None:
        """Append ``ids`` (B,) (one token per row) and compute the next logits."""
        b = self.attn.shape[0]
        self.extend(self.model.llm_embed(ids.to(self.model.device).view(b, 1)))

    @torch.no_grad()
    def extend(self, embeds: torch.Tensor) -> None:
        """Append ``embeds`` (B, n, d_llm) (n positions to every row: speech vectors as they arrive, a text
        segment's embeddings) and compute the next logits; only the new positions run, the cache holds the rest."""
        b, n = embeds.shape[:2]
        self.attn = torch.cat([self.attn, torch.ones(b, n, dtype=self.attn.dtype, device=self.attn.device)], 1)
        self.pos = self.pos[:, -1:] + torch.arange(1, n + 1, device=self.pos.device)
        self._out = self.model.llm(inputs_embeds=embeds.to(self.model.device, self.model.llm_dtype),
                                   attention_mask=self.attn, position_ids=self.pos,
                                   past_key_values=self._out.past_key_values, use_cache=True)


def _untargeted(segments: list[Segment]) -> list[Segment]:
    """The same segments with every target flag off (a prefix is context, not scored)."""
    return [TextSegment(s.ids) if isinstance(s, TextSegment) else SpeechSegment(s.embeds, s.ids) for s in segments]
