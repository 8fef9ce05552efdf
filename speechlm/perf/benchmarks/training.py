"""Training cost per connector: one stage-2 (or stage-1) step as the recipes run it, timed in a fresh child process
each (tools/benchmarks/bench_training.py); throughput, peak memory and the issue-15 targets."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from speechlm.errors import ConfigError
from speechlm.perf import ROOT
from speechlm.perf.bench import machine, peak_rss_mib, pick_names, pyplot, save_figure, write_outputs

STAGE2 = ("ssr", "stack", "conv", "qformer")
STAGE1 = ("stage1-cache", "stage1-onthefly")
TARGET_THROUGHPUT = 1.5  # SSR stage-2 throughput / stack-8's
TARGET_CACHE = 3.0  # stage-1 step without the cache / with it


def _first_batch(cfg, enc, tokenizer, need_boundaries: bool):
    from speechlm.training import build
    from speechlm.training.distributed import DistInfo

    reader = build.make_reader(cfg.data, enc, tokenizer, need_boundaries=need_boundaries)
    return next(build.train_batches(cfg.data, reader, DistInfo(0, 2, 0, 2), cfg.seed))


def child(name: str, args: argparse.Namespace) -> dict:
    """One measurement (run in a fresh process): load, build the batch, time ``repeats`` steps."""
    import torch

    from speechlm.config import load_config
    from speechlm.models.connectors import connector_config_from_dict
    from speechlm.paths import cache_dir, models_dir
    from speechlm.training import build
    from speechlm.training.configs import Stage1Config, Stage2Config
    from speechlm.training.factory import build_stage1, build_stage2
    from speechlm.training.validation import BatchPrep

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = Path(args.run)
    preset = args.preset or run.name
    stage = 1 if name.startswith("stage1") else 2
    cls = Stage1Config if stage == 1 else Stage2Config
    feats = Path(args.features) if args.features else cache_dir() / "features" / f"{preset}-{args.hours}h"
    keys = [f"data.train_manifest={run / 'aligned' / 'train.jsonl'}", f"data.feature_cache={feats / 'train'}",
            f"model.llm={args.llm or models_dir() / 'smollm2-135m'}",
            f"model.encoder={args.encoder or models_dir() / 'whisper-base'}", "data.num_workers=0"]
    cfg = load_config(cls, ROOT / "recipes" / "configs" / f"stage{stage}_{preset}.yaml", keys)
    enc = build.encoder_facts(cfg.model, cfg.data)
    encoder = None
    if stage == 1:
        parts = build_stage1(cfg, init_connector=run / "stage1" / "connector")
        module, tokenizer = parts.model, parts.tokenizer
        batch = _first_batch(cfg, enc, tokenizer, True)
        if name == "stage1-onthefly":  # the same rows, read as audio: the encoder runs in every step
            encoder = build.load_encoder(cfg.model)
            cfg.data.feature_cache = ""
            reader = build.make_reader(cfg.data, build.encoder_facts(cfg.model, cfg.data, encoder), tokenizer)
            rows = {u.id: u for u in build.read_split(cfg.data.train_manifest, cfg.data.train_split)}
            batch = reader.read_batch([rows[i] for i in batch.utt_ids])
    else:
        cfg.leakage_utts = 0  # one training step: no leakage check, so no encoder is loaded
        if name == "ssr":
            cfg.model.init_connector = str(run / "stage1" / "connector")
        else:  # a baseline: a fresh connector of its default config, the speech as a prefix (no stage-1 term)
            cfg.model.init_connector = ""
            cfg.model.connector = connector_config_from_dict({"name": name})
            cfg.distill_weight = 0.0
        parts = build_stage2(cfg, dtype=torch.float32)
        module = parts.model
        batch = _first_batch(cfg, enc, parts.tokenizer, True)
    module.train()
    prep = BatchPrep(torch.device("cpu"), None, encoder)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loaded_mib = peak_rss_mib()
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        b = prep(batch)
        loss, _ = module(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    b = prep(batch)  # features computed (on the fly: by the encoder) and on the device
    audio_s = float(b.frame_lengths.sum()) / enc.frame_rate_hz
    with torch.no_grad():
        conn = module.connector if stage == 1 else module.speechlm.connector
        out = conn(b.features, b.frame_lengths, b.boundaries, b.token_mask)
    return {"name": name, "stage": stage, "step_s": sec, "step_s_min": min(times), "steps_per_s": 1 / sec,
            "audio_s": audio_s, "audio_s_per_wall_s": audio_s / sec, "clips": len(batch.utt_ids),
            "tokens": int(batch.token_mask.sum()), "speech_vectors": int(out.mask.sum()),
            "trainable_params": sum(p.numel() for p in params),
            "peak_rss_loaded_mib": loaded_mib, "peak_rss_mib": peak_rss_mib(), "threads": args.threads}


def table(rows: list[dict]) -> str:
    lines = [("| step | clips | audio s | speech vectors (tokens) | step s (median) | steps/s | audio s / wall s | "
             "peak RSS MiB (loaded -> steps) | trainable M |"), "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['name']} | {r['clips']} | {r['audio_s']:.1f} | {r['speech_vectors']} ({r['tokens']}) | "
                     f"{r['step_s']:.3f} | {r['steps_per_s']:.2f} | {r['audio_s_per_wall_s']:.1f} | "
                     f"{r['peak_rss_loaded_mib']:.0f} -> {r['peak_rss_mib']:.0f} | {r['trainable_params'] / 1e6:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [r["name"] for r in rows]
    colors = ["#1f77b4" if n.startswith(("ssr", "stage1")) else "#999999" for n in names]
    a.barh(names, [r["audio_s_per_wall_s"] for r in rows], color=colors)
    a.set_xlabel("audio seconds trained per wall second")
    a.invert_yaxis()
    b.barh(names, [r["peak_rss_mib"] - r["peak_rss_loaded_mib"] for r in rows], color=colors)
    b.set_xlabel("peak RSS over the steps minus after loading (MiB)")
    b.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)


def targets(rows: list[dict]) -> dict:
    """The issue-15 targets the rows can check: SSR vs stack-8 throughput, the feature cache's speed-up."""
    by = {r["name"]: r for r in rows}
    checks = {}
    if "ssr" in by and "stack" in by:
        ratio = by["ssr"]["audio_s_per_wall_s"] / by["stack"]["audio_s_per_wall_s"]
        checks["ssr_vs_stack_throughput"] = {"ratio": ratio, "target": TARGET_THROUGHPUT,
                                             "met": ratio >= TARGET_THROUGHPUT}
    if set(STAGE1) <= set(by):
        ratio = by["stage1-onthefly"]["step_s"] / by["stage1-cache"]["step_s"]
        checks["cache_speedup"] = {"ratio": ratio, "target": TARGET_CACHE, "met": ratio >= TARGET_CACHE}
    return checks


def run(args: argparse.Namespace) -> dict:
    """Every step of ``args.only`` in its own child process (so each peak memory is its own); table, JSON, plot."""
    names = pick_names(args.only, STAGE2 + STAGE1, "bench_training --only")
    for need in (Path(args.run) / "aligned" / "train.jsonl", Path(args.run) / "stage1" / "connector"):
        if not need.exists():
            raise ConfigError(f"bench_training: {need} not found (run `make small` first, or pass --run)")
    rows = []
    for name in names:
        cmd = [sys.executable, "-m", __name__, name, json.dumps(vars(args))]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_training: {name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['step_s']:.3f} s per step", flush=True)
    checks = targets(rows)
    result = {"benchmark": "training cost", "machine": machine(), "threads": args.threads, "repeats": args.repeats,
              "rows": rows, "targets": checks}
    print(table(rows))
    for key, c in checks.items():
        print(f"target {key}: {c['ratio']:.2f}x (>= {c['target']}x) -> {'met' if c['met'] else 'MISSED'}")
    write_outputs(result, args.json, args.png, lambda png: plot(rows, png))
    return result


if __name__ == "__main__":  # a child of ``run``: ``python -m speechlm.perf.benchmarks.training NAME '<args as JSON>'``
    print(json.dumps(child(sys.argv[1], argparse.Namespace(**json.loads(sys.argv[2])))))
