"""Model FLOPs of a training step of the connector and the frozen LLM (PaLM's accounting), for MFU and HFU."""

from __future__ import annotations

import math

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (datasheet); MFU is measured against it

FORMULAS = {
    "mfu": "model FLOPs per step / step time / 989e12 (H200 dense bf16 peak); recomputation by activation "
           "checkpointing is not counted (it is in hfu)",
    "connector_flops": "trained: 6 * (N_frame * T' + N_token * N) per clip + attention 12 * L_c * d_c * T'^2 per "
                       "clip (PaLM, App. B; masks counted as full), T' = frames after stacking, N = tokens; "
                       "N_frame = fusion + adapter + blocks, N_token = norm + proj (+ slot read-out)",
    "frozen_llm_flops": "gradients flow through the frozen LLM to its inputs only: 2 * N_llm * S forward + "
                        "2 * N_llm * S backward-to-inputs (no weight gradients) + attention 12 * L * d * S^2 "
                        "(forward 4, backward 8: dQ, dK, dV) per sequence; S = tokens + BOS; N_llm excludes the "
                        "input-embedding table (a lookup) and includes lm_head",
    "trained_llm_flops": "for reference (not used: the LLM is frozen): 6 * N * S + 12 * L * d * S^2",
    "hfu": "mfu + the forward recomputed by activation checkpointing (2 * N_layers * S + 4 * L * d * S^2 per "
           "sequence, N_layers = decoder-layer parameters)",
    "tokens_per_s": "LLM tokens of the batch (B x N) / step time",
    "audio_s_per_s": "seconds of audio in the batch (B x T / 50 Hz) / step time",
}


def connector_counts(connector) -> dict:
    """Parameters applied per (stacked) frame vs per token read-out, and the block geometry."""
    per_token_prefix = ("norm.", "proj.", "slot_", "head_norm.", "head.")
    total = sum(p.numel() for p in connector.parameters())
    token = sum(p.numel() for n, p in connector.named_parameters() if n.startswith(per_token_prefix))
    cfg = connector.cfg
    return {"params": total, "params_per_frame": total - token, "params_per_token": token,
            "layers": cfg.n_layers, "d_model": cfg.d_model, "stack": cfg.stack}


def llm_counts(llm) -> dict:
    """Parameters of the LLM as its FLOPs count them: all but the input-embedding lookup (lm_head kept)."""
    cfg = llm.config
    total = sum(p.numel() for p in llm.parameters())  # tied weights once
    emb = llm.get_input_embeddings().weight.numel()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    flops_params = total if tied else total - emb  # tied: the one table is also lm_head's matmul
    layers = sum(p.numel() for p in llm.model.layers.parameters())
    return {"params": total, "params_flops": flops_params, "params_layers": layers, "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "tied": tied}


def step_flops(stage: int, clips: int, frames: int, tokens: int, conn: dict, llm: dict | None) -> dict:
    """Model FLOPs of one training step (FORMULAS), and the hardware FLOPs with checkpointing's recompute."""
    t = math.ceil(frames / conn["stack"])
    c = 6 * (conn["params_per_frame"] * t + conn["params_per_token"] * tokens) \
        + 12 * conn["layers"] * conn["d_model"] * t * t
    model = clips * c
    recompute = 0.0
    if stage == 2 and llm is not None:
        s = tokens + 1  # + BOS
        model += clips * (4 * llm["params_flops"] * s + 12 * llm["layers"] * llm["hidden"] * s * s)
        recompute = clips * (2 * llm["params_layers"] * s + 4 * llm["layers"] * llm["hidden"] * s * s)
    return {"model_flops": float(model), "hardware_flops": float(model + recompute)}
