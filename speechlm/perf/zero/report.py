"""The ZeRO benchmark's report: the measured and projected tables (markdown), the JSON and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from speechlm.perf.bench import pyplot, save_figure, write_json
from speechlm.perf.zero.memory import GIB, MIB

ZERO3_CPU_NOTE = (
    "ZeRO-3 here: recipes/ds/zero3.json leaves stage3_max_live_parameters and stage3_max_reuse_distance at "
    "DeepSpeed's 1e9 elements, so a model smaller than that stays gathered once used: the ranks hold the full "
    "frozen LLM besides their partitions and the gathering costs time; the projection counts the same 1e9 bound "
    "(zero3_gpu.json) as gathered parameters. Measured with both at 1e7 / 0: see docs/PERFORMANCE.md")

PART_LABELS = [
    ("frozen_weights", "frozen LLM weights (bf16)"),
    ("outside_frozen_weights", "frozen encoder weights (bf16, outside DeepSpeed)"),
    ("trainable_weights", "connector weights (bf16)"),
    ("trainable_grads", "connector gradients (bf16)"),
    ("optimizer_states", "connector fp32 master + Adam m, v"),
    ("reduce_buckets", "gradient reduce bucket(s)"),
    ("zero3_gathered_params", "ZeRO-3 gathered parameters (bound)"),
    ("connector_blocks", "connector activations"),
    ("connector_masks", "connector attention-mask biases"),
    ("llm_layers", "LLM layer activations"),
    ("logits", "logits + loss (peak)"),
    ("runtime_overhead", "CUDA context + NCCL (assumed)"),
]

def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mib_text(x: float | None) -> str:
    return "-" if x is None else f"{x / MIB:,.0f}"


def _per_rank(ranks: list[dict], key: str) -> str:
    return " / ".join(mib_text(m[key]) for m in ranks)


def measured_table(report: dict) -> str:
    runs = report.get("measured", {}).get("runs", {})
    params = report.get("measured", {}).get("params", {})
    agree = report.get("measured", {}).get("loss_agreement", {})
    rows = []
    for key in sorted(runs, key=int):
        r = runs[key]
        ranks = r["ranks"]
        diff = agree.get("max_abs_diff_vs_reference", {}).get(key, agree.get("max_abs_diff_vs_reference", {}).get(int(key)))
        st = r.get("step_time_s_median")
        rows.append([f"ZeRO-{key}", _per_rank(ranks, "vm_hwm"), _per_rank(ranks, "rss_steps_max"),
                     _per_rank(ranks, "anon_steps_max"),
                     "-" if st is None else f"{st:.3f}", f"{params.get('trainable', 0) or 0:,}",
                     f"{params.get('frozen', 0):,}", "-" if diff is None else f"{diff:.2e}",
                     {True: "yes", False: "NO", None: "-"}[r.get("frozen_unchanged")]])
    header = ["stage", "peak RSS VmHWM, MiB (r0 / r1)", "peak RSS in steps 2..N, MiB", "of it anonymous, MiB",
              "median step (s)", "trainable params", "frozen params", f"max |Δ train loss| vs ZeRO-{agree.get('reference_stage', 0)}",
              "frozen LLM unchanged"]
    return md_table(header, rows)


def projection_table(report: dict) -> str:
    proj = report["projection"]["per_gpu"]
    cols = ["zero2_ckpt", "zero3_ckpt", "zero2_nockpt", "zero3_nockpt"]
    rows = []
    for key, label in PART_LABELS:
        vals = [proj[c]["parts"].get(key, 0.0) for c in cols]
        if key in ("llm_layers", "logits"):
            rows.append([label, *(f"{v / GIB:.2f}" for v in vals)])
        else:
            rows.append([label, f"{vals[0] / GIB:.2f}", f"{vals[1] / GIB:.2f}", "same", "same"])
    rows.append(["**total per GPU**", *(f"**{proj[c]['total'] / GIB:.1f}**" for c in cols)])
    header = ["GiB per GPU", "ZeRO-2, ckpt", "ZeRO-3, ckpt", "ZeRO-2, no ckpt", "ZeRO-3, no ckpt"]
    return md_table(header, rows)


def write_report(path: Path, report: dict) -> None:
    write_json(path, json.loads(json.dumps(report, default=str)))


def plot(report: dict, path: Path) -> Path | None:
    runs = report.get("measured", {}).get("runs", {})
    if not runs:
        return None
    plt = pyplot()
    stages = sorted(runs, key=int)
    n_ranks = max(len(runs[s]["ranks"]) for s in stages)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / (2 * n_ranks)
    for r in range(n_ranks):
        for j, (key, name) in enumerate((("vm_hwm", "VmHWM"), ("rss_steps_max", "RSS in steps"))):
            xs = [i + (2 * r + j - n_ranks + 0.5) * width for i in range(len(stages))]
            ys = [runs[s]["ranks"][r][key] / MIB if r < len(runs[s]["ranks"]) else 0 for s in stages]
            ax1.bar(xs, ys, width, label=f"rank {r} {name}", alpha=1.0 if j == 0 else 0.6)
    ax1.set_xticks(range(len(stages)), [f"ZeRO-{s}" for s in stages])
    ax1.set_ylabel("MiB per rank")
    ax1.set_title("peak resident memory per rank")
    ax1.legend(fontsize=7)
    ax2.bar(range(len(stages)), [runs[s]["step_time_s_median"] or 0 for s in stages], color="tab:green")
    ax2.set_xticks(range(len(stages)), [f"ZeRO-{s}" for s in stages])
    ax2.set_ylabel("median step time (s)")
    m = report.get("machine", {})
    ax2.set_title(f"{m.get('cpus', '?')} CPU cores, load {m.get('loadavg_start', ['?'])[0]}")
    fig.suptitle(f"stage 2 on {report.get('measured', {}).get('ranks', 2)} CPU ranks, "
                 f"{report.get('measured', {}).get('steps', '?')} steps")
    fig.tight_layout()
    return save_figure(fig, path)

def render(report: dict) -> str:
    m = report["machine"]
    lines = [(f"machine: {m['cpus']} CPU cores, load average {m['loadavg_start']} at start, "
              f"{m.get('loadavg_end', '?')} at end, {report['date']}")]
    if "measured" in report:
        meas = report["measured"]
        lines += ["", f"## Measured: stage 2, {meas['ranks']} CPU ranks, {meas['steps']} steps, fp32", "",
                  measured_table(report)]
        agree = meas.get("loss_agreement", {})
        if agree:
            lines.append(f"\nmax |Δ train loss| over all stage pairs: {agree['max_abs_diff_any_pair']:.2e}")
        for s, r in sorted(meas["runs"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"ZeRO-{s}: load {r['loadavg_start'][0]:.2f} -> {r['loadavg_end'][0]:.2f}, "
                         f"wall {r['wall_s']} s, steps window {'seen' if r['window_found'] else 'NOT seen'}")
        chk = meas.get("cpu_check", {})
        if chk:
            lines += ["", ("Projection formulas at this size (fp32, 2 ranks) vs the measured peak RSS in steps 2..N "
                           "(max over ranks):"), "",
                      md_table(["change", "predicted model states (MiB)", "measured (MiB)"],
                               [[f"ZeRO-{d['from']} -> ZeRO-{d['to']}", f"{d['predicted_mib']:+,.0f}",
                                 f"{d['measured_mib']:+,.0f}"] for d in chk["deltas"]]), "", ZERO3_CPU_NOTE]
    if "projection" in report:
        p = report["projection"]
        inp = p["inputs"]
        title = (f"## Projected per GPU: Llama-3-8B + w2v-BERT 2.0 + SSR on {inp['n_gpus']} GPUs "
                 f"({p['facts']['config']})")
        numbers = (f"numbers: LLM {inp['llm_params']:,} params ({inp['llm_layers']} layers, hidden "
                   f"{inp['llm_hidden']}, FFN {inp['llm_intermediate']}, vocab {inp['llm_vocab']}; largest module "
                   f"{inp['llm_largest_module_params']:,}); encoder {inp['encoder_params']:,} ({p['facts']['encoder']}); "
                   f"connector {inp['connector_params']:,} ({inp['connector_layers']} x {inp['connector_d_model']}, "
                   f"FFN {inp['connector_ffn_hidden']}, stack {inp['connector_stack']}); batch {inp['frames']} frames, "
                   f"{inp['tokens']} LLM positions, {inp['clips']} clips")
        lines += ["", title, "", projection_table(report), "", numbers, "", "assumptions:"]
        lines += [f"- {a}" for a in p["assumptions"]]
    return "\n".join(lines)
