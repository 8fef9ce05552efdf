"""Compression: LLM input vectors per second of audio, SSR (reference and free-mode aligner tokens) against the
baseline connectors (tools/benchmarks/bench_compression.py)."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from speechlm.errors import ConfigError
from speechlm.perf.bench import machine, pyplot, save_figure, write_outputs

TARGET_SSR_RATE = 4.5  # issue 15: SSR uses at most 4.5 LLM inputs per audio second
BASELINES = (("stack k=8 (Ultravox)", {"name": "stack"}), ("conv k=5 (SLAM-LLM)", {"name": "conv"}),
             ("Q-Former 0.33 s (SALMONN)", {"name": "qformer"}))
CLIPS_S = (30.0, 300.0)


def baseline_counter(cfg: dict, d_enc: int, frame_rate_hz: float):
    """frames -> number of vectors the connector gives for a clip of that many encoder frames."""
    from speechlm.models.connectors import build_connector

    small = {"d_model": 8, "n_heads": 1, "n_layers": 1} if cfg["name"] == "qformer" else {"hidden": 8}
    conn = build_connector({**cfg, "d_enc": d_enc, "d_llm": 8, "frame_rate_hz": frame_rate_hz, **small})
    conn.eval()
    memo: dict[int, int] = {}

    @torch.no_grad()
    def count(frames: int) -> int:
        if frames not in memo:
            out = conn(torch.zeros(1, 1, frames, d_enc), torch.tensor([frames]), None, None)
            memo[frames] = int(out.mask.sum())
        return memo[frames]

    return count


def measure(manifest: str, cache_dir: str, tokenizer_path: str, aligner: str = "", limit: int = 0,
            batch_size: int = 8) -> dict:
    from transformers import AutoTokenizer

    from speechlm.data.feature_cache import FeatureCache
    from speechlm.data.manifest import read_manifest

    if not Path(manifest).is_file():
        raise ConfigError(f"bench_compression: manifest not found: {manifest}")
    cache = FeatureCache.open(cache_dir)
    utts = [u for u in read_manifest(manifest) if u.id in cache]
    if limit:
        utts = utts[:limit]
    if not utts:
        raise ConfigError(f"bench_compression: no row of {manifest} is in the feature cache {cache_dir}")
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    rate = cache.frame_rate_hz
    frames = [cache.frames(u.id) for u in utts]
    seconds = [f / rate for f in frames]
    counts: dict[str, list[int]] = {"SSR (reference tokens)": [len(tok(u.text, add_special_tokens=False).input_ids)
                                                              for u in utts]}
    if aligner:
        from alignment.aligner import Aligner

        al = Aligner.from_pretrained(aligner, tok)
        free, free_words = [], 0
        for i in range(0, len(utts), batch_size):
            chunk = utts[i:i + batch_size]
            feats = [cache[u.id] for u in chunk]  # (L, T, D) each
            t = max(f.shape[1] for f in feats)
            x = torch.zeros(len(chunk), feats[0].shape[0], t, feats[0].shape[2])
            for j, f in enumerate(feats):
                x[j, :, :f.shape[1]] = f
            lengths = torch.tensor([f.shape[1] for f in feats])
            results = al.align(x, lengths, [None] * len(chunk), [u.id for u in chunk])
            free += [len(r.token_ids) for r in results]
            free_words += sum(len(r.text.split()) for r in results)
        counts["SSR (free-mode aligner)"] = free
        # why the free-mode count differs: the decoded transcripts' words against the references'
        words = {"reference": sum(len(u.text.split()) for u in utts), "free_mode": free_words}
    counters = {}
    for label, cfg in BASELINES:
        counters[label] = baseline_counter(cfg, cache.hidden_size, rate)
        counts[label] = [counters[label](f) for f in frames]
    total_s = sum(seconds)
    rows = []
    for label, c in counts.items():
        per_s = sum(c) / total_s
        if label in counters:
            long = {f"{int(s)}s": counters[label](round(s * rate)) for s in CLIPS_S}
        else:
            long = {f"{int(s)}s": round(per_s * s) for s in CLIPS_S}
        rows.append({"connector": label, "vectors_per_s": per_s,
                     "median_clip_per_s": statistics.median(n / s for n, s in zip(c, seconds)),
                     "vectors": sum(c), "seq_len": long})
    out = {"utterances": len(utts), "audio_s": total_s, "frame_rate_hz": rate, "rows": rows}
    if aligner:
        out["words"] = words
    return out


def table(result: dict) -> str:
    lines = ["| connector | LLM inputs / audio s (split) | median clip | 30 s clip | 5 min clip |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['connector']} | {r['vectors_per_s']:.2f} | {r['median_clip_per_s']:.2f} | "
                     f"{r['seq_len']['30s']} | {r['seq_len']['300s']} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.barh([r["connector"] for r in rows], [r["vectors_per_s"] for r in rows],
            color=["#1f77b4" if r["connector"].startswith("SSR") else "#999999" for r in rows])
    ax.axvline(TARGET_SSR_RATE, color="r", ls="--", lw=1, label=f"target for SSR ({TARGET_SSR_RATE}/s)")
    ax.invert_yaxis()
    ax.set_xlabel("LLM input vectors per second of audio (test split)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def run(args: argparse.Namespace) -> dict:
    """Measure, check the issue-15 target on SSR's count, print the table; JSON and plot when asked."""
    torch.set_num_threads(args.threads)
    if args.aligner and not Path(args.aligner).is_dir():
        raise ConfigError(f"bench_compression: aligner folder not found: {args.aligner} (or pass --aligner '')")
    result = measure(args.manifest, args.feature_cache, args.tokenizer, args.aligner, args.limit)
    ssr = next(r for r in result["rows"] if r["connector"] == ("SSR (free-mode aligner)" if args.aligner
                                                                  else "SSR (reference tokens)"))
    result.update(benchmark="compression", machine=machine(), manifest=args.manifest,
                  target={"ssr_max_per_s": TARGET_SSR_RATE, "ssr_per_s": ssr["vectors_per_s"],
                          "met": ssr["vectors_per_s"] <= TARGET_SSR_RATE})
    print(f"{result['utterances']} test clips, {result['audio_s']:.0f} s of audio, encoder at "
          f"{result['frame_rate_hz']:g} Hz")
    print(table(result))
    if "words" in result:
        w, ref, free = result["words"], result["rows"][0]["vectors"], result["rows"][1]["vectors"]
        print(f"free mode against the references: words {w['free_mode']} / {w['reference']}, "
              f"tokens {free} / {ref} ({free / ref - 1:+.0%})")
    t = result["target"]
    print(f"target: SSR <= {TARGET_SSR_RATE} inputs/s: {t['ssr_per_s']:.2f} -> {'met' if t['met'] else 'MISSED'}")
    write_outputs(result, args.json, args.png, lambda png: plot(result, png))
    return result
