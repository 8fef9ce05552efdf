"""Training cost per connector: stage-2 steps per second, audio seconds per wall second and peak memory on the same
batch of audio; and a stage-1 step with and without the feature cache.

    python tools/benchmarks/bench_training.py --run runs/small --threads 1 --repeats 5 [--json out.json]

One training step as the recipes run it on one rank, in one process (``--threads`` torch threads):
``recipes/configs/stage2_<preset>.yaml``'s first batch of rank 0 of 2 (its ``data.max_frames`` / ``max_tokens``
budget) from the run's aligned training split and its feature cache, through ``Stage2Finetune`` (the frozen
SmolLM2-135M, the connector trainable, AdamW): forward, backward, optimizer step. SSR is the run's stage-1
connector (``distill_weight`` of the config); the baselines are fresh connectors of their default config
(``distill_weight=0``, the speech as a prefix of the transcript). The same batch for all.

Stage 1 (SSR, ``stage1_<preset>.yaml``'s first batch): the step from cached features, against the step that
first runs the frozen encoder (Whisper base) on the batch's audio, as ``data.feature_cache=""`` does.

Each measurement runs in its own child process, so the peak resident memory (``VmHWM``) is that step's alone:
printed as the peak after loading the models and the peak over the steps. One warm-up step, then the median of
``--repeats``. Targets (issue 15): SSR's stage-2 throughput at least 1.5x stack-8's; the cache makes a stage-1 step
at least 3x faster. Writes JSON (``--json``) and a plot (``--png``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: the repository and this folder (benchlib) importable
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from benchlib import machine, pick_names, pyplot, save_figure, write_json

from speechlm.errors import ConfigError

STAGE2 = ("ssr", "stack", "conv", "qformer")
STAGE1 = ("stage1-cache", "stage1-onthefly")
TARGET_THROUGHPUT = 1.5  # SSR stage-2 throughput / stack-8's
TARGET_CACHE = 3.0  # stage-1 step without the cache / with it


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux ``VmHWM``; ``ru_maxrss`` elsewhere)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _first_batch(cfg, enc, tokenizer, need_boundaries: bool):
    from speechlm.training import build
    from speechlm.training.engine import DistInfo

    reader = build.make_reader(cfg.data, enc, tokenizer, need_boundaries=need_boundaries)
    return next(build.train_batches(cfg.data, reader, DistInfo(0, 2, 0, 2), cfg.seed))


def child(name: str, args: argparse.Namespace) -> dict:
    """One measurement (run in a fresh process): load, build the batch, time ``repeats`` steps."""
    import torch

    from speechlm.config import load_config
    from speechlm.models.connectors.base import load_connector
    from speechlm.models.speechlm import SpeechLM
    from speechlm.training import build
    from speechlm.training.configs import Stage1Config, Stage2Config
    from speechlm.training.loop import BatchPrep
    from speechlm.training.stages import Stage1Distill, Stage2Finetune, TokenEmbedding

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = Path(args.run)
    preset = args.preset or run.name
    stage = 1 if name.startswith("stage1") else 2
    cls = Stage1Config if stage == 1 else Stage2Config
    feats = Path(args.features) if args.features else _cache() / "features" / f"{preset}-{args.hours}h"
    keys = [f"data.train_manifest={run / 'aligned' / 'train.jsonl'}", f"data.feature_cache={feats / 'train'}",
            f"model.llm={args.llm or _models() / 'smollm2-135m'}",
            f"model.encoder={args.encoder or _models() / 'whisper-base'}", "data.num_workers=0"]
    cfg = load_config(cls, ROOT / "recipes" / "configs" / f"stage{stage}_{preset}.yaml", keys)
    enc = build.encoder_facts(cfg.model, cfg.data)
    encoder = None
    if stage == 1:
        llm, tokenizer = build.load_llm_embeddings(cfg.model.llm)
        connector = load_connector(run / "stage1" / "connector", llm=llm)
        module = Stage1Distill(connector, TokenEmbedding(llm.get_input_embeddings().weight))
        batch = _first_batch(cfg, enc, tokenizer, True)
        if name == "stage1-onthefly":  # the same rows, read as audio: the encoder runs in every step
            encoder = build.load_encoder(cfg.model)
            cfg.data.feature_cache = ""
            reader = build.make_reader(cfg.data, build.encoder_facts(cfg.model, cfg.data, encoder), tokenizer)
            rows = {u.id: u for u in build.read_split(cfg.data.train_manifest, cfg.data.train_split)}
            batch = reader.read_batch([rows[i] for i in batch.utt_ids])
    else:
        llm, tokenizer = build.load_llm(cfg.model.llm)
        if name == "ssr":
            connector = load_connector(run / "stage1" / "connector", llm=llm)
            distill = cfg.distill_weight
        else:
            cfg.model.connector = {"name": name}
            connector = build.make_connector(cfg.model, enc, llm)
            distill = 0.0
        module = Stage2Finetune(SpeechLM(connector, llm), tokenizer.bos_token_id if cfg.bos else None, distill)
        batch = _first_batch(cfg, enc, tokenizer, True)
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


def _cache() -> Path:
    from speechlm.paths import cache_dir

    return cache_dir()


def _models() -> Path:
    from speechlm.paths import models_dir

    return models_dir()


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/small", help="a run with aligned/train.jsonl and stage1/connector")
    ap.add_argument("--preset", default="")
    ap.add_argument("--hours", default="5.0")
    ap.add_argument("--features", default="")
    ap.add_argument("--llm", default="")
    ap.add_argument("--encoder", default="")
    ap.add_argument("--only", default=",".join(STAGE2 + STAGE1))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="runs/bench/training.json")
    ap.add_argument("--png", default="runs/bench/training.png")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = pick_names(args.only, STAGE2 + STAGE1, "bench_training --only")
    for need in (Path(args.run) / "aligned" / "train.jsonl", Path(args.run) / "stage1" / "connector"):
        if not need.exists():
            raise ConfigError(f"bench_training: {need} not found (run `make small` first, or pass --run)")
    if args.child:
        print(json.dumps(child(names[0], args)))
        return {}
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--only", name, "--child"]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_training: {name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['step_s']:.3f} s per step", flush=True)
    by = {r["name"]: r for r in rows}
    checks = {}
    if "ssr" in by and "stack" in by:
        ratio = by["ssr"]["audio_s_per_wall_s"] / by["stack"]["audio_s_per_wall_s"]
        checks["ssr_vs_stack_throughput"] = {"ratio": ratio, "target": TARGET_THROUGHPUT, "met": ratio >= TARGET_THROUGHPUT}
    if set(STAGE1) <= set(by):
        ratio = by["stage1-onthefly"]["step_s"] / by["stage1-cache"]["step_s"]
        checks["cache_speedup"] = {"ratio": ratio, "target": TARGET_CACHE, "met": ratio >= TARGET_CACHE}
    result = {"benchmark": "training cost", "machine": machine(), "threads": args.threads, "repeats": args.repeats, "rows": rows, "targets": checks}
    print(table(rows))
    for key, c in checks.items():
        print(f"target {key}: {c['ratio']:.2f}x (>= {c['target']}x) -> {'met' if c['met'] else 'MISSED'}")
    if args.json:
        write_json(args.json, result)
    if args.png:
        plot(rows, Path(args.png))
        print(f"wrote {args.png}")
    return result


if __name__ == "__main__":
    main()
