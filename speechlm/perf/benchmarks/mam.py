"""Multimodal attention merging: Whisper base's own ASR WER with its decoder's self-attention merged into its
encoder, fixed factors and learnable (tools/benchmarks/bench_mam.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from speechlm.errors import ConfigError
from speechlm.perf.bench import machine, write_json

MAX_S = 30.0  # one Whisper window: longer clips would be cut, so they are left out


def _rows(manifest: str, split: str, limit: int) -> tuple[list, int]:
    from speechlm.data.manifest import read_manifest

    if not Path(manifest).is_file():
        raise ConfigError(f"bench_mam: manifest not found: {manifest}")
    rows = [u for u in read_manifest(manifest) if not split or u.split == split]
    long = [u for u in rows if u.duration_s > MAX_S]
    rows = [u for u in rows if u.duration_s <= MAX_S]
    if limit:
        rows = rows[:limit]
    if not rows:
        raise ConfigError(f"bench_mam: no rows of split {split!r} (at most {MAX_S:g} s) in {manifest}")
    return rows, len(long)


def evaluate(cascade, waves: list[torch.Tensor], refs: list[str], batch_size: int) -> dict:
    from speechlm.eval.asr import word_error_rate

    t0 = time.perf_counter()
    hyps = cascade.transcribe(waves, batch_size=batch_size)
    return {"wer": word_error_rate(refs, hyps), "decode_s": round(time.perf_counter() - t0, 2), "hypotheses": hyps}


def run(args) -> dict:
    from speechlm.data.audio import load_audio
    from speechlm.eval.asr import WhisperCascade
    from speechlm.models.merging import merge_attention
    from speechlm.training.whisper_merge import learn_whisper_merge

    test, skipped = _rows(args.manifest, args.split, args.max_utts)
    cascade = WhisperCascade(args.model)
    model = cascade.model
    sr = cascade.sample_rate
    waves = [load_audio(u.audio_path, sr, expected_sr=u.sample_rate) for u in test]
    refs = [u.text for u in test]
    encoder = model.get_encoder()
    pristine = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    projections = tuple(p for p in args.projections.split(",") if p)
    rows = []
    for a in args.factors:
        encoder.load_state_dict(pristine)
        report = merge_attention(model, model, a, projections, args.rule)
        res = evaluate(cascade, waves, refs, args.batch_size)
        rows.append({"config": f"MAM a={a:g}", "factor": a, "factors": report["factors"], **res})
        print(f"  {rows[-1]['config']}: WER {res['wer']:.4f} ({res['decode_s']:.0f} s)", flush=True)
    if args.learn_steps > 0:
        from speechlm.data.manifest import read_manifest

        train_manifest = args.train_manifest or str(Path(args.manifest).with_name("train.jsonl"))
        if not Path(train_manifest).is_file():
            raise ConfigError(f"bench_mam: train manifest not found: {train_manifest} (--train-manifest)")
        train = [u for u in read_manifest(train_manifest) if u.split == "train" and u.duration_s <= MAX_S]
        if args.train_utts:
            train = train[: args.train_utts]
        if not train:
            raise ConfigError(f"bench_mam: no train rows in {train_manifest}")
        encoder.load_state_dict(pristine)
        t0 = time.perf_counter()
        report = learn_whisper_merge(model, cascade.processor, train, args.learn_steps, args.learn_init,
                                     projections=projections, rule=args.rule, batch_size=args.learn_batch_size,
                                     lr=args.lr, seed=args.seed,
                                     log=lambda s: print("   ", s, flush=True))
        train_s = round(time.perf_counter() - t0, 1)
        res = evaluate(cascade, waves, refs, args.batch_size)
        losses = report["losses"]
        rows.append({"config": f"learnable MAM ({args.learn_steps} steps)", "factor": None,
                     "factors": report["factors"], "train_s": train_s, "train_utterances": len(train),
                     "loss_first": losses[0], "loss_last": losses[-1], "losses": losses, **res})
        print(f"  {rows[-1]['config']}: WER {res['wer']:.4f}, factors "
              + " ".join(f"{x:.3f}" for x in report["factors"]), flush=True)
    base = next((r["wer"] for r in rows if r["factor"] == 0.0), None)
    for r in rows:
        r["rel_change"] = None if base is None or base == 0 else (r["wer"] - base) / base
    return {"utterances": len(test), "skipped_longer_than_30s": skipped, "references": refs,
            "projections": list(projections), "rule": args.rule, "baseline_wer": base, "rows": rows}


def table(result: dict) -> str:
    lines = ["| configuration | per-layer factors | WER | vs factor 0 |", "|---|---|---|---|"]
    for r in result["rows"]:
        rel = "" if r["rel_change"] is None else f"{r['rel_change']:+.1%}"
        factors = " ".join(f"{x:.3g}" for x in r["factors"])
        lines.append(f"| {r['config']} | {factors} | {r['wer']:.4f} | {rel} |")
    return "\n".join(lines)


def parse_factors(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def run_benchmark(args: argparse.Namespace) -> dict:
    """The sweep (factor 0 always included: the reference), the table and the JSON report."""
    torch.set_num_threads(args.threads)
    if 0.0 not in args.factors:
        args.factors = [0.0, *args.factors]  # the reference every change is measured against
    result = run(args)
    result.update(benchmark="mam", machine=machine(), manifest=args.manifest, model=args.model)
    print(f"{result['utterances']} test clips ({result['skipped_longer_than_30s']} longer than 30 s left out)")
    print(table(result))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return result
