"""What each stage trains: the module DeepSpeed wraps, ``forward(batch) -> (loss, metrics)``.

Frozen weights are only ever touched inside their own submodule's ``forward``, so ZeRO-3 (which
gathers a partitioned parameter when its module is called) works unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from speechlm.data.batching import Batch, encode_batch
from speechlm.errors import ConfigError
from speechlm.models.connectors.base import Connector
from speechlm.training import losses


class TokenEmbedding(nn.Module):
    """A frozen copy of the LLM's input-embedding table: the stage-1 targets, and nearest-token look-ups."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(table.detach().clone().float(), requires_grad=False)

    def forward(self, ids: torch.Tensor, query: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
                contrast: tuple[torch.Tensor, int, float] | None = None
                ) -> tuple[torch.Tensor, tuple[int, int] | None, tuple[torch.Tensor, dict] | None]:
        """Rows of ``ids`` (..., d); with ``query`` (B, N, d), also (correct, total) nearest-row accuracy; with
        ``contrast`` = (vectors (B, N, d), negatives, temperature), also the sampled-softmax loss of those vectors
        against the table (:func:`losses.sampled_softmax_loss`, masked by ``query_mask``). Everything that reads
        the table happens here, inside this module's forward, so that ZeRO-3 has gathered it."""
        rows = nn.functional.embedding(ids, self.weight)
        acc = None
        if query is not None:
            acc = losses.nearest_token_accuracy(query, self.weight, ids, query_mask)
        softmax = None
        if contrast is not None:
            vectors, negatives, temperature = contrast
            softmax = losses.sampled_softmax_loss(vectors, self.weight, ids, query_mask, negatives, temperature)
        return rows, acc, softmax


def encode_in_module(batch: Batch, encoder: nn.Module | None, dtype: torch.dtype) -> Batch:
    """A batch still holding waves (BatchPrep.encode_in_module) encoded by the module's own (adapted) encoder,
    with gradients for its adaptation; batches with features pass through unchanged."""
    if batch.features is not None or encoder is None:
        return batch
    batch = encode_batch(batch, encoder)
    return replace(batch, features=batch.features.to(dtype))


class Stage1Distill(nn.Module):
    """Connector trained to reproduce the LLM's raw embedding of each transcript token; the LLM never runs.

    ``encoder``: an adapted SpeechEncoder (model.encoder_adapt) run inside this module, so that its adaptation's
    parameters train with the connector; None (default) when features come ready-made (cache or BatchPrep).
    """

    def __init__(self, connector: Connector, embedding: TokenEmbedding, mse_weight: float = 1.0,
                 cosine_weight: float = 5.0, encoder: nn.Module | None = None, contrastive_weight: float = 0.0,
                 contrastive_temperature: float = 0.05, contrastive_negatives: int = 4096):
        super().__init__()
        self.connector = connector
        self.embedding = embedding.requires_grad_(False)
        self.mse_weight, self.cosine_weight = mse_weight, cosine_weight
        self.encoder = encoder
        # The sampled-softmax term (losses.sampled_softmax_loss); weight 0: distillation alone.
        self.contrastive_weight = contrastive_weight
        self.contrastive_temperature, self.contrastive_negatives = contrastive_temperature, contrastive_negatives

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        batch = encode_in_module(batch, self.encoder, next(self.connector.parameters()).dtype)
        out = self.connector(batch.features, batch.frame_lengths, batch.boundaries, batch.token_mask)
        mask = out.mask & batch.token_mask
        want_acc = not self.training
        contrast = ((out.embeds, self.contrastive_negatives, self.contrastive_temperature)
                    if self.contrastive_weight > 0 else None)
        target, acc, softmax = self.embedding(batch.token_ids, out.embeds.detach() if want_acc else None, mask,
                                              contrast)
        loss, parts = losses.distill_loss(out.embeds, target.to(out.embeds.dtype), mask, self.mse_weight,
                                          self.cosine_weight)
        metrics = {"mse": float(parts["mse"]), "cosine": float(parts["cosine"]), "tokens": int(mask.sum())}
        if softmax is not None:
            c_loss, c_parts = softmax
            loss = loss + self.contrastive_weight * c_loss
            metrics.update(contrastive=float(c_loss.detach()), sampled_acc=float(c_parts["sampled_acc"]))
        metrics["loss"] = float(loss.detach())
        if acc is not None:
            metrics.update(acc_correct=acc[0], acc_total=acc[1])
        return loss, metrics


OBJECTIVES = ("ntp", "supervised")


class Stage2Finetune(nn.Module):
    """Speech in, text out through the frozen (or LoRA-adapted) LLM, plus optional stage-1 and text-LM terms.

    ``objective="ntp"`` (stage 2): next-token prediction on the speech itself (SSR: vector i predicts token
    i+1; baselines: the clip as a prefix of its transcript). ``objective="supervised"`` (the mid-training
    stage): each row is ``[BOS] prompt-before [speech vectors] prompt-after answer``, only the answer (and its
    EOS) scored; the batches carry the prompts and answers (``Batch.tasks``, speechlm.data.tasks).
    """

    def __init__(self, speechlm: nn.Module, bos_id: int | None = None, distill_weight: float = 0.0,
                 mse_weight: float = 1.0, cosine_weight: float = 5.0, text_weight: float = 1.0,
                 objective: str = "ntp", kl_weight: float = 0.0, kl_temperature: float = 1.0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
        self.objective = objective
        self.speechlm = speechlm  # SpeechLM: connector + frozen llm
        self.bos_id = bos_id
        self.distill_weight, self.mse_weight, self.cosine_weight = distill_weight, mse_weight, cosine_weight
        self.text_weight = text_weight
        self.per_token = bool(getattr(speechlm.connector, "uses_boundaries", False))
        if distill_weight > 0 and not self.per_token:
            raise ConfigError(f"distill_weight={distill_weight}: the stage-1 loss needs one vector per transcript "
                              f"token (SSR); the {speechlm.connector.cfg.name!r} connector has none: set "
                              "distill_weight=0")
        # Behaviour distillation (losses.behaviour_kl): speech positions must line up with the transcript's.
        self.kl_weight, self.kl_temperature = kl_weight, kl_temperature
        if kl_weight > 0 and (not self.per_token or objective != "ntp"):
            raise ConfigError(f"kl.weight={kl_weight}: behaviour distillation compares the LLM given one vector per "
                              "transcript token with the LLM given the transcript (SSR, objective=ntp); the "
                              f"{speechlm.connector.cfg.name!r} connector with objective={objective!r} has no such "
                              "alignment: set kl.weight=0")

    def _logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.speechlm.lm_logits(inputs_embeds, attention_mask)

    def prefix(self, device: torch.device) -> torch.Tensor | None:
        """(P, d) embeddings put before every sequence: the BOS row when the LLM has one."""
        if self.bos_id is None:
            return None
        return self.speechlm.llm_embed(torch.tensor([self.bos_id], device=device))

    def speech_loss(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        return losses.speech_ntp_loss(self._logits, embeds, ids, mask, self.prefix(ids.device))

    def speech_loss_and_kl(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
                           ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """:meth:`speech_loss` and the behaviour KL from one LLM pass on the speech (plus one, without gradients,
        on the transcript's own embeddings: the teacher)."""
        prefix = self.prefix(ids.device)
        inputs, attn, labels = losses.speech_ntp_inputs(embeds, ids, mask, prefix)
        logits = self._logits(inputs, attn)
        loss, n = losses.next_token_loss(logits, labels)
        with torch.no_grad():
            t_inputs, t_attn, _ = losses.speech_ntp_inputs(self.speechlm.llm_embed(ids).to(embeds.dtype), ids, mask,
                                                           prefix)
            teacher = self._logits(t_inputs, t_attn)
        return loss, n, losses.behaviour_kl(logits, teacher, labels, self.kl_temperature)

    def text_loss(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        return losses.text_ntp_loss(self._logits, self.speechlm.llm_embed, ids, mask, self.prefix(ids.device))

    def task_loss(self, embeds: torch.Tensor, mask: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
        """The supervised objective: mean loss over the answers' tokens (EOS included) and their count."""
        from speechlm.models.speechlm import SpeechSegment, TextSegment

        if batch.tasks is None:
            raise ConfigError("objective=supervised: the batches carry no task prompts (the reader needs "
                              "tasks=SupervisedTasks(...))")
        bos = [self.bos_id] if self.bos_id is not None else []
        rows = [[TextSegment(bos + t.before), SpeechSegment(embeds[b][mask[b]]), TextSegment(t.after),
                 TextSegment(t.target, target=True)] for b, t in enumerate(batch.tasks)]
        inputs = self.speechlm.build_inputs(rows, padding_side="right")
        logits = self.speechlm.lm_logits(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
        return losses.next_token_loss(logits, inputs.labels)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        batch = encode_in_module(batch, self.speechlm.encoder, next(self.speechlm.connector.parameters()).dtype)
        out = self.speechlm.speech_embeds(batch.features, batch.frame_lengths, batch.boundaries, batch.token_mask)
        embeds = out.embeds
        if self.objective == "supervised":
            loss, n = self.task_loss(embeds, out.mask, batch)
            metrics: dict[str, float] = {"loss_task": float(loss.detach()), "targets": n}
        elif self.per_token and self.kl_weight > 0:
            loss, n, kl = self.speech_loss_and_kl(embeds, batch.token_ids, batch.token_mask)
            metrics = {"loss_speech": float(loss.detach()), "kl": float(kl.detach()), "targets": n}
            loss = loss + self.kl_weight * kl
        elif self.per_token:
            loss, n = self.speech_loss(embeds, batch.token_ids, batch.token_mask)
            metrics = {"loss_speech": float(loss.detach()), "targets": n}
        else:  # a baseline: the whole clip as a prefix, then the transcript
            loss, _n_all, rest = losses.prefix_ntp_loss(self._logits, embeds, out.mask, batch.token_ids,
                                                        batch.token_mask, self.prefix(batch.token_ids.device),
                                                        self.speechlm.llm_embed)
            # loss_speech: the targets the text loss scores (tokens 1..N-1); unlike SSR's, each is predicted having
            # heard the whole clip, so it can fall below the text loss. loss_prefix: what trains, token 0 included.
            n = int((batch.token_mask.sum(1) - 1).clamp(min=0).sum())
            metrics = {"loss_speech": float(rest), "loss_prefix": float(loss.detach()), "targets": n}
        if self.distill_weight > 0:
            target = self.speechlm.llm_embed(batch.token_ids).detach()
            mask = out.mask & batch.token_mask
            d_loss, parts = losses.distill_loss(embeds, target.to(embeds.dtype), mask, self.mse_weight,
                                                self.cosine_weight)
            loss = loss + self.distill_weight * d_loss
            metrics.update(distill=float(d_loss.detach()), cosine=float(parts["cosine"]), mse=float(parts["mse"]))
        if batch.text_ids is not None:
            t_loss, _ = self.text_loss(batch.text_ids, batch.text_mask)
            loss = loss + self.text_weight * t_loss
            metrics["loss_text_lm"] = float(t_loss.detach())
        if not self.training and self.objective == "ntp":  # validation: the same LLM on the transcripts themselves
            t_loss, _ = self.text_loss(batch.token_ids, batch.token_mask)
            metrics["loss_text"] = float(t_loss)
        metrics["loss"] = float(loss.detach())
        return loss, metrics


# ----------------------------------------------------------------------------------------- leakage
def _samples_for_frames(encoder: nn.Module, frames: int, samples_per_frame: float) -> int:
    """The fewest samples from which ``encoder`` yields ``frames`` frames.

    frames x hop is not enough for every encoder: w2v-BERT's 25 ms fbank window needs 240 samples
    more, so a cut there would end one frame early (and a token ending in frame 0 would get no frame).
    """
    n = max(1, round(frames * samples_per_frame))
    step = max(1, round(samples_per_frame / 4))
    for _ in range(16):
        if int(encoder.frame_lengths(torch.tensor([n]))[0]) >= frames:
            break
        n += step
    return n


@torch.no_grad()
def truncated_vectors(connector: Connector, encoder: nn.Module, wave: torch.Tensor, boundaries: list[int]
                      ) -> torch.Tensor:
    """(N, d_llm): token i's vector recomputed from the audio CUT at its end boundary.

    The encoder is bidirectional, so in the full clip the frame read for token i has already heard
    token i+1; here it has not. One encoder pass per distinct boundary (batched), one connector pass.
    """
    sr, rate = encoder.sample_rate, connector.cfg.frame_rate_hz
    ends = sorted(set(boundaries))
    cuts = [min(wave.numel(), _samples_for_frames(encoder, b + 1, sr / rate)) for b in ends]
    enc = encoder([wave[:c] for c in cuts])  # features (U, L, T, D), lengths (U,)
    dev = next(connector.parameters()).device
    n = len(boundaries)
    bnd = torch.tensor(boundaries, dtype=torch.long)[None].expand(len(ends), n)
    bnd = torch.minimum(bnd, (enc.lengths - 1).clamp(min=0)[:, None])
    mask = torch.ones(len(ends), n, dtype=torch.bool)
    dtype = next(connector.parameters()).dtype
    out = connector(enc.features.to(dev, dtype), enc.lengths.to(dev), bnd.to(dev), mask.to(dev))
    which = torch.tensor([ends.index(b) for b in boundaries], device=dev)
    return out.embeds[which, torch.arange(n, device=dev)]  # (N, d)


@torch.no_grad()
def leakage_losses(module: Stage2Finetune, encoder: nn.Module, wave: torch.Tensor, token_ids: list[int],
                   boundaries: list[int]) -> dict[str, float]:
    """Summed speech NTP loss of one utterance, full audio vs audio cut at each token's boundary.

    Both run the encoder on the fly on the same audio, so their difference is the leakage alone.
    Returns {"plain": sum, "cut": sum, "targets": n}.
    """
    connector = module.speechlm.connector
    dev = next(connector.parameters()).device
    dtype = next(connector.parameters()).dtype
    ids = torch.tensor([token_ids], dtype=torch.long, device=dev)
    mask = torch.ones_like(ids, dtype=torch.bool)
    enc = encoder([wave])
    bnd = torch.tensor([boundaries], dtype=torch.long).clamp(max=int(enc.lengths[0]) - 1)
    full = connector(enc.features.to(dev, dtype), enc.lengths.to(dev), bnd.to(dev), mask)
    plain, n = module.speech_loss(full.embeds, ids, mask)
    cut_vecs = truncated_vectors(connector, encoder, wave, [min(b, int(enc.lengths[0]) - 1) for b in boundaries])
    cut, _ = module.speech_loss(cut_vecs[None], ids, mask)
    return {"plain": float(plain) * n, "cut": float(cut) * n, "targets": n}
