"""Partition-and-fusion against the dense block: the speaker probe on encoder features and connector vectors,
and the SSR connector's parameters, FLOPs and fwd+bwd time (tools/benchmarks/bench_partition.py)."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from speechlm.config import load_config
from speechlm.eval.speaker import (
    SpeakerProbeConfig,
    evaluate_probe,
    load_sequences,
    read_rows,
    score_trials,
    speaker_of,
    train_probe,
)
from speechlm.models.connectors import build_connector
from speechlm.perf import ROOT
from speechlm.perf.bench import machine, pyplot, save_figure, stage_metrics, write_json
from speechlm.perf.benchmarks.connector import make_batch, time_fwd_bwd


def fwd_bwd_flops(conn: torch.nn.Module, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        conn(*batch).embeds.square().mean().backward()
    conn.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def connector_rows(groups: int, repeats: int) -> list[dict]:
    batch = make_batch(8, 10.0, 50.0, 512, 3.5)
    common = {"d_enc": 512, "d_llm": 576, "frame_rate_hz": 50.0, "name": "ssr"}
    shapes = [("tiny (d 256, 2 layers, causal, k=4, slots)",
               {"d_model": 256, "n_layers": 2, "n_heads": 4, "mask": "causal", "stack": 4, "slot_readout": True}),
              ("default (d 384, 4 layers, blockwise, k=1)", {})]
    rows = []
    for label, shape in shapes:
        for g in (0, groups):
            torch.manual_seed(0)
            conn = build_connector({**common, **shape, "partition_groups": g}).train()
            ffn = sum(p.numel() for b in conn.blocks for p in b.mlp.parameters())
            rows.append({"connector": label, "partition_groups": g,
                         "params": sum(p.numel() for p in conn.parameters()), "params_ffn": ffn,
                         "gflops_fwd_bwd": fwd_bwd_flops(conn, batch) / 1e9,
                         "fwd_bwd_ms": 1000 * time_fwd_bwd(conn, batch, repeats),
                         "load_1min_after": machine()["load_1min"]})
            print(f"  {label} G={g}: {rows[-1]['params'] / 1e6:.3f} M params, "
                  f"{rows[-1]['gflops_fwd_bwd']:.2f} GFLOP, {rows[-1]['fwd_bwd_ms']:.1f} ms", flush=True)
    return rows


def probe_run(out_dir: Path, overrides: list[str], evals: dict[str, tuple[list[str], list[str]]]) -> dict:
    cfg = load_config(SpeakerProbeConfig, str(ROOT / "recipes/configs/speaker_probe_tiny.yaml"),
                      [f"out_dir={out_dir}", "train.progress=false", *overrides])
    m = train_probe(cfg)
    row = {k: m[k] for k in ("params_embedder", "params_blocks", "params_head", "loss_first", "loss_last",
                             "step_time_s_median", "train_speakers", "train_utterances")}
    row["losses"] = m["losses"]
    for name, (manifests, caches) in evals.items():
        r = evaluate_probe(out_dir / "probe", manifests, caches, progress=False)
        row[name] = {k: r[k] for k in ("eer", "min_dcf", "trials", "target_trials", "utterances", "speakers")}
    write_json(out_dir / "eval.json", row)
    return row


def untrained_baseline(evals: dict[str, tuple[list[str], list[str]]], input_kind: str, connector: str) -> dict:
    """No probe: cosine of the inputs' per-utterance [mean, std] vectors, centred over the evaluated set."""
    from speechlm.models.connectors import load_connector

    conn = load_connector(connector) if input_kind == "connector" else None
    out = {}
    for name, (manifests, caches) in evals.items():
        seqs, speakers = [], []
        for manifest, cache in zip(manifests, caches):
            rows = read_rows(manifest)
            seqs += load_sequences(rows, cache, input_kind, connector=conn, progress=False)
            speakers += [speaker_of(u) for u in rows]
        stats = torch.stack([torch.cat((s.float().mean(0), s.float().std(0))) for s in seqs])
        r = score_trials(stats - stats.mean(0), speakers)
        out[name] = {"eer": r["eer"], "eer_sd": 0.0, "min_dcf": r["min_dcf"], "min_dcf_sd": 0.0}
    return out


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: list[dict], key: str) -> dict:
    out = {}
    for metric in ("eer", "min_dcf"):
        vals = [r[key][metric] for r in runs if key in r]
        if vals:
            out[metric], out[metric + "_sd"] = mean_sd(vals)
    return out


def run(args: argparse.Namespace) -> dict:
    """Connector rows, the probes (unless ``skip_probe``), stage-1 runs' metrics; JSON, tables and the loss plot."""
    torch.set_num_threads(args.threads)
    corpus, feats, work = Path(args.corpus), Path(args.features), Path(args.work)
    result: dict = {"machine_start": machine(), "groups": args.groups, "seeds": args.seeds,
                    "probe_steps": args.probe_steps, "dcf": {"p_target": 0.01, "c_miss": 1.0, "c_fa": 1.0}}

    print("connector: parameters, FLOPs, fwd+bwd time", flush=True)
    result["connector"] = connector_rows(args.groups, args.repeats)

    probes: dict[str, list[dict]] = {}
    if not args.skip_probe:
        enc_evals = {"valid+test": ([str(corpus / "valid.jsonl"), str(corpus / "test.jsonl")],
                                    [str(feats / "valid"), str(feats / "test")]),
                     "valid": ([str(corpus / "valid.jsonl")], [str(feats / "valid")])}
        conn_evals = {"valid": ([str(Path(args.aligned) / "valid.jsonl")], [str(feats / "valid")])}
        common = [f"train.steps={args.probe_steps}", f"train.threads={args.threads}",
                  f"data.feature_cache={feats / 'train'}"]
        plans = []
        for g in (0, args.groups):
            plans.append((f"encoder G={g}", [f"data.train_manifest={corpus / 'train.jsonl'}",
                                             f"model.partition_groups={g}"], enc_evals))
        for g in (0, args.groups):
            plans.append((f"connector G={g}", [f"data.train_manifest={Path(args.aligned) / 'train.jsonl'}",
                                               "data.input=connector", f"data.connector={args.connector}",
                                               "model.pool_frames=1", "data.crop=0", f"model.partition_groups={g}"],
                          conn_evals))
        for label, over, evals in plans:
            for seed in args.seeds:
                print(f"probe {label} seed {seed}", flush=True)
                tag = label.replace(" ", "_").replace("=", "")
                row = probe_run(work / f"{tag}_s{seed}", [*common, *over, f"seed={seed}"], evals)
                probes.setdefault(label, []).append(row)
        result["probe"] = {label: {"runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs],
                                   "params_embedder": runs[0]["params_embedder"],
                                   "params_blocks": runs[0]["params_blocks"],
                                   "step_time_ms": 1000 * statistics.median(r["step_time_s_median"] for r in runs),
                                   "loss_first": statistics.mean(r["loss_first"] for r in runs),
                                   "loss_last": statistics.mean(r["loss_last"] for r in runs),
                                   **{k: summarise(runs, k) for k in ("valid+test", "valid")}}
                           for label, runs in probes.items()}
        # Context: the same trials scored without any probe (all valid/test speakers are held out).
        for kind, evals in (("encoder", enc_evals), ("connector", conn_evals)):
            result["probe"][f"{kind} untrained"] = {"params_embedder": 0, "params_blocks": 0, "step_time_ms": 0.0,
                                                    **untrained_baseline(evals, kind, args.connector)}

    stage1 = {}
    for folder in args.stage1:
        s = stage_metrics(folder)
        if s is not None:
            cfg = s.pop("connector")
            stage1[folder] = {"partition_groups": None if cfg is None else cfg.get("partition_groups", 0), **s}
    result["stage1"] = stage1
    result["machine_end"] = machine()
    write_json(args.out, result)

    # ------------------------------------------------------------------------------------ tables
    m0, m1 = result["machine_start"], result["machine_end"]
    print(f"\n{m0['date']}, {m0['cpu']}, {m0['cores']} cores, torch {torch.__version__}, {args.threads} thread(s), "
          f"load {m0['load_1min']} -> {m1['load_1min']} (timings are upper bounds under load)\n")
    print("| SSR connector | G | params | FFN params | GFLOP fwd+bwd | fwd+bwd ms |\n|---|---|---|---|---|---|")
    for r in result["connector"]:
        print(f"| {r['connector']} | {r['partition_groups'] or 'off'} | {r['params'] / 1e6:.3f} M | "
              f"{r['params_ffn'] / 1e6:.3f} M | {r['gflops_fwd_bwd']:.2f} | {r['fwd_bwd_ms']:.0f} |")
    if probes:
        n = len(args.seeds)
        print("\n| probe input | G | embedder params | block params | step ms | EER % valid+test | minDCF valid+test "
              "| EER % valid | minDCF valid |\n|---|---|---|---|---|---|---|---|---|")
        for label, p in result["probe"].items():
            kind, g = label.split(" ")

            def cell(key: str, metric: str, pct: bool, p=p) -> str:
                s = p.get(key, {})
                if metric not in s:
                    return "-"
                f = 100 if pct else 1
                return f"{f * s[metric]:.{1 if pct else 3}f} ± {f * s[metric + '_sd']:.{1 if pct else 3}f}"

            g = {"G=0": "off", "untrained": "no probe: centred mean+std cosine"}.get(g, g[2:])
            print(f"| {kind} | {g} | {p['params_embedder']:,} | {p['params_blocks']:,} | "
                  f"{p['step_time_ms']:.0f} | {cell('valid+test', 'eer', True)} | {cell('valid+test', 'min_dcf', False)}"
                  f" | {cell('valid', 'eer', True)} | {cell('valid', 'min_dcf', False)} |")
        print(f"(mean ± sd over {n} seed(s); {args.probe_steps} steps of 32)")
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, runs in probes.items():
            ax.plot(runs[0]["losses"], label=label, lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("AM-softmax loss")
        ax.set_yscale("log")
        ax.legend()
        save_figure(fig, Path(args.out).with_suffix(".png"))
    if stage1:
        print("\n| stage 1 run | G | steps | valid cosine | token acc | valid loss | step s |\n|---|---|---|---|---|---|---|")
        for folder, s in stage1.items():
            print(f"| {folder} | {s['partition_groups'] or 'off'} | {s['steps']} | {s['cosine']:.3f} | "
                  f"{s['token_acc']:.3f} | {s['loss']:.3f} | {s['step_time_s_median']:.2f} |")
    print(f"\nwrote {args.out}")
    return result
