"""The GPU check's measuring parts: the environment and matmul peak, timed stage-1/2 steps under ZeRO-2/3,
the encoders' feature-caching throughput and the GPU test file."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from speechlm.perf import ROOT
from speechlm.perf.flops import H200_BF16_PEAK, connector_counts, llm_counts, step_flops
from speechlm.perf.gpu_check.context import STAGE_CONFIGS, Ctx, ds_json
from speechlm.perf.gpu_check.dist import init_dist
from speechlm.perf.shapes import (
    ENCODERS,
    build_encoder_folder,
    build_llama,
    llama_config,
    random_clips,
    synthetic_batch,
)


def versions() -> dict:
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
    import importlib.util
    import platform

    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_build": torch.version.cuda, "cpu_count": os.cpu_count(),
                            "packages": versions()}
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


def stage_module(ctx: Ctx, stage: int, cfg, size: str, d_enc: int):
    """(module, connector, LLM counts or None, vocab) from the stage-module factory: stage 1 against a random
    embedding table of the LLM's shape, stage 2 with the whole random LLM, built directly on the device."""
    import torch
    from transformers import LlamaConfig

    from speechlm.training import build
    from speechlm.training.deepspeed_engine import train_dtype
    from speechlm.training.factory import stage1_module, stage2_module, stage2_speechlm

    enc = build.EncoderFacts(ENCODERS[ctx.args.encoder][0], [-1], d_enc, 50.0, 16000)
    if stage == 1:
        lcfg = LlamaConfig(**llama_config(size))
        g = torch.Generator(device=ctx.device).manual_seed(0)
        table = torch.randn(lcfg.vocab_size, lcfg.hidden_size, device=ctx.device, generator=g) * 0.02
        connector = build.make_connector(cfg.model, enc, build.InputEmbeddingsOnly(lcfg, table))
        return stage1_module(cfg, connector, table), connector, None, lcfg.vocab_size
    llm = build_llama(size, ctx.device, train_dtype(cfg.engine))
    connector = build.make_connector(cfg.model, enc, llm)
    model = stage2_module(cfg, stage2_speechlm(cfg, connector, llm), llm.config.bos_token_id)
    return model, connector, llm_counts(llm), llm.config.vocab_size


def part_stage(ctx: Ctx, stage: int, zero: int) -> None:
    import gc

    import torch

    from speechlm.config import load_config
    from speechlm.training.configs import Stage1Config, Stage2Config
    from speechlm.training.deepspeed_engine import build_engine
    from speechlm.training.distributed import seed_everything, set_threads
    from speechlm.training.validation import BatchPrep

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
    info = init_dist(ctx)
    set_threads(cfg.engine.threads, info)
    seed_everything(cfg.seed, 0)
    if ctx.gpu:
        torch.cuda.reset_peak_memory_stats()
    model, connector, llm_c, vocab = stage_module(ctx, stage, cfg, size, d_enc)
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


def part_encoders(ctx: Ctx) -> None:
    import gc
    import shutil

    import torch

    from speechlm.data.audio import save_audio
    from speechlm.data.feature_cache import build_feature_cache
    from speechlm.data.manifest import Utterance, write_manifest
    from speechlm.models.encoder import SpeechEncoder

    a = ctx.args
    n, seconds = a.enc_batch, a.enc_clip_s
    waves = random_clips(n, seconds)
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
