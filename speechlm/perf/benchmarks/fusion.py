"""Hierarchical feature fusion against picking encoder layers: stage 1 of the SSR connector per variant, the
all-layers feature cache and its one-layer cuts, and the table (tools/benchmarks/bench_fusion.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from speechlm.errors import ConfigError
from speechlm.perf import ROOT
from speechlm.perf.bench import (
    launch_recipe,
    machine,
    pick_names,
    recipe_env,
    reuse_finished,
    stage1_inputs,
    stage1_overrides,
    stage_metrics,
    write_stage1_report,
)

VARIANTS = ("top", "middle", "weighted", "hierarchical")
LABELS = {"top": "top layer only", "middle": "one middle layer", "weighted": "weighted sum of all layers",
          "hierarchical": "hierarchical fusion of all layers"}
SPLITS = ("train", "valid")
CACHE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def variants(depth: int, middle: int, group: int, fusion_dim: int) -> dict[str, dict[str, Any]]:
    """Each variant's encoder hidden-state indices (0 = embeddings output .. ``depth`` = last layer) and connector
    overrides."""
    every = list(range(depth + 1))
    return {
        "top": {"layers": [depth], "connector": {}},
        "middle": {"layers": [middle], "connector": {}},
        "weighted": {"layers": every, "connector": {"layer_fusion": "weighted"}},
        "hierarchical": {"layers": every, "connector": {"layer_fusion": "hierarchical", "fusion_group": group,
                                                        "fusion_dim": fusion_dim}},
    }


def cache_command(manifest: Path, encoder: Path, out: Path, layers: list[int]) -> list[str]:
    """tools/cache_features.py for ``layers`` of ``manifest`` into ``out`` (fp16 shards + index)."""
    return [sys.executable, str(ROOT / "tools" / "cache_features.py"), "--manifest", str(manifest), "--encoder",
            str(encoder), "--out", str(out), "--layers", *map(str, layers), "--batch-size", "8", "--threads", "2"]


def cache_stats(folder: str | Path) -> dict[str, Any]:
    """What a feature cache costs per second of audio: by formula (L x D x frame rate x bytes per value) and
    measured (shard bytes over the cached audio's seconds)."""
    from speechlm.data.feature_cache import FeatureCache

    cache = FeatureCache.open(folder)
    value_bytes = CACHE_BYTES.get(cache.index.get("dtype", "float16"), 2)
    audio_s = sum(cache.frames(u) for u in cache.ids) / cache.frame_rate_hz
    shard_bytes = sum(cache.index["shards"].values())
    return {"layers": list(cache.layers), "hidden_size": cache.hidden_size, "frame_rate_hz": cache.frame_rate_hz,
            "value_bytes": value_bytes, "audio_s": audio_s, "bytes": shard_bytes,
            "bytes_per_s": len(cache.layers) * cache.hidden_size * cache.frame_rate_hz * value_bytes,
            "bytes_per_s_measured": shard_bytes / audio_s if audio_s else 0.0}


def connector_params(config: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, the layer fusion's) of the connector an exported config describes (built, not loaded)."""
    from speechlm.models.connectors import build_connector

    conn = build_connector(config)
    return sum(p.numel() for p in conn.parameters()), sum(p.numel() for p in conn.fusion.parameters())


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the variants' rows (see ``main``)."""
    lines = [("| variant | layers | valid cosine | token acc | valid loss | trainable params (fusion) | step s (median) "
              "| cache KB per audio s (measured) | cache vs 1 layer |"), "|" + "---|" * 9]
    for r in rows:
        c = r["cache"]
        layers = ",".join(map(str, r["layers"])) if len(r["layers"]) <= 3 else f"{r['layers'][0]}..{r['layers'][-1]}"
        lines.append(f"| {LABELS.get(r['variant'], r['variant'])} | {layers} | {r['cosine']:.3f} | {r['token_acc']:.3f} | "
                     f"{r['loss']:.3f} | {r['params'] / 1e6:.3f} M ({r['params_fusion']:,}) | "
                     f"{r['step_time_s_median']:.3f} | {c['bytes_per_s'] / 1e3:.1f} ({c['bytes_per_s_measured'] / 1e3:.1f}) "
                     f"| {len(c['layers'])}x |")
    return "\n".join(lines)


def all_features(args: argparse.Namespace, paths: dict[str, Path], work: Path, depth: int) -> Path:
    """The all-layers cache of the train and valid rows: ``--all-features``, else built into <work>/features/all."""
    from speechlm.data.feature_cache import FeatureCache

    root = Path(args.all_features) if args.all_features else work / "features" / "all"
    every = list(range(depth + 1))
    for split in SPLITS:
        if not (root / split / "index.json").is_file():
            if args.all_features:
                raise ConfigError(f"bench_fusion: --all-features {root}: no complete cache in {root / split}")
            cmd = cache_command(paths[split], paths["encoder"], root / split, every)
            print(f"[features] caching all {len(every)} hidden states of {split}: {' '.join(cmd)}", flush=True)
            if subprocess.call(cmd, cwd=ROOT, env=recipe_env()) != 0:
                raise RuntimeError(f"bench_fusion: caching the {split} features failed")
        cached = FeatureCache.open(root / split).layers
        if list(cached) != every:
            raise ConfigError(f"bench_fusion: {root / split} holds layers {list(cached)}, not all of {every}")
    return root


def variant_features(all_root: Path, work: Path, layers: list[int]) -> Path:
    """The cache a variant reads: the all-layers one, or ``layers`` cut from it into <work>/features/layer<k>."""
    from speechlm.data.feature_cache import FeatureCache, select_layers

    if list(FeatureCache.open(all_root / "train").layers) == layers:
        return all_root
    root = work / "features" / ("layer" + "-".join(map(str, layers)))
    for split in SPLITS:
        select_layers(all_root / split, root / split, layers)
    return root


def train(name: str, variant: dict[str, Any], args: argparse.Namespace, paths: dict[str, Path], features: Path,
          out: Path) -> None:
    """Stage 1 for one variant (the recipe, under the launcher), unless a run of ``--steps`` is already there."""
    if reuse_finished(name, out, args.steps, args.retrain):
        return
    keys = [*stage1_overrides(paths, out, args.seed, args.steps),
            f"data.feature_cache={features / 'train'}", f"data.valid_feature_cache={features / 'valid'}",
            f"model.encoder_layers=[{','.join(map(str, variant['layers']))}]",
            *[f"model.connector.{k}={v}" for k, v in variant["connector"].items()]]
    out.mkdir(parents=True, exist_ok=True)
    launch_recipe(name, "stage1_distill.py", paths["config"], keys, args, out.parent / f"{name}.log",
                  f"bench_fusion: stage 1 of {name}")


def row(name: str, variant: dict[str, Any], out: Path, features: Path) -> dict[str, Any]:
    """One variant's numbers: its stage-1 metrics, parameters and feature-cache cost."""
    s = stage_metrics(out)
    if s is None or s["connector"] is None:
        raise RuntimeError(f"bench_fusion: {out} has no metrics.json or exported connector")
    params, fusion = connector_params(s.pop("connector"))
    return {"variant": name, "layers": variant["layers"], **variant["connector"], **s, "params": params,
            "params_fusion": fusion, "cache": cache_stats(features / "train"), "run": str(out)}


def run(args: argparse.Namespace) -> dict:
    """Every variant of ``args.variants``: its features, stage 1 (reused when finished), its row; the JSON report."""
    names = pick_names(args.variants, list(VARIANTS), "bench_fusion --variants")
    paths = stage1_inputs(args.run, args.preset, args.llm, args.encoder, "bench_fusion")
    from speechlm.models.encoder import SpeechEncoder

    depth = SpeechEncoder(str(paths["encoder"])).num_hidden_layers
    middle = depth // 2 if args.middle < 0 else args.middle
    if not 0 <= middle <= depth:
        raise ConfigError(f"bench_fusion: --middle {middle} is not a hidden state of a {depth}-layer encoder")
    plans = variants(depth, middle, args.group, args.fusion_dim)
    work = Path(args.work)
    all_root = all_features(args, paths, work, depth)
    rows = []
    for name in names:
        features = variant_features(all_root, work, plans[name]["layers"])
        train(name, plans[name], args, paths, features, work / name)
        rows.append(row(name, plans[name], work / name, features))
    result = {"benchmark": "layer fusion (stage 1)", "machine": machine(), "run": args.run, "steps": args.steps,
              "seed": args.seed, "ranks": args.ranks, "encoder_depth": depth, "rows": rows}
    write_stage1_report(result, args, table(rows))
    return result
