"""The ZeRO memory model: bytes per GPU of weights, gradients, optimizer state, activations and DeepSpeed's buffers
under ZeRO-2 / ZeRO-3, projected for Llama-3-8B + w2v-BERT 2.0 + the SSR connector (shapes built on the meta device)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechlm.perf import ROOT
from speechlm.perf.shapes import ENCODERS, encoder_model, llama_config

GIB = 2.0**30
MIB = 2.0**20


class BenchError(RuntimeError):
    """A benchmark input is missing or a run failed: the message names the path / the log."""


def model_states(frozen_params: int, trainable_params: int, n_gpus: int, zero: int, outside_frozen_params: int = 0,
                 frozen_bytes: int = 2, weight_bytes: int = 2, grad_bytes: int = 2, optim_bytes: int = 12) -> dict:
    """Bytes per GPU of the weights and optimizer state (ZeRO paper, Rajbhandari et al. 2020, mixed-precision Adam).

    Frozen parameters inside the DeepSpeed model: ``frozen_bytes`` each, replicated under ZeRO-0/1/2,
    partitioned under ZeRO-3; they get no gradient and no optimizer state (engine.param_groups gives the
    optimizer only trainable ones). ``outside_frozen_params`` (the encoder, never handed to DeepSpeed) are
    replicated under every stage. Trainable: weights ``weight_bytes`` (partitioned only by ZeRO-3),
    gradients ``grad_bytes`` (partitioned by ZeRO-2/3), optimizer ``optim_bytes`` (fp32 master + Adam's two
    moments = 12; partitioned by ZeRO-1/2/3).
    """
    n = max(1, n_gpus)
    return {
        "frozen_weights": frozen_params * frozen_bytes / (n if zero >= 3 else 1),
        "outside_frozen_weights": outside_frozen_params * frozen_bytes,
        "trainable_weights": trainable_params * weight_bytes / (n if zero >= 3 else 1),
        "trainable_grads": trainable_params * grad_bytes / (n if zero >= 2 else 1),
        "optimizer_states": trainable_params * optim_bytes / (n if zero >= 1 else 1),
    }


def llm_layer_bytes_per_token(hidden: int, intermediate: int, act_bytes: int = 2, norm_bytes: int = 4) -> float:
    """What one frozen Llama decoder layer keeps for the backward pass, per token, when gradients flow to its
    inputs only: frozen linears keep no input (the input gradient needs only the weight); the two RMSNorms
    keep their fp32 input (HF upcasts: ``norm_bytes`` x hidden each); attention keeps q, k, v (k, v repeated to
    all heads, ``repeat_kv``) and its output (4 x hidden); SwiGLU keeps gate, silu(gate) and up (3 x
    intermediate)."""
    return 2 * norm_bytes * hidden + act_bytes * (4 * hidden + 3 * intermediate)


def llm_activations(tokens: int, layers: int, hidden: int, intermediate: int, vocab: int, checkpointing: bool,
                    act_bytes: int = 2, logit_bytes: int = 10) -> dict:
    """Bytes of the frozen LLM's activations for ``tokens`` tokens of one micro-batch.

    Without checkpointing every layer keeps :func:`llm_layer_bytes_per_token`; with it (HF, non-reentrant)
    each layer keeps its input (``act_bytes`` x hidden) and one layer's activations are rebuilt at a time in
    the backward pass. The logits peak at the loss: bf16 logits + their fp32 copy + fp32 log-softmax
    (``logit_bytes`` = 2 + 4 + 4 per element).
    """
    per_layer = llm_layer_bytes_per_token(hidden, intermediate, act_bytes)
    if checkpointing:
        layers_b = tokens * (layers * act_bytes * hidden + per_layer)
    else:
        layers_b = tokens * layers * per_layer
    return {"llm_layers": float(layers_b), "logits": float(tokens * vocab * logit_bytes)}


def connector_activations(frames: int, clips: int, layers: int, d_model: int, ffn_hidden: int, d_enc: int,
                          act_bytes: int = 2, dropout: bool = True) -> dict:
    """Bytes of the (trained) SSR connector's activations for ``frames`` frames (after stacking) of a batch.

    Per frame and block: the inputs of the four trained linears (qkv, out, gate/up shared, down:
    d, d, d, ffn_hidden), both RMSNorm inputs (2 d), SDPA's q, k, v, out (4 d), SwiGLU's gate, silu(gate),
    up (3 ffn_hidden), each ``act_bytes``, plus two 1-byte dropout masks (2 d). The adapter keeps its input
    (d_enc per frame). SDPA's boolean mask becomes an additive ``act_bytes`` bias per clip, T x T
    (T = frames / clips), kept by each block. No activation checkpointing inside the connector.
    """
    per_frame = act_bytes * (9 * d_model + 4 * ffn_hidden) + (2 * d_model if dropout else 0)
    t = frames / max(1, clips)
    return {"connector_blocks": float(frames * layers * per_frame + frames * act_bytes * d_enc),
            "connector_masks": float(layers * clips * t * t * act_bytes)}


def zero_buffers(zero_conf: dict, zero: int, largest_gathered: int, buffer_bytes: int = 2) -> dict:
    """DeepSpeed's own buffers per GPU, from the ``zero_optimization`` section (DeepSpeed 0.19 defaults).

    ZeRO-2 with contiguous_gradients: a gradient bucket of reduce_bucket_size elements, two with
    overlap_comm (stage_1_and_2.py allocates them whole, however few parameters train). ZeRO-3: one
    reduce bucket, and the gathered (un-partitioned) parameters: at most stage3_max_live_parameters, but
    never less than the largest module's parameters + stage3_prefetch_bucket_size (the bound is used: with
    stage3_max_reuse_distance as large as max_live, parameters reused in the backward pass stay gathered).
    """
    zc = zero_conf.get("zero_optimization", zero_conf)
    bucket = float(zc.get("reduce_bucket_size", 5e8))
    out = {"reduce_buckets": 0.0, "zero3_gathered_params": 0.0}
    if zero == 2 and zc.get("contiguous_gradients", True):
        out["reduce_buckets"] = bucket * (2 if zc.get("overlap_comm", False) else 1) * buffer_bytes
    if zero >= 3:
        if zc.get("contiguous_gradients", True):
            out["reduce_buckets"] = bucket * buffer_bytes
        live = float(zc.get("stage3_max_live_parameters", 1e9))
        prefetch = float(zc.get("stage3_prefetch_bucket_size", 5e7))
        out["zero3_gathered_params"] = max(live, largest_gathered + prefetch) * buffer_bytes
    return out


@dataclass
class ProjectionInputs:
    n_gpus: int
    llm_params: int
    llm_largest_module_params: int
    llm_layers: int
    llm_hidden: int
    llm_intermediate: int
    llm_vocab: int
    encoder_params: int
    encoder_loaded: bool
    connector_params: int
    connector_layers: int
    connector_d_model: int
    connector_ffn_hidden: int
    connector_stack: int
    d_enc: int
    clips: int
    frames: int  # encoder frames per micro-batch (before stacking)
    tokens: int  # LLM positions per micro-batch (transcript tokens + one BOS per clip)
    zero_confs: dict = field(default_factory=dict)  # stage -> DeepSpeed config dict
    dtype_bytes: int = 2
    runtime_overhead_bytes: float = 1.0 * GIB  # CUDA context + NCCL communicators (assumed)


def project(inp: ProjectionInputs) -> dict:
    """Per-GPU bytes under ZeRO-2 and ZeRO-3, with and without activation checkpointing in the LLM."""
    out: dict[str, Any] = {}
    b = inp.dtype_bytes
    frames_after = math.ceil(inp.frames / max(1, inp.connector_stack))
    conn = connector_activations(frames_after, inp.clips, inp.connector_layers, inp.connector_d_model,
                                 inp.connector_ffn_hidden, inp.d_enc * inp.connector_stack, b)
    for zero in (2, 3):
        parts = model_states(inp.llm_params, inp.connector_params, inp.n_gpus, zero,
                             inp.encoder_params if inp.encoder_loaded else 0, frozen_bytes=b, weight_bytes=b,
                             grad_bytes=b, optim_bytes=12)
        parts.update(zero_buffers(inp.zero_confs.get(zero, {}), zero, inp.llm_largest_module_params, b))
        parts.update(conn)
        parts["runtime_overhead"] = inp.runtime_overhead_bytes
        for ckpt in (True, False):
            llm = llm_activations(inp.tokens, inp.llm_layers, inp.llm_hidden, inp.llm_intermediate, inp.llm_vocab,
                                  ckpt, b)
            p = {**parts, **llm}
            out[f"zero{zero}_{'ckpt' if ckpt else 'nockpt'}"] = {"parts": p, "total": sum(p.values())}
    return out

def real_scale_inputs(config: Path, n_gpus: int, clips: int, encoder_params: int | None = None) -> tuple[ProjectionInputs, dict]:
    """Build Llama-3-8B, w2v-BERT 2.0 and the config's SSR on the meta device and read the sizes off them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from speechlm.config import load_config
    from speechlm.training import build
    from speechlm.training.configs import Stage2Config
    from speechlm.training.deepspeed_engine import EngineConfig, ds_config

    if not config.is_file():
        raise BenchError(f"{config}: real-scale config not found (--real-config)")
    cfg = load_config(Stage2Config, config, [])
    lcfg = LlamaConfig(**llama_config("8b"))
    with torch.device("meta"):
        llm = LlamaForCausalLM(lcfg)
        if encoder_params is None:
            enc_model, _ = encoder_model("w2v-bert", tiny=False)
            encoder_params = sum(p.numel() for p in enc_model.parameters())
            del enc_model
        d_enc = ENCODERS["w2v-bert"][2]
        facts = build.EncoderFacts("w2v-bert-2.0", list(cfg.model.encoder_layers), d_enc, 50.0, 16000)
        connector = build.make_connector(cfg.model, facts, llm)
    llm_params = sum(p.numel() for p in llm.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in llm.modules())
    ccfg = connector.cfg
    conn_params = sum(p.numel() for p in connector.parameters())
    zero_confs = {}
    for zero in (2, 3):
        ds_path = cfg.engine.ds_config
        if zero != cfg.engine.zero_stage or not ds_path:
            ds_path = str(ROOT / "recipes" / "ds" / f"zero{zero}_gpu.json")
        elif not Path(ds_path).is_absolute():
            ds_path = str(ROOT / ds_path)
        zero_confs[zero] = ds_config(EngineConfig(zero_stage=zero, ds_config=ds_path, precision="fp32"))
    # training reads cached features (recipes/run_librispeech_llama3.sh sets data.feature_cache); the stage-2
    # recipe still loads the encoder on every rank when its leakage check runs (leakage_utts > 0)
    need_encoder = cfg.leakage_utts > 0
    tokens = cfg.data.max_tokens + clips * (1 if cfg.bos else 0)
    inp = ProjectionInputs(
        n_gpus=n_gpus, llm_params=llm_params, llm_largest_module_params=largest, llm_layers=lcfg.num_hidden_layers,
        llm_hidden=lcfg.hidden_size, llm_intermediate=lcfg.intermediate_size, llm_vocab=lcfg.vocab_size,
        encoder_params=int(encoder_params), encoder_loaded=bool(need_encoder), connector_params=conn_params,
        connector_layers=ccfg.n_layers, connector_d_model=ccfg.d_model,
        connector_ffn_hidden=int(ccfg.ffn_mult * ccfg.d_model), connector_stack=ccfg.stack, d_enc=d_enc,
        clips=clips, frames=cfg.data.max_frames, tokens=tokens, zero_confs=zero_confs)
    facts_out = {
        "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        "llm": "Meta-Llama-3-8B shape (speechlm.perf.shapes llama_config('8b')), bf16, frozen",
        "encoder": "w2v-BERT 2.0 shape (speechlm.perf.shapes encoder_model('w2v-bert')), bf16, frozen; training "
                   "reads cached features (the run script sets data.feature_cache), " + (
                       f"but the leakage check (leakage_utts={cfg.leakage_utts}) loads the encoder on every rank"
                       if need_encoder else "and with leakage_utts=0 the encoder is not loaded"),
        "connector": {k: getattr(ccfg, k) for k in ("d_model", "n_layers", "n_heads", "ffn_mult", "stack", "mask",
                                                    "dropout")},
        "ds_configs": {z: {k: v for k, v in c.get("zero_optimization", {}).items()} for z, c in zero_confs.items()},
        "gradient_checkpointing_in_config": bool(cfg.model.gradient_checkpointing),
        "batch": {"max_frames": cfg.data.max_frames, "max_tokens": cfg.data.max_tokens, "clips_assumed": clips},
    }
    return inp, facts_out


ASSUMPTIONS = [
    "bf16 weights/activations (engine.precision=bf16); DeepSpeed casts the whole module to bf16, frozen parts included",
    ("trainable state per the ZeRO paper's mixed-precision Adam: 2 B weight + 2 B gradient + 12 B (fp32 master, m, v) "
     "per connector parameter; the frozen LLM has none (engine.param_groups passes only trainable parameters)"),
    ("ZeRO-2 replicates all weights (frozen LLM and connector), partitions gradients and optimizer state; ZeRO-3 "
     "partitions every parameter of the DeepSpeed model, the frozen LLM included; the encoder is outside it"),
    ("one micro-batch at the config's budget: max_frames encoder frames (50 Hz) and max_tokens transcript tokens + "
     "one BOS per clip; the clip count (for BOS and the per-clip attention masks) is --clips (12: 12 s clips, "
     "tools/gpu_check.py's recipe batch); grad_accum 1"),
    "memory-efficient / flash SDPA on the GPU: no T x T attention probabilities kept (only the connector's mask bias)",
    ("ZeRO-3 gathered parameters at their stage3_max_live_parameters bound; typical is the largest module "
     "(lm_head / embedding table) + the prefetch bucket"),
    "CUDA context + NCCL: 1 GiB per GPU (assumed, not derived); allocator fragmentation not counted",
    ("host RAM: every rank builds the full bf16 LLM before DeepSpeed partitions it (the model is made outside "
     "deepspeed.zero.Init), so each rank peaks at ~16 GB of host memory at load under ZeRO-2 and ZeRO-3 alike"),
]

def cpu_check(params: dict, runs: dict[int, dict], ranks: int) -> dict:
    """The projection's formulas at the CPU runs' size (fp32: no bf16 on this CPU), against the measured
    steady RSS (maximum over ranks of the peak RSS in steps 2..N), as differences between stages."""
    if not params.get("trainable") or not runs:
        return {}
    # fp32 training: weights 4, grads 4; ZeRO-0 runs the client AdamW directly (m, v: 8 B); ZeRO-2/3 add an
    # fp32 partition copy of the weights (12 B partitioned)
    pred = {}
    for s in runs:
        ms = model_states(params["frozen"], params["trainable"], ranks, s, 0, frozen_bytes=4, weight_bytes=4,
                          grad_bytes=4, optim_bytes=8 if s == 0 else 12)
        pred[s] = {"parts": ms, "total": sum(ms.values())}
    meas = {s: max(r["rss_steps_max"] for r in runs[s]["ranks"]) for s in runs}
    out = {"predicted_model_states_mib": {s: pred[s]["total"] / MIB for s in pred},
           "trainable_state_share_predicted": {
               s: (pred[s]["total"] - pred[s]["parts"]["frozen_weights"]) / pred[s]["total"] for s in pred},
           "measured_steady_rss_mib": {s: meas[s] / MIB for s in meas}, "deltas": []}
    stages = sorted(runs)
    for a, b in itertools.pairwise(stages):
        out["deltas"].append({"from": a, "to": b, "predicted_mib": (pred[b]["total"] - pred[a]["total"]) / MIB,
                              "measured_mib": (meas[b] - meas[a]) / MIB})
    return out
