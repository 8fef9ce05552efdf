"""GPU readiness check: the real-scale path (w2v-BERT 2.0 / Whisper large-v3 -> SSR -> Llama-3-8B) on one GPU.

    bash tools/gpu_check.sh                        # on the lent GPU machine (installs .gpu_wheels/ first)
    python tools/gpu_check.py --cpu --tiny         # the CPU dry run (tests/test_gpu_check.py)
    python tools/gpu_check.py --parts stage2_zero3 --llm 1b --budget 150   # a rerun of one part

Every model is a RANDOMLY INITIALISED model of the real architecture, built in code (no weights travel):
w2v-BERT 2.0 (24 conformer layers, 1024 wide) and Whisper large-v3's encoder (32 layers, 1280 wide, 128 mel
bins), the SSR connector of recipes/configs/librispeech_llama3_stage1.yaml, and a Llama-3-8B-shaped LLM in
bf16 (Llama-3.2-1B-shaped with ``--llm 1b``, or when ``--llm auto`` finds too little time left for the 8B).
``--tiny`` swaps all of them for tiny stand-ins (the CPU dry run).

Parts, in order, each in its own process with its own time budget (``--isolation part``), so that a
crash, a hang or an out-of-memory in one still leaves a report with the others' numbers and its error:

  env            versions, the GPU, a bf16 8192^3 matmul rate (the practical peak)
  stage1_zero2   stage-1 steps (connector -> Llama-3 embedding targets) under DeepSpeed ZeRO-2
  stage1_zero3   the same under ZeRO-3
  stage2_zero2   stage-2 steps (connector -> frozen LLM, activation checkpointing, distill mix) under ZeRO-2
  stage2_zero3   the same under ZeRO-3 (frozen LLM partitioned too)
  encoders       feature-caching throughput of both encoders (bf16, batches of 30 s clips): the encoder
                 call alone and tools/cache_features.py's build_feature_cache end to end
  tests          pytest -m gpu tests/test_gpu.py (bf16 vs fp32, Whisper variable length, SDPA masks,
                 frozen LLM)
  stage1_run     a short stage-1 run (recipes/stage1_distill.py, the real config) on eSpeak speech:
                 does the loss fall?

The report (JSON) goes to $OUT/gpu_report.json when $OUT is set, else runs/gpu_check/report.json
(``--out`` overrides); the log of every part to gpu_check.log beside it. Formulas: see FORMULAS below and
docs/PERFORMANCE.md ("GPU check").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
SCHEMA = "speechlm-gpu-check-1"
STAGE_CONFIGS = {1: ROOT / "recipes" / "configs" / "librispeech_llama3_stage1.yaml",
                 2: ROOT / "recipes" / "configs" / "librispeech_llama3_stage2.yaml"}
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (datasheet); MFU is measured against it

# (name, budget on a GPU s, budget in the tiny CPU dry run s, least time worth starting it with s)
PARTS: list[tuple[str, float, float, float]] = [
    ("env", 45, 40, 5),
    ("stage1_zero2", 60, 60, 15),
    ("stage1_zero3", 60, 60, 15),
    ("stage2_zero2", 110, 60, 30),
    ("stage2_zero3", 110, 60, 30),
    ("encoders", 120, 60, 20),
    ("tests", 150, 60, 15),
    ("stage1_run", 100, 60, 20),
]
PART_NAMES = [p[0] for p in PARTS]
# --isolation group (the default of --tiny): these run together, one process each (fewer interpreter starts)
GROUPS = [["env"], ["stage1_zero2", "stage1_zero3", "stage2_zero2", "stage2_zero3"], ["encoders", "tests", "stage1_run"]]

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

SENTENCES = [
    "the cat sat on the warm mat", "a dog ran across the green field", "she reads a book every night",
    "the sun rises over the quiet hills", "we walked to the market in the morning",
    "my brother plays the piano very well", "the children laughed at the funny clown",
    "a small bird sang in the old tree", "he drinks a cup of coffee at noon", "the train left the station late",
    "they planted flowers in the garden", "the river flows to the distant sea", "please close the door behind you",
    "the teacher wrote a long sentence on the board", "my mother baked fresh bread today",
    "the wind blew the leaves off the trees", "a red car stopped at the corner", "we watched the stars after dinner",
    "the baby slept through the whole night", "he found his keys under the chair",
    "the shop opens at nine every day", "she painted a picture of the ocean", "the old man walked with a cane",
    "our team won the game last week", "the snow covered the roofs of the town", "i like to swim in the lake",
    "the farmer feeds the cows each morning", "a cold wind came from the north", "the students listened to the story",
    "he cut the apple into four pieces", "the lamp on the desk is very bright", "we heard music from the next room",
    "the boat sailed slowly along the coast", "my sister writes letters to her friend",
    "the clock on the wall stopped at midnight", "a young girl picked a basket of berries",
    "the soup was too hot to eat", "they built a house near the forest", "the dog barked at the passing truck",
    "she wore a blue dress to the party", "the rain fell softly on the window", "he fixed the broken wheel of the bike",
    "the moon was full and bright tonight", "we packed our bags for the long trip",
    "the horse jumped over the wooden fence", "a gentle voice called from the hall", "the fish swam under the bridge",
    "the kettle whistled in the kitchen",
]


# ============================================================================================ sizes
def llama_config(size: str, vocab: int | None = None, layers: int | None = None) -> dict:
    """Keyword arguments of transformers.LlamaConfig for Meta-Llama-3-8B / Llama-3.2-1B / a tiny stand-in."""
    if size == "8b":
        cfg = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}
    elif size == "1b":
        cfg = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
                   "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 128000,
                   "eos_token_id": 128001,
                   "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    elif size == "tiny":
        cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512, "rope_theta": 500000.0,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    else:
        raise ValueError(f"unknown LLM size {size!r} (8b | 1b | tiny)")
    if vocab is not None:
        cfg["vocab_size"] = vocab
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


ENCODERS = {  # kind -> (folder name, frame rate Hz, hidden size real, hidden size tiny)
    "w2v-bert": ("w2v-bert-2.0-random", 50.0, 1024, 32),
    "whisper": ("whisper-large-v3-random", 50.0, 1280, 32),
}


def encoder_model(kind: str, tiny: bool):
    """(random model, feature extractor) of facebook/w2v-bert-2.0 or openai/whisper-large-v3's architecture."""
    if kind == "w2v-bert":
        from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

        if tiny:
            cfg = Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     output_hidden_size=32, feature_projection_input_dim=160,
                                     conv_depthwise_kernel_size=5, position_embeddings_type="relative_key",
                                     left_max_position_embeddings=16, right_max_position_embeddings=4,
                                     add_adapter=False)
        else:  # facebook/w2v-bert-2.0's config.json (600M parameters)
            cfg = Wav2Vec2BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096, output_hidden_size=1024, feature_projection_input_dim=160,
                                     conv_depthwise_kernel_size=31, position_embeddings_type="relative_key",
                                     left_max_position_embeddings=64, right_max_position_embeddings=8,
                                     add_adapter=False, layerdrop=0.0, hidden_act="swish")
        return Wav2Vec2BertModel(cfg), SeamlessM4TFeatureExtractor()
    if kind == "whisper":
        from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

        common = {"num_mel_bins": 128, "max_source_positions": 1500, "pad_token_id": 50256, "bos_token_id": 50257,
                      "eos_token_id": 50257, "decoder_start_token_id": 50258, "suppress_tokens": None,
                      "begin_suppress_tokens": None}
        if tiny:
            cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=51866,
                                max_target_positions=32, **common)
        else:  # openai/whisper-large-v3's encoder; the decoder (dropped by SpeechEncoder) cut to 2 layers
            cfg = WhisperConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                decoder_layers=2, decoder_attention_heads=20, decoder_ffn_dim=5120, vocab_size=51866,
                                max_target_positions=448, **common)
        return WhisperForConditionalGeneration(cfg), WhisperFeatureExtractor(feature_size=128)
    raise ValueError(f"unknown encoder {kind!r} (w2v-bert | whisper)")


@contextlib.contextmanager
def building(device: str, dtype):
    """Create modules directly on ``device`` in ``dtype`` (an 8B model initialises in seconds on a GPU)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_encoder_folder(kind: str, folder: str | Path, tiny: bool, device: str = "cpu") -> Path:
    """A random encoder of the real architecture saved as a Hugging Face folder (bf16 weights at real size),
    built once: a folder holding READY is reused."""
    import shutil

    import torch

    folder = Path(folder)
    if (folder / "READY").is_file():
        return folder
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with building(device, dtype):
        model, fe = encoder_model(kind, tiny)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    fe.save_pretrained(tmp)
    (tmp / "READY").write_text("random weights, built by tools/gpu_check.py\n")
    del model
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def build_llama(size: str, device: str, dtype, vocab: int | None = None, layers: int | None = None):
    """A random, frozen, eval-mode Llama of ``size`` created directly on ``device`` in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**llama_config(size, vocab, layers))
    with building(device, dtype):
        llm = LlamaForCausalLM(cfg)
    return llm.requires_grad_(False).eval()


# ========================================================================================= flops
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


# ========================================================================================= parts
class Ctx:
    """What a part gets: the options, the device, and a result dict saved as it grows."""

    def __init__(self, args: argparse.Namespace, out: Path | None):
        self.args = args
        self.out = out
        self.result: dict[str, Any] = {}
        self.checks: dict[str, bool] = {}
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.name = ""

    @property
    def gpu(self) -> bool:
        return not self.args.cpu

    @property
    def tiny(self) -> bool:
        return bool(self.args.tiny)

    @property
    def device(self) -> str:
        return "cpu" if self.args.cpu else "cuda"

    def dtype(self):
        import torch

        return torch.bfloat16 if self.gpu else torch.float32

    def save(self, status: str = "running", error: str | None = None, tb: str | None = None) -> None:
        if self.out is None:
            return
        data = {"status": status, "error": error, "traceback": tb, "result": self.result, "checks": self.checks,
                "wall_s": time.time() - self.start}
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
        tmp.replace(self.out)

    def put(self, key: str, value: Any) -> None:
        self.result[key] = value
        self.save()
        text = json.dumps(value, default=_jsonable)
        print(f"[{self.name} {time.time() - self.start:6.1f} s] {key}: {text[:300]}", flush=True)  # the log

    def check(self, name: str, ok: bool) -> bool:
        self.checks[name] = bool(ok)
        self.save()
        return bool(ok)

    def sync(self) -> None:
        if self.gpu:
            import torch

            torch.cuda.synchronize()


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("torch", "torchaudio", "transformers", "tokenizers", "huggingface_hub", "deepspeed", "pydantic",
                 "safetensors", "sentencepiece", "soundfile", "espeakng-loader", "numpy", "peft", "pytest"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def part_env(ctx: Ctx) -> None:
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_build": torch.version.cuda, "cpu_count": os.cpu_count(),
                            "packages": _versions()}
    import importlib.util

    import transformers

    info["transformers_file"] = str(Path(transformers.__file__).parent)
    spec = importlib.util.find_spec("deepspeed")
    info["deepspeed_file"] = str(Path(spec.origin).parent) if spec and spec.origin else None
    info["pythonpath"] = os.environ.get("PYTHONPATH", "")
    try:
        from speechlm.data.tts import engine_available

        info["espeak"] = engine_available("espeak")
    except Exception as e:  # noqa: BLE001 -- reported, not fatal
        info["espeak"] = f"{type(e).__name__}: {e}"
    if ctx.gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible (use --cpu for the dry run)")
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = str(e)
    ctx.put("env", info)
    # the practical matmul ceiling (bf16 on the GPU; fp32 on the CPU, small)
    n = 2048 if ctx.tiny else 8192
    if not ctx.gpu:
        n = 256
    dtype = ctx.dtype()
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    for _ in range(3):
        a @ b
    ctx.sync()
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    ctx.sync()
    dt = (time.perf_counter() - t0) / reps
    ctx.put("matmul", {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / dt / 1e12})
    ctx.check("device_ok", True)


def _no_cpu_shm_jit(ctx: Ctx) -> None:
    """CPU only: DeepSpeed's communication backend JIT-compiles its shared-memory all-reduce (C++, for several
    ranks on one host) in every process, after probing every op with the compiler. A one-rank group never
    uses it: mark it incompatible up front (no probe, no build). Nothing changes on a GPU."""
    if ctx.gpu:
        return
    import deepspeed.ops

    ops = vars(deepspeed.ops)
    if "__compatible_ops__" in ops:
        ops["__compatible_ops__"]["deepspeed_shm_comm"] = False
    else:
        ops["__compatible_ops__"] = {"deepspeed_shm_comm": False}  # comm/torch.py reads it with .get(name, False)


def _init_dist(ctx: Ctx):
    """One-rank process group without the launcher (RANK=0, WORLD_SIZE=1, MASTER_ADDR/PORT), as engine.py does."""
    from speechlm.training.engine import init_distributed

    _no_cpu_shm_jit(ctx)
    if ctx.args.dist_backend != "auto":
        import torch.distributed as dist

        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
            dist.init_process_group(ctx.args.dist_backend, rank=0, world_size=1)
    return init_distributed()


def synthetic_batch(clips: int, frames: int, tokens: int, d_enc: int, vocab: int, seed: int = 0):
    """A Batch as the cached-feature loader gives it: features (B, 1, T, D) fp32, evenly spread boundaries."""
    import torch

    from speechlm.data.batching import Batch

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(clips, 1, frames, d_enc, generator=g)
    base = torch.linspace(0, frames - 1, tokens + 1)[1:].round().long()
    bnd = base[None].expand(clips, tokens).clone()
    ids = torch.randint(3, vocab, (clips, tokens), generator=g)
    return Batch(utt_ids=[f"synthetic-{i}" for i in range(clips)], token_ids=ids,
                 token_mask=torch.ones(clips, tokens, dtype=torch.bool), boundaries=bnd, features=feats,
                 frame_lengths=torch.full((clips,), frames, dtype=torch.long))


def ds_json(ctx: Ctx, zero: int) -> Path:
    """recipes/ds/zero{2,3}_gpu.json (the recipe's; 2e8-element communication buckets), or with ``--ds cpu``
    the CPU ones (the dry run: zero-filling those buckets every step costs ~0.5 s on the CPU)."""
    return ROOT / "recipes" / "ds" / (f"zero{zero}_gpu.json" if ctx.args.ds == "gpu" else f"zero{zero}.json")


def _data(p):
    """A parameter's local storage: the ZeRO-3 partition when there is one (p.data is empty then)."""
    t = getattr(p, "ds_tensor", None)
    return t if t is not None else p.data


def checksum(t) -> tuple[int, int]:
    """Exact integer checksums of a tensor's raw bits, computed where it lives (no host copy of an 8B model):
    (sum of the bit patterns, sum of their squares), both in int64."""
    import torch

    flat = t.detach().reshape(-1)
    bits = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}.get(flat.element_size(), torch.uint8))
    wide = bits.to(torch.int64)
    return int(wide.sum()), int((wide * wide).sum())


def checksums(module, trainable: bool) -> dict:
    return {n: checksum(_data(p)) for n, p in module.named_parameters() if p.requires_grad == trainable}


def part_stage(ctx: Ctx, stage: int, zero: int) -> None:
    import gc

    import torch

    from speechlm.config import load_config
    from speechlm.models.speechlm import SpeechLM
    from speechlm.training import build
    from speechlm.training.configs import Stage1Config, Stage2Config
    from speechlm.training.engine import build_engine, seed_everything, set_threads, train_dtype
    from speechlm.training.loop import BatchPrep
    from speechlm.training.stages import Stage1Distill, Stage2Finetune, TokenEmbedding

    a = ctx.args
    size = "tiny" if ctx.tiny else a.llm_size
    # warm-up 1: the recipe's 2,000 warm-up steps keep the first steps' updates far below a bf16 weight's
    # resolution, so the connector's bf16 weights would not visibly move in 13 steps (the timing is the same)
    overrides = [f"engine.zero_stage={zero}", f"engine.ds_config={ds_json(ctx, zero)}",
                 f"engine.precision={'bf16' if ctx.gpu else 'fp32'}", "engine.warmup_steps=1"]
    if ctx.tiny:
        overrides += ["model.connector.d_model=32", "model.connector.n_heads=2"]
    if a.threads:
        overrides += [f"engine.threads={a.threads}"]
    cfg = load_config(Stage1Config if stage == 1 else Stage2Config, STAGE_CONFIGS[stage], overrides)
    kind = a.encoder
    d_enc = ENCODERS[kind][3 if ctx.tiny else 2]
    clips, frames, tokens = a.clips, round(a.clip_s * 50), a.tokens
    ctx.put("setup", {"stage": stage, "zero": zero, "llm": size, "encoder": kind, "d_enc": d_enc,
                      "ds_config": Path(cfg.engine.ds_config).name, "precision": cfg.engine.precision,
                      "clips": clips, "clip_s": a.clip_s, "frames_per_clip": frames, "tokens_per_clip": tokens,
                      "gradient_checkpointing": bool(stage == 2 and cfg.model.gradient_checkpointing),
                      "config": STAGE_CONFIGS[stage].name})

    t0 = time.perf_counter()
    info = _init_dist(ctx)
    set_threads(cfg.engine.threads, info)
    seed_everything(cfg.seed, 0)
    if ctx.gpu:
        torch.cuda.reset_peak_memory_stats()
    dtype = train_dtype(cfg.engine)
    enc = build.EncoderFacts(ENCODERS[kind][0], [-1], d_enc, 50.0, 16000)
    from transformers import LlamaConfig

    if stage == 1:
        lcfg = LlamaConfig(**llama_config(size))
        g = torch.Generator(device=ctx.device).manual_seed(0)
        table = torch.randn(lcfg.vocab_size, lcfg.hidden_size, device=ctx.device, generator=g) * 0.02
        llm_like = build.InputEmbeddingsOnly(lcfg, table)
        connector = build.make_connector(cfg.model, enc, llm_like)
        model = Stage1Distill(connector, TokenEmbedding(table), cfg.mse_weight, cfg.cosine_weight)
        del llm_like, table
        llm_c, vocab = None, lcfg.vocab_size
    else:
        llm = build_llama(size, ctx.device, dtype)
        llm_c = llm_counts(llm)
        connector = build.make_connector(cfg.model, enc, llm)
        speechlm = SpeechLM(connector, llm, tokenizer=None, gradient_checkpointing=cfg.model.gradient_checkpointing)
        bos = llm.config.bos_token_id if cfg.bos else None
        model = Stage2Finetune(speechlm, bos, cfg.distill_weight, cfg.mse_weight, cfg.cosine_weight, cfg.text_weight)
        vocab = llm.config.vocab_size
    conn_c = connector_counts(connector)
    ctx.put("params", {"connector": conn_c, "llm": llm_c})
    ctx.put("build_s", time.perf_counter() - t0)

    t0 = time.perf_counter()
    total_steps = a.warmup + a.steps
    engine = build_engine(model, cfg.engine, total_steps, info)
    ctx.put("engine_init_s", time.perf_counter() - t0)
    prep = BatchPrep(engine.device, next(connector.parameters()).dtype)
    batch = synthetic_batch(clips, frames, tokens, d_enc, vocab)

    # frozen and trained weights: exact checksums of their bits, before the steps and after them
    t0 = time.perf_counter()
    frozen, trained = checksums(engine.module, False), checksums(engine.module, True)
    ctx.put("snapshot_s", time.perf_counter() - t0)
    if ctx.gpu:  # the build and DeepSpeed's init, then the steps alone
        ctx.put("mem_after_init_gib", torch.cuda.memory_allocated() / 2**30)
        ctx.put("peak_mem_init_gib", torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()

    times, losses = [], []
    for i in range(total_steps):
        ctx.sync()
        t0 = time.perf_counter()
        loss, _metrics = engine.ds(prep(batch, i))
        engine.ds.backward(loss)
        engine.ds.step()
        ctx.sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if i >= a.warmup:
            times.append(dt)
        else:
            ctx.put(f"warmup_step_{i}_s", dt)
    step = statistics.median(times)
    audio_s = clips * frames / 50.0
    fl = step_flops(stage, clips, frames, tokens, conn_c, llm_c)
    res = {"steps_timed": len(times), "step_s_median": step, "step_s_min": min(times), "step_s_max": max(times),
           "tokens_per_step": clips * tokens, "audio_s_per_step": audio_s,
           "tokens_per_s": clips * tokens / step, "audio_s_per_s": audio_s / step,
           "model_tflop_per_step": fl["model_flops"] / 1e12, "losses": losses}
    if ctx.gpu:
        res.update(peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                   mfu=fl["model_flops"] / step / H200_BF16_PEAK,
                   hfu=fl["hardware_flops"] / step / H200_BF16_PEAK,
                   achieved_tflops=fl["model_flops"] / step / 1e12)
    ctx.put("steps", res)
    ctx.check("loss_finite", all(math.isfinite(x) for x in losses))

    t0 = time.perf_counter()
    after_frozen, after_trained = checksums(engine.module, False), checksums(engine.module, True)
    changed = [n for n in frozen if after_frozen.get(n) != frozen[n]]
    moved = sum(1 for n in trained if after_trained.get(n) != trained[n])
    ctx.put("frozen", {"tensors": len(frozen), "changed": changed[:10], "trained_tensors": len(trained),
                       "trained_changed": moved, "check_s": time.perf_counter() - t0})
    ctx.check("frozen_unchanged", not changed and len(frozen) > 0)
    ctx.check("trained_changed", moved > 0)
    del engine, model, frozen, trained
    gc.collect()


def _clips(n: int, seconds: float, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(int(seconds * 16000), generator=g) for _ in range(n)]


def part_encoders(ctx: Ctx) -> None:
    import gc

    import torch

    from speechlm.data.audio import save_audio
    from speechlm.data.feature_cache import build_feature_cache
    from speechlm.data.manifest import Utterance, write_manifest
    from speechlm.models.encoder import SpeechEncoder

    a = ctx.args
    n, seconds = a.enc_batch, a.enc_clip_s
    waves = _clips(n, seconds)
    audio_dir = ctx.work / "encoders_audio"
    rows = []
    for i, w in enumerate(waves):
        path = audio_dir / f"clip{i:03d}.wav"
        if not path.is_file():
            save_audio(path, w, 16000)
        rows.append(Utterance(id=f"clip{i:03d}", audio=str(path), sample_rate=16000, duration_s=seconds,
                              text="x", split="train"))
    write_manifest(audio_dir / "manifest.jsonl", rows)
    for kind in ("w2v-bert", "whisper"):
        res: dict[str, Any] = {"clips": n, "clip_s": seconds}
        ctx.put(kind, res)
        t0 = time.perf_counter()
        folder = build_encoder_folder(kind, ctx.work / "models" / (ENCODERS[kind][0] + ("-tiny" if ctx.tiny else "")),
                                      ctx.tiny, ctx.device)
        res["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        enc = SpeechEncoder(str(folder), dtype=ctx.dtype()).to(ctx.device)
        res["load_s"] = time.perf_counter() - t0
        res["params"] = sum(p.numel() for p in enc.model.parameters())
        if ctx.gpu:
            torch.cuda.reset_peak_memory_stats()
        enc(waves[:2])  # warm-up (CUDA context, kernels, allocator)
        ctx.sync()
        times = []
        for _ in range(a.enc_repeats):
            t0 = time.perf_counter()
            out = enc(waves)
            ctx.sync()
            times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        res.update(call_s=step, audio_s_per_s=n * seconds / step, frames=int(out.lengths[0]),
                   finite=bool(torch.isfinite(out.features).all()))
        if ctx.gpu:
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        # the CPU share: the feature extractor alone (fbank / log-mel on the host), called as SpeechEncoder
        # calls it, clip by clip; timed on up to 8 clips and scaled to the batch (it is per clip)
        fe = enc.feature_extractor
        some = waves[:8]
        t0 = time.perf_counter()
        for w in some:
            kw = {"padding": "longest"} if kind == "whisper" else {}
            fe(w.numpy(), sampling_rate=16000, return_tensors="pt", **kw)
        per_clip = (time.perf_counter() - t0) / len(some)
        res.update(feature_extractor_s_per_clip=per_clip, feature_extractor_s=per_clip * n,
                   feature_extractor_share=per_clip * n / step)
        ctx.put(kind, res)
        ctx.check(f"{kind}_finite", res["finite"])
        # tools/cache_features.py's path end to end: read audio, encode, fp16 to host, safetensors shards
        out_dir = ctx.work / "encoders_cache" / kind
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
        t0 = time.perf_counter()
        cache = build_feature_cache(audio_dir / "manifest.jsonl", enc, out_dir, batch_size=n)
        e2e = time.perf_counter() - t0
        res.update(cache_e2e_s=e2e, cache_e2e_audio_s_per_s=n * seconds / e2e, cache_utts=len(cache))
        ctx.put(kind, res)
        ctx.check(f"{kind}_cached_all", len(cache) == n)
        del enc, out, cache
        gc.collect()
        if ctx.gpu:
            torch.cuda.empty_cache()


def _word_tokenizer(words: list[str], folder: Path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *sorted(set(words))])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def part_stage1_run(ctx: Ctx) -> None:
    import shutil

    import torch

    from speechlm.data.audio import save_audio
    from speechlm.data.feature_cache import build_feature_cache
    from speechlm.data.manifest import Utterance, write_manifest
    from speechlm.models.encoder import SpeechEncoder

    a = ctx.args
    root = ctx.work / "stage1_run"
    shutil.rmtree(root, ignore_errors=True)
    (root / "audio").mkdir(parents=True)
    # speech: eSpeak with its word timings; without eSpeak, the random encoder on random audio (said so)
    t0 = time.perf_counter()
    sentences = SENTENCES[: a.run_sentences]
    audio: list[tuple[torch.Tensor, list[float]]] = []
    source = "espeak (speechlm.data.tts.synthesize, voice en-us, word timings from its phoneme events)"
    try:
        from speechlm.data.tts import synthesize

        for text in sentences:
            s = synthesize(text, voice="en-us", sample_rate=16000)
            if s.words is None or len(s.words) != len(text.split()):
                raise RuntimeError(f"eSpeak gave no word timings for {text!r}")
            audio.append((s.wave, [w.end_s for w in s.words]))
    except Exception as e:  # noqa: BLE001 -- e.g. espeakng_loader missing: fall back, and say so
        source = f"RANDOM AUDIO (eSpeak unavailable: {type(e).__name__}: {e}); evenly spaced word boundaries"
        audio = []
        for i, text in enumerate(sentences):
            n = len(text.split())
            dur = 0.35 * n + 0.3
            wave = _clips(1, dur, seed=100 + i)[0]
            audio.append((wave, [0.15 + 0.35 * (k + 1) for k in range(n)]))
    ctx.put("audio_source", source)
    ctx.put("synthesis_s", time.perf_counter() - t0)
    ctx.put("utterances", len(sentences))
    ctx.put("audio_s", sum(w.numel() for w, _ in audio) / 16000)

    # models: the random w2v-BERT 2.0 (or its tiny stand-in), an LLM folder of Llama-3-8B's width with one
    # layer (stage 1 reads only its input-embedding table) and a word-level tokenizer over the sentences
    t0 = time.perf_counter()
    enc_folder = build_encoder_folder("w2v-bert", ctx.work / "models" / (ENCODERS["w2v-bert"][0]
                                                                          + ("-tiny" if ctx.tiny else "")),
                                      ctx.tiny, ctx.device)
    llm_folder = root / "llm"
    tok = _word_tokenizer([w for s in sentences for w in s.split()], llm_folder)
    llm = build_llama("tiny" if ctx.tiny else "8b", ctx.device, ctx.dtype(), vocab=len(tok), layers=1)
    llm.config.bos_token_id, llm.config.eos_token_id, llm.config.pad_token_id = 1, 2, 0
    llm.save_pretrained(llm_folder)
    del llm
    encoder = SpeechEncoder(str(enc_folder), dtype=ctx.dtype()).to(ctx.device)
    ctx.put("models_s", time.perf_counter() - t0)

    rows = []
    for i, (text, (wave, ends)) in enumerate(zip(sentences, audio)):
        path = root / "audio" / f"u{i:03d}.wav"
        save_audio(path, wave, 16000)
        frames = int(encoder.frame_lengths(torch.tensor([wave.numel()]))[0])
        bnd, prev = [], 0
        for end in ends:
            prev = min(frames - 1, max(prev, int(end * encoder.frame_rate_hz)))
            bnd.append(prev)
        split = "valid" if i % 6 == 5 else "train"
        rows.append(Utterance(id=f"u{i:03d}", audio=str(path), sample_rate=16000, duration_s=wave.numel() / 16000,
                              text=text, split=split, token_boundaries=bnd,
                              boundary_frame_rate_hz=encoder.frame_rate_hz))
    write_manifest(root / "train.jsonl", [r for r in rows if r.split == "train"])
    write_manifest(root / "valid.jsonl", [r for r in rows if r.split == "valid"])
    t0 = time.perf_counter()
    for split in ("train", "valid"):
        build_feature_cache(root / f"{split}.jsonl", encoder, root / "features" / split, batch_size=16)
    ctx.put("cache_s", time.perf_counter() - t0)
    del encoder

    sys.path.insert(0, str(ROOT / "recipes"))
    import stage1_distill

    argv = ["--config", str(STAGE_CONFIGS[1]), f"out_dir={root / 'out'}", f"model.llm={llm_folder}",
            f"model.encoder={enc_folder}", f"data.train_manifest={root / 'train.jsonl'}", "data.train_shards=",
            f"data.valid_manifest={root / 'valid.jsonl'}", f"data.feature_cache={root / 'features' / 'train'}",
            f"data.valid_feature_cache={root / 'features' / 'valid'}", "data.num_workers=0",
            f"loop.max_steps={a.run_steps}", "loop.eval_every=0", "loop.save_every=0", "loop.log_every=10",
            "loop.progress=false", "loop.resume=false", f"engine.warmup_steps={max(1, a.run_steps // 10)}",
            f"engine.ds_config={ds_json(ctx, 2)}",
            f"engine.precision={'bf16' if ctx.gpu else 'fp32'}"]
    if ctx.tiny:
        argv += ["model.connector.d_model=32", "model.connector.n_heads=2"]
    if a.threads:
        argv += [f"engine.threads={a.threads}"]
    ctx.put("argv", argv)
    _no_cpu_shm_jit(ctx)
    t0 = time.perf_counter()
    r = stage1_distill.main(argv)
    losses = r["train_losses"]
    k = max(1, min(10, len(losses) // 4))
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    ctx.put("run", {"wall_s": time.perf_counter() - t0, "steps": r["steps"], "step_s_median": r["step_time_s_median"],
                    "loss_first_mean": first, "loss_last_mean": last, "loss_ratio": last / first,
                    "losses_every_10": losses[::10], "final_valid": r["final_valid"],
                    "frozen_unchanged": r.get("frozen_unchanged")})
    ctx.check("loss_falls", last < a.run_ratio * first)
    ctx.check("frozen_unchanged", bool(r.get("frozen_unchanged")))


def part_tests(ctx: Ctx) -> None:
    import xml.etree.ElementTree as ET

    junit = ctx.work / "tests-junit.xml"
    metrics = ctx.work / "tests-metrics.jsonl"
    for p in (junit, metrics):
        p.unlink(missing_ok=True)
    env = dict(os.environ, SPEECHLM_GPU_CHECK_WORK=str(ctx.work), SPEECHLM_GPU_CHECK_METRICS=str(metrics))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", str(ROOT / "tests" / "test_gpu.py"), "-q", "-rfEs",
           "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={junit}"]
    t0 = time.perf_counter()
    timeout = max(10.0, ctx.args.deadline - time.time() - 3) if ctx.args.deadline else None
    res: dict[str, Any] = {"cases": []}
    try:  # its output goes to the log as it runs; the metrics file fills test by test
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        rc = None
    res.update(returncode=rc, wall_s=time.perf_counter() - t0)
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            res[key] = int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            outcome, msg = "passed", None
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome, msg = tag, (el.get("message") or "")[:500]
            res["cases"].append({"name": case.get("name"), "outcome": outcome, "time_s": float(case.get("time", 0)),
                                 "message": msg})
    if metrics.is_file():
        res["metrics"] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    ctx.put("pytest", res)
    if rc is None:
        raise TimeoutError(f"pytest still running at the part's deadline ({timeout:.0f} s); the metrics of the "
                           "tests that finished are in the result")
    ctx.check("pytest_passed", rc in (0, 5) and res.get("failures", 1) == 0 and res.get("errors", 1) == 0)


PART_FUNCS = {
    "env": part_env,
    "stage1_zero2": lambda c: part_stage(c, 1, 2),
    "stage1_zero3": lambda c: part_stage(c, 1, 3),
    "stage2_zero2": lambda c: part_stage(c, 2, 2),
    "stage2_zero3": lambda c: part_stage(c, 2, 3),
    "encoders": part_encoders,
    "stage1_run": part_stage1_run,
    "tests": part_tests,
}


def run_part_here(name: str, args: argparse.Namespace, out: Path | None) -> dict:
    """Run one part in this process; returns {status, error, traceback, result, checks}."""
    ctx = Ctx(args, out)
    ctx.name = name
    ctx.save()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if os.environ.get("GPU_CHECK_HANG") == name:  # tests: a part that never ends (the kill path)
            ctx.put("hanging", True)
            time.sleep(3600)
        PART_FUNCS[name](ctx)
        status, err, tb = ("ok" if all(ctx.checks.values()) else "fail"), None, None
    except BaseException as e:  # noqa: BLE001 -- the report keeps the error; KeyboardInterrupt too
        status, err, tb = "error", f"{type(e).__name__}: {e}"[:2000], traceback.format_exc()[-6000:]
        print(tb, file=sys.stderr, flush=True)
    ctx.save(status, err, tb)
    return {"status": status, "error": err, "traceback": tb, "result": ctx.result, "checks": ctx.checks,
            "wall_s": time.time() - ctx.start}


# ===================================================================================== orchestrator
def _part_argv(args: argparse.Namespace) -> list[str]:
    """The options a part process needs, as command-line arguments."""
    out = ["--work", str(args.work), "--llm", args.llm, "--encoder", args.encoder, "--clips", str(args.clips),
           "--clip-s", str(args.clip_s), "--tokens", str(args.tokens), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--enc-batch", str(args.enc_batch), "--enc-clip-s", str(args.enc_clip_s),
           "--enc-repeats", str(args.enc_repeats), "--run-steps", str(args.run_steps),
           "--run-sentences", str(args.run_sentences), "--run-ratio", str(args.run_ratio),
           "--dist-backend", args.dist_backend, "--ds", args.ds, "--threads", str(args.threads)]
    return out + (["--cpu"] if args.cpu else []) + (["--tiny"] if args.tiny else [])


def _child_env(args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu" if args.cpu else "cuda")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def part_out(args: argparse.Namespace, name: str) -> Path:
    return Path(args.work) / f"part-{name}.json"


def run_parts_process(names: list[str], args: argparse.Namespace, budget: float, log: Path) -> dict[str, dict]:
    """Run parts one after the other in a fresh process with one time limit (its process group is killed at
    the limit); each part writes its own result file as it goes. Returns {name: result}."""
    for name in names:
        part_out(args, name).unlink(missing_ok=True)
    cmd = [sys.executable, "-u", str(THIS), "--part", ",".join(names), "--deadline", str(time.time() + budget),
           "--llm-size", args.llm_size, *_part_argv(args)]
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n===== part {','.join(names)} (budget {budget:.0f} s, llm {args.llm_size}) "
                 f"{time.strftime('%H:%M:%S')}\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=_child_env(args),
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    elapsed = time.time() - t0
    results: dict[str, dict] = {}
    for name in names:
        out = part_out(args, name)
        data = {"status": None, "error": None, "traceback": None, "result": {}, "checks": {}, "wall_s": 0.0}
        if out.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                data.update(json.loads(out.read_text()))
        if data["status"] == "running":  # the part the process was in when it was killed or died
            data["wall_s"] = max(0.0, elapsed - sum(r["wall_s"] for r in results.values()))
            if timed_out:
                data["status"] = "timeout"
                data["error"] = f"killed at the {budget:.0f} s budget" + (f" (last: {data['error']})"
                                                                           if data["error"] else "")
            else:
                data["status"] = "error"
                data["error"] = f"the part process died (exit code {proc.returncode})"
        elif data["status"] is None:  # never started
            data["status"] = "timeout" if timed_out else "error"
            data["error"] = "not started: " + ("the budget ran out before it" if timed_out else
                                               f"the part process exited with code {proc.returncode} before it")
        if data["status"] in ("error", "timeout"):
            data["log_tail"] = _tail(log, 40)
        results[name] = data
    return results


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def report_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_report.json"
    return ROOT / "runs" / "gpu_check" / "report.json"


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def summarize(name: str, part: dict) -> str:
    """One line of numbers for the table."""
    r = part.get("result") or {}
    try:
        if name == "env":
            e, m = r.get("env", {}), r.get("matmul", {})
            pk = e.get("packages", {})
            return (f"{e.get('gpu', 'CPU')}, torch {e.get('torch')}, transformers {pk.get('transformers')}, "
                    f"deepspeed {pk.get('deepspeed')}, {m.get('dtype')} matmul {_fmt(m.get('tflops'), '.3g')} TFLOP/s")
        if name.startswith(("stage1_zero", "stage2_zero")):
            s, st = r.get("steps", {}), r.get("setup", {})
            mem = f", peak {_fmt(s.get('peak_mem_gib'), '.1f')} GiB" if "peak_mem_gib" in s else ""
            mfu = f", MFU {100 * s['mfu']:.1f}% (HFU {100 * s['hfu']:.1f}%)" if "mfu" in s else ""
            return (f"{st.get('llm')} LLM, step {_fmt(s.get('step_s_median'), '.3f')} s, "
                    f"{_fmt(s.get('tokens_per_s'), ',.0f')} tok/s, {_fmt(s.get('audio_s_per_s'), ',.0f')} audio s/s"
                    f"{mem}{mfu}, frozen unchanged {part.get('checks', {}).get('frozen_unchanged')}")
        if name == "encoders":
            bits = []
            for kind in ("w2v-bert", "whisper"):
                k = r.get(kind, {})
                bits.append(f"{kind} {_fmt(k.get('audio_s_per_s'), ',.0f')} audio s/s "
                            f"(cache e2e {_fmt(k.get('cache_e2e_audio_s_per_s'), ',.0f')}, "
                            f"fbank/mel {_fmt(k.get('feature_extractor_s'), '.2f')} s a batch)")
            return "; ".join(bits)
        if name == "stage1_run":
            run = r.get("run", {})
            src = str(r.get("audio_source", "?")).split(" ")[0]
            return (f"{src}, {run.get('steps')} steps, loss {_fmt(run.get('loss_first_mean'), '.3f')} -> "
                    f"{_fmt(run.get('loss_last_mean'), '.3f')}, valid cosine "
                    f"{_fmt((run.get('final_valid') or {}).get('cosine'), '.3f')}")
        if name == "tests":
            p = r.get("pytest", {})
            return (f"{p.get('tests', '?')} tests: {p.get('failures', '?')} failed, {p.get('errors', '?')} errors, "
                    f"{p.get('skipped', '?')} skipped")
    except (TypeError, KeyError, ValueError) as e:
        return f"(summary failed: {e})"
    return ""


def print_table(report: dict) -> str:
    rows = [("part", "status", "wall s", "numbers")]
    for name in report["parts"]:
        p = report["parts"][name]
        numbers = summarize(name, p)
        if p.get("status") not in ("ok", "skipped") and p.get("error"):
            numbers = (numbers + " | " if numbers else "") + str(p["error"]).splitlines()[0][:160]
        elif p.get("status") == "fail":
            bad = [k for k, v in p.get("checks", {}).items() if not v]
            numbers += f" | failed checks: {', '.join(bad)}"
        rows.append((name, str(p.get("status")), _fmt(p.get("wall_s"), ".1f"), numbers))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.insert(1, "-" * (sum(widths) + 6 + 40))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_jsonable))
    tmp.replace(path)


def orchestrate(args: argparse.Namespace) -> int:
    start = time.time()
    deadline = start + args.budget
    out = report_path(args)
    log = out.with_name("gpu_check.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.isolation != "none":
        log.write_text(f"tools/gpu_check.py {' '.join(sys.argv[1:])}  started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    wanted = args.parts.split(",") if args.parts else PART_NAMES
    unknown = [p for p in wanted if p not in PART_NAMES]
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(unknown)}; parts: {', '.join(PART_NAMES)}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
        "mode": "cpu" if args.cpu else "gpu", "tiny": bool(args.tiny), "budget_s": args.budget,
        "isolation": args.isolation, "ds_configs": args.ds, "llm_requested": args.llm, "llm_size": None,
        "peak_flops": H200_BF16_PEAK,
        "formulas": FORMULAS, "batch": {"clips": args.clips, "clip_s": args.clip_s, "tokens_per_clip": args.tokens,
                                        "steps": args.steps, "warmup": args.warmup},
        "log": str(log), "parts": {},
    }
    args.llm_size = "tiny" if args.tiny else ("8b" if args.llm == "auto" else args.llm)
    report["llm_size"] = args.llm_size
    info = {p[0]: p for p in PARTS}
    later_min = {name: sum(p[3] for p in PARTS[i + 1:] if p[0] in wanted) for i, (name, *_rest) in enumerate(PARTS)}
    if args.isolation == "group":
        units = [[n for n in g if n in wanted] for g in GROUPS]
        units = [u for u in units if u]
    else:
        units = [[n] for n in PART_NAMES if n in wanted]
    fallen_back = False

    def run(names: list[str], budget: float) -> dict[str, dict]:
        if args.isolation == "none":
            args.deadline = time.time() + budget
            return {names[0]: run_part_here(names[0], args, None)}
        return run_parts_process(names, args, budget, log)

    for names in units:
        name = names[0]
        remaining = deadline - time.time()
        cap = sum(info[n][2 if args.cpu else 1] for n in names)
        least = info[name][3]
        if name.startswith("stage2") and args.llm == "auto" and not args.tiny and not fallen_back:
            need = args.need_8b + later_min[name]
            if name == "stage2_zero2" and remaining < need:
                args.llm_size = "1b"
                fallen_back = True
                report["llm_choice"] = f"1b: {remaining:.0f} s left < {need:.0f} s needed for the 8B parts"
        budget = min(cap, max(0.0, remaining))
        if budget < least:
            for n in names:
                report["parts"][n] = {"status": "skipped", "error": f"no time left ({remaining:.0f} s)",
                                      "wall_s": 0.0, "budget_s": 0.0}
            write_report(out, report)
            continue
        print(f"[{time.time() - start:6.1f} s] {', '.join(names)} (budget {budget:.0f} s)", flush=True)
        results = run(names, budget)
        for data in results.values():
            data["budget_s"] = budget
        data = results[name]
        if (len(names) == 1 and name.startswith("stage2") and args.llm_size == "8b" and args.llm == "auto"
                and data["status"] in ("error", "timeout")):
            reason = data["status"] + ": " + str(data.get("error", ""))[:300]
            left = deadline - time.time()
            if left >= least:  # the 8B did not fit (time or memory): the 1B-size LLM instead
                args.llm_size = "1b"
                fallen_back = True
                report["llm_choice"] = f"1b after the 8B {name} {reason}"
                budget = min(cap, left)
                print(f"[{time.time() - start:6.1f} s] {name} again with the 1B LLM (budget {budget:.0f} s)",
                      flush=True)
                retry = run(names, budget)[name]
                retry.update(budget_s=budget, fallback_from={"llm": "8b", "reason": reason, "wall_s": data["wall_s"]})
                results[name] = retry
        for n, data in results.items():
            report["parts"][n] = data
            print(f"[{time.time() - start:6.1f} s] {n}: {data['status']} ({data['wall_s']:.1f} s)"
                  + (f" {data['error']}" if data.get("error") else ""), flush=True)
        report["llm_size"] = args.llm_size
        report["wall_s"] = time.time() - start
        write_report(out, report)
    report["wall_s"] = time.time() - start
    counts: dict[str, int] = {}
    for p in report["parts"].values():
        counts[p["status"]] = counts.get(p["status"], 0) + 1
    report["summary"] = counts
    print()
    report["table"] = print_table(report)
    write_report(out, report)
    print(f"\nreport: {out}  ({report['wall_s']:.0f} s, {', '.join(f'{v} {k}' for k, v in counts.items())})",
          flush=True)
    bad = sum(v for k, v in counts.items() if k in ("error", "timeout", "fail"))
    return 1 if bad else 0


# ================================================================================= install planning
#: (distribution, version range the project supports, the wheels that go in when it is missing or outside it)
INSTALL_PLAN = [
    ("deepspeed", ">=0.16", ["deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types",
                             "typing_inspection", "typing_extensions"]),
    ("transformers", ">=4.46,<5", ["transformers", "tokenizers", "huggingface_hub"]),
    ("soundfile", ">=0.12", ["soundfile", "cffi", "pycparser"]),
    ("espeakng-loader", "==0.2.*", ["espeakng_loader"]),
    ("safetensors", ">=0.4", ["safetensors"]),
    ("sentencepiece", ">=0.2", ["sentencepiece"]),
]


def plan_install(wheel_dir: str | Path, plan: list[tuple[str, str, list[str]]] | None = None) -> tuple[list[str], list[str]]:
    """(wheel files to install, notes): the wheels of every distribution that is missing or out of range."""
    from importlib import metadata

    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # a bare interpreter: pip's own copy
        from pip._vendor.packaging.specifiers import SpecifierSet

    wheel_dir = Path(wheel_dir)
    files: list[str] = []
    notes: list[str] = []
    for dist, spec, wheels in plan or INSTALL_PLAN:
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have = None
        if have is not None and SpecifierSet(spec).contains(have, prereleases=True):
            continue
        notes.append(f"{dist} {have or 'missing'} (needs {spec}): installing {', '.join(wheels)}")
        for w in wheels:
            found = sorted(wheel_dir.glob(f"{w}-*.whl"))
            if not found:
                notes.append(f"  no {w} wheel in {wheel_dir} (run tools/gpu_wheels.sh here first)")
            files += [str(f) for f in found[-1:]]
    return list(dict.fromkeys(files)), notes


# ============================================================================================ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (the dry run), fp32")
    ap.add_argument("--tiny", action="store_true", help="tiny stand-ins of every model and small batches")
    ap.add_argument("--llm", choices=["auto", "8b", "1b"], default="auto",
                    help="LLM size of stage 2 (auto: 8B unless too little time is left, then 1B; "
                         "also 1B after an 8B part that timed out or failed)")
    ap.add_argument("--need-8b", type=float, default=150.0,
                    help="auto: seconds the two 8B stage-2 parts need (besides the later parts' minimums)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all parts together (default 420 on a GPU, 300 on the CPU)")
    ap.add_argument("--parts", default="", help=f"comma list of parts to run (default all: {','.join(PART_NAMES)})")
    ap.add_argument("--isolation", choices=["auto", "part", "group", "none"], default="auto",
                    help="part: each part in its own process with a hard time limit (the 8B -> 1B fallback needs "
                         "it or none); group: GROUPS share a process and a limit; none: all in this process "
                         "(auto: part, or group with --tiny)")
    ap.add_argument("--out", default="", help="report path (default $OUT/gpu_report.json or runs/gpu_check/report.json)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "gpu_check" / "work"), help="scratch folder (models, data)")
    ap.add_argument("--encoder", choices=list(ENCODERS), default="w2v-bert", help="encoder width of the stage steps")
    ap.add_argument("--clips", type=int, default=None, help="clips per stage step (default 12; tiny 2)")
    ap.add_argument("--clip-s", type=float, default=None, help="seconds per clip in stage steps (default 12; tiny 2)")
    ap.add_argument("--tokens", type=int, default=None, help="LLM tokens per clip (default 40; tiny 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; tiny 1)")
    ap.add_argument("--enc-batch", type=int, default=None, help="30 s clips per encoder batch (default 32; tiny 2)")
    ap.add_argument("--enc-clip-s", type=float, default=None, help="clip length for the encoders (default 30; tiny 10)")
    ap.add_argument("--enc-repeats", type=int, default=None, help="timed encoder batches (default 1)")
    ap.add_argument("--run-steps", type=int, default=None, help="steps of the short stage-1 run (default 100; tiny 60)")
    ap.add_argument("--run-sentences", type=int, default=None,
                    help=f"sentences synthesized for it, every 6th for validation (default {len(SENTENCES)}; tiny 24)")
    ap.add_argument("--run-ratio", type=float, default=0.9,
                    help="the short run passes when its last losses average below this times its first ones")
    ap.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"], default="auto",
                    help="process-group backend of the one-rank DeepSpeed runs (auto: DeepSpeed's choice)")
    ap.add_argument("--ds", choices=["auto", "gpu", "cpu"], default="auto",
                    help="DeepSpeed JSONs: gpu = recipes/ds/zero{2,3}_gpu.json (the recipe's), cpu = zero{2,3}.json "
                         "(auto: gpu, or cpu with --cpu)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of a part (default: all cores; 1 with --cpu, as the test suite)")
    ap.add_argument("--plan-install", metavar="WHEEL_DIR", default=None,
                    help="print the wheels (one a line) that must be installed here, notes on stderr; then exit")
    # internal: one part in this process
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--llm-size", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tiny = args.tiny
    defaults = {"clips": (12, 2), "clip_s": (12.0, 2.0), "tokens": (40, 8), "steps": (10, 3), "warmup": (3, 1),
                "enc_batch": (32, 2), "enc_clip_s": (30.0, 10.0), "enc_repeats": (1, 1), "run_steps": (100, 60),
                "run_sentences": (len(SENTENCES), 24)}
    for k, (real, small) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, small if tiny else real)
    if args.isolation == "auto":
        args.isolation = "group" if args.tiny else "part"
    if args.threads is None:
        args.threads = 1 if args.cpu else 0
    if args.ds == "auto":
        args.ds = "cpu" if args.cpu else "gpu"
    if args.budget is None:
        args.budget = 300.0 if args.cpu else 420.0
    if args.llm_size is None:
        args.llm_size = "tiny" if tiny else ("8b" if args.llm == "auto" else args.llm)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan_install is not None:
        files, notes = plan_install(args.plan_install)
        for n in notes:
            print(n, file=sys.stderr)
        print("\n".join(files))
        return 0
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.cpu else "cuda")
    if args.part:  # inside a part process: each part writes its own result file
        codes = [run_part_here(name, args, part_out(args, name))["status"] for name in args.part.split(",")]
        return 0 if all(c in ("ok", "fail") for c in codes) else 1
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
