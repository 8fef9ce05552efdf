"""The stage module, assembled in one place: connector + frozen LLM (or its embedding table) + encoder ->
Stage1Distill / Stage2Finetune, for the stage recipes, the training benchmark and the GPU check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speechlm.errors import ConfigError
from speechlm.models.connectors.base import Connector, load_connector
from speechlm.models.encoder_adapt import EncoderAdaptConfig
from speechlm.models.speechlm import SpeechLM
from speechlm.training import build
from speechlm.training.configs import Stage1Config, Stage2Config
from speechlm.training.deepspeed_engine import train_dtype
from speechlm.training.stages import OBJECTIVES, Stage1Distill, Stage2Finetune, TokenEmbedding

VARIANTS = ("frozen", "lora", "multitask")


@dataclass
class StageParts:
    """What a stage run holds besides the module: the pieces its data, exports and checks need."""

    model: nn.Module  # Stage1Distill or Stage2Finetune: what DeepSpeed wraps
    connector: Connector
    tokenizer: Any
    enc: build.EncoderFacts
    encoder: Any = None  # the loaded encoder (None when features come from the cache)
    adapt: EncoderAdaptConfig | None = None  # the encoder's adaptation; None: the frozen encoder
    embedding: TokenEmbedding | None = None  # stage 1: the targets
    speechlm: SpeechLM | None = None  # stage 2: connector + LLM (+ LoRA)


def check_stage2(cfg: Stage2Config) -> None:
    """Refuse an unknown ``variant`` or ``objective`` before anything is loaded."""
    if cfg.variant not in VARIANTS:
        raise ConfigError(f"variant must be frozen, lora or multitask, not {cfg.variant!r}")
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, not {cfg.objective!r}")


# ------------------------------------------------------------------------ from models already in hand
def stage1_module(cfg: Stage1Config, connector: Connector, table: torch.Tensor,
                  encoder: nn.Module | None = None) -> Stage1Distill:
    """Stage 1 around ``connector``: ``table`` is the LLM's input-embedding table (the targets); ``encoder`` an
    adapted encoder that runs inside the module (None: features come ready-made)."""
    c = cfg.contrastive
    return Stage1Distill(connector, TokenEmbedding(table), cfg.mse_weight, cfg.cosine_weight, encoder=encoder,
                         contrastive_weight=c.weight, contrastive_temperature=c.temperature,
                         contrastive_negatives=c.negatives)


def stage2_speechlm(cfg: Stage2Config, connector: Connector, llm: nn.Module, tokenizer: Any = None,
                    encoder: nn.Module | None = None) -> SpeechLM:
    """Connector + frozen LLM, with the LoRA of ``variant`` / ``model.init_lora`` installed."""
    speechlm = SpeechLM(connector, llm, tokenizer=tokenizer, encoder=encoder,
                        gradient_checkpointing=cfg.model.gradient_checkpointing)
    train_lora = cfg.variant in ("lora", "multitask")
    if cfg.model.init_lora:  # e.g. the mid-training stage's adapter: go on training it, or keep it frozen
        speechlm.load_lora(cfg.model.init_lora, trainable=train_lora)
    elif train_lora:
        speechlm.apply_lora(cfg.lora.r, cfg.lora.alpha, tuple(cfg.lora.targets), cfg.lora.dropout)
    return speechlm


def stage2_module(cfg: Stage2Config, speechlm: SpeechLM, bos_id: int | None) -> Stage2Finetune:
    """Stage 2 around ``speechlm``; ``bos_id``: the LLM's BOS token (used only when ``cfg.bos``)."""
    return Stage2Finetune(speechlm, bos_id if cfg.bos else None, cfg.distill_weight, cfg.mse_weight,
                          cfg.cosine_weight, cfg.text_weight, objective=cfg.objective, kl_weight=cfg.kl.weight,
                          kl_temperature=cfg.kl.temperature)


# ------------------------------------------------------------------------ from the config: load, then build
def build_stage1(cfg: Stage1Config, init_connector: str | Path = "") -> StageParts:
    """Stage 1 from its config: the LLM's config and embedding table only, the encoder only when features are not
    cached, a fresh connector (or the one saved in ``init_connector``). Call after seeding: a fresh connector's
    initial weights come from the RNG."""
    adapt = build.encoder_adapt_config(cfg.model, cfg.data, cfg.engine)  # None: the frozen encoder (default)
    llm, tokenizer = build.load_llm_embeddings(cfg.model.llm)  # config + input-embedding table only
    encoder = None if cfg.data.feature_cache else build.load_encoder(cfg.model, train_dtype(cfg.engine))
    enc = build.encoder_facts(cfg.model, cfg.data, encoder)
    if init_connector:
        connector = load_connector(init_connector, llm=llm)
    else:
        connector = build.make_connector(cfg.model, enc, llm)
    # An adapted encoder runs inside the module: its adaptation reaches the optimizer and the checkpoints
    model = stage1_module(cfg, connector, llm.get_input_embeddings().weight,
                          encoder=encoder if adapt is not None else None)
    return StageParts(model, connector, tokenizer, enc, encoder, adapt, embedding=model.embedding)


def build_stage2(cfg: Stage2Config, dtype: torch.dtype | None = None) -> StageParts:
    """Stage 2 from its config: the frozen LLM read straight into ``dtype`` (default: the training precision, so no
    ranks x fp32 copies in host RAM), the encoder when features are not cached or the leakage check needs audio,
    the connector of ``model.init_connector`` or a fresh one, LoRA per ``variant``. Call after seeding."""
    check_stage2(cfg)
    adapt = build.encoder_adapt_config(cfg.model, cfg.data, cfg.engine)  # None: the frozen encoder (default)
    dtype = train_dtype(cfg.engine) if dtype is None else dtype
    llm, tokenizer = build.load_llm(cfg.model.llm, dtype)
    need_encoder = not cfg.data.feature_cache or cfg.leakage_utts > 0
    encoder = build.load_encoder(cfg.model, dtype) if need_encoder else None
    enc = build.encoder_facts(cfg.model, cfg.data, encoder)
    if cfg.model.init_connector:
        connector = load_connector(cfg.model.init_connector, llm=llm)
    else:
        connector = build.make_connector(cfg.model, enc, llm)
    # An adapted encoder runs inside the module (its adaptation trains); the frozen one stays outside
    speechlm = stage2_speechlm(cfg, connector, llm, tokenizer, encoder=encoder if adapt is not None else None)
    model = stage2_module(cfg, speechlm, tokenizer.bos_token_id)
    return StageParts(model, connector, tokenizer, enc, encoder, adapt, speechlm=speechlm)
