"""The ZeRO benchmark (tools/benchmarks/bench_zero.py -> speechlm.perf.zero): the projection's arithmetic by hand,
the /proc parser and rank discovery on a real process tree, the report writer, and (slow) the 2-rank launcher runs
on the tiny random world."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from speechlm.perf import procmem
from speechlm.perf.zero import cli as zero_cli
from speechlm.perf.zero import memory as zero_memory
from speechlm.perf.zero import report as zero_report
from speechlm.perf.zero import runs as zero_runs
from speechlm.perf.zero.memory import MIB

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ projection
def test_model_states_by_hand():
    # 1000 frozen, 100 trainable, 300 outside (encoder), 4 GPUs, bf16 (2 B) + 12 B optimizer
    z2 = zero_memory.model_states(1000, 100, 4, 2, outside_frozen_params=300)
    z3 = zero_memory.model_states(1000, 100, 4, 3, outside_frozen_params=300)
    z0 = zero_memory.model_states(1000, 100, 4, 0, outside_frozen_params=300)
    assert z2 == {"frozen_weights": 2000, "outside_frozen_weights": 600, "trainable_weights": 200,
                  "trainable_grads": 50, "optimizer_states": 300}
    assert z3 == {"frozen_weights": 500, "outside_frozen_weights": 600, "trainable_weights": 50,
                  "trainable_grads": 50, "optimizer_states": 300}
    assert z0 == {"frozen_weights": 2000, "outside_frozen_weights": 600, "trainable_weights": 200,
                  "trainable_grads": 200, "optimizer_states": 1200}
    # ZeRO-3's weights are ZeRO-2's divided by the GPU count; the encoder outside DeepSpeed is not partitioned
    assert z3["frozen_weights"] == z2["frozen_weights"] / 4
    assert z3["trainable_weights"] == z2["trainable_weights"] / 4
    # the optimizer state: 12 B per trainable parameter, partitioned, the frozen ones hold none
    assert zero_memory.model_states(10**6, 0, 8, 2)["optimizer_states"] == 0
    assert z2["optimizer_states"] == 12 * 100 / 4


def test_llm_activations_by_hand():
    # per token and layer: 2 fp32 norm inputs 2*4*8 = 64, q k v o 4*8*2 = 64, gate silu up 3*16*2 = 96 -> 224
    assert zero_memory.llm_layer_bytes_per_token(8, 16) == 224
    full = zero_memory.llm_activations(10, 2, 8, 16, 32, checkpointing=False)
    ckpt = zero_memory.llm_activations(10, 2, 8, 16, 32, checkpointing=True)
    assert full == {"llm_layers": 10 * 2 * 224, "logits": 10 * 32 * 10}
    # checkpointing: every layer's bf16 input (2 * 8 B) + one layer rebuilt at a time
    assert ckpt == {"llm_layers": 10 * (2 * 2 * 8 + 224), "logits": 3200}


def test_connector_activations_by_hand():
    # per frame and block: 2 B x (9 d + 4 f) + 2 d dropout masks = 2 * (36 + 32) + 8 = 144
    out = zero_memory.connector_activations(frames=6, clips=2, layers=1, d_model=4, ffn_hidden=8, d_enc=3)
    assert out["connector_blocks"] == 6 * 144 + 6 * 2 * 3
    assert out["connector_masks"] == 1 * 2 * 3 * 3 * 2  # layers x clips x T^2 x 2 B, T = 6 / 2
    assert zero_memory.connector_activations(6, 2, 1, 4, 8, 3, dropout=False)["connector_blocks"] == 6 * 136 + 36


def test_zero_buffers_from_the_ds_config():
    z2 = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 100, "overlap_comm": True, "contiguous_gradients": True}}
    assert zero_memory.zero_buffers(z2, 2, largest_gathered=0) == {"reduce_buckets": 400, "zero3_gathered_params": 0}
    z2["zero_optimization"]["overlap_comm"] = False
    assert zero_memory.zero_buffers(z2, 2, 0)["reduce_buckets"] == 200
    z3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 100, "stage3_max_live_parameters": 1000,
                                "stage3_prefetch_bucket_size": 50}}
    assert zero_memory.zero_buffers(z3, 3, largest_gathered=10) == {"reduce_buckets": 200, "zero3_gathered_params": 2000}
    # a module larger than max_live is gathered whole anyway, with the prefetch bucket
    assert zero_memory.zero_buffers(z3, 3, largest_gathered=2000)["zero3_gathered_params"] == (2000 + 50) * 2


def small_inputs(**kw):
    base = {"n_gpus": 4, "llm_params": 1000, "llm_largest_module_params": 100, "llm_layers": 2, "llm_hidden": 8,
            "llm_intermediate": 16, "llm_vocab": 32, "encoder_params": 300, "encoder_loaded": True,
            "connector_params": 100, "connector_layers": 1, "connector_d_model": 4, "connector_ffn_hidden": 8,
            "connector_stack": 1, "d_enc": 3, "clips": 2, "frames": 6, "tokens": 10, "runtime_overhead_bytes": 0.0,
            "zero_confs": {2: {"zero_optimization": {"reduce_bucket_size": 100, "overlap_comm": True}},
                           3: {"zero_optimization": {"reduce_bucket_size": 100, "stage3_max_live_parameters": 1000,
                                                     "stage3_prefetch_bucket_size": 50}}}}
    base.update(kw)
    return zero_memory.ProjectionInputs(**base)


def test_project_totals_by_hand():
    p = zero_memory.project(small_inputs())
    z2, z3 = p["zero2_ckpt"], p["zero3_ckpt"]
    assert z3["parts"]["frozen_weights"] == z2["parts"]["frozen_weights"] / 4 == 500
    # ZeRO-2 with checkpointing: states 2000 + 600 + 200 + 50 + 300, buckets 400, connector 900 + 36,
    # LLM 2560 + 3200
    assert z2["total"] == 2000 + 600 + 200 + 50 + 300 + 400 + 900 + 36 + 2560 + 3200
    # ZeRO-3: 500 + 600 + 50 + 50 + 300, bucket 200, gathered max(1000, 150) * 2
    assert z3["total"] == 500 + 600 + 50 + 50 + 300 + 200 + 2000 + 900 + 36 + 2560 + 3200
    assert p["zero2_nockpt"]["total"] - z2["total"] == 4480 - 2560
    # stacking k frames shortens the connector's sequence and widens its input
    stacked = zero_memory.project(small_inputs(connector_stack=2))["zero2_ckpt"]["parts"]
    assert stacked["connector_blocks"] == 3 * 144 + 3 * 2 * 6
    no_enc = zero_memory.project(small_inputs(encoder_loaded=False))["zero2_ckpt"]["parts"]
    assert no_enc["outside_frozen_weights"] == 0


def test_real_scale_inputs_count_the_real_models():
    inp, _facts = zero_memory.real_scale_inputs(ROOT / "recipes" / "configs" / "librispeech_llama3_stage2.yaml", 8, 12)
    assert inp.llm_params == 8_030_261_248  # Meta-Llama-3-8B
    assert inp.llm_largest_module_params == 128256 * 4096  # embedding table / lm_head
    assert 550e6 < inp.encoder_params < 620e6  # w2v-BERT 2.0 "600M"
    assert inp.connector_params == 55_580_672  # SSR 4 x 1024 (docs/PERFORMANCE.md: 55.6M)
    assert inp.tokens == 512 + 12 and inp.frames == 12000
    assert inp.zero_confs[3]["zero_optimization"]["stage3_max_live_parameters"] == 1e9
    assert inp.zero_confs[2]["zero_optimization"]["reduce_bucket_size"] == 2e8
    assert inp.encoder_loaded  # leakage_utts 200
    per = zero_memory.project(inp)
    assert per["zero3_ckpt"]["parts"]["frozen_weights"] * 8 == per["zero2_ckpt"]["parts"]["frozen_weights"]
    assert per["zero2_ckpt"]["parts"]["frozen_weights"] == 2 * 8_030_261_248
    assert per["zero3_ckpt"]["total"] < per["zero2_ckpt"]["total"] < per["zero2_nockpt"]["total"]


# ------------------------------------------------------------------------------------------ /proc
FAKE_STATUS = textwrap.dedent("""\
    Name:\tpython
    State:\tS (sleeping)
    Pid:\t4242
    VmPeak:\t 6442924 kB
    VmHWM:\t 1602156 kB
    VmRSS:\t 1500000 kB
    RssAnon:\t 1200000 kB
    RssFile:\t  200000 kB
    RssShmem:\t  100000 kB
    Threads:\t3
    """)


def test_parse_proc_status():
    st = procmem.parse_proc_status(FAKE_STATUS)
    assert st == {"VmPeak": 6442924 * 1024, "VmHWM": 1602156 * 1024, "VmRSS": 1500000 * 1024,
                  "RssAnon": 1200000 * 1024, "RssFile": 200000 * 1024, "RssShmem": 100000 * 1024}
    assert procmem.parse_proc_status("garbage\nVmHWM:\n") == {}
    own = procmem.read_proc_status(__import__("os").getpid())
    assert own["VmHWM"] >= own["VmRSS"] > 0
    assert procmem.read_proc_status(2**22 + 12345) is None


def test_local_rank_of():
    assert procmem.local_rank_of(["python", "-u", "x.py", "--local_rank=1", "--config", "c"]) == 1
    assert procmem.local_rank_of(["python", "x.py", "--local_rank", "0"]) == 0
    assert procmem.local_rank_of(["python", "-m", "deepspeed.launcher.launch", "--world_info=abc"]) is None


def test_monitor_finds_the_launchers_grandchildren_and_their_peak():
    # launcher -> middle -> "rank" (like deepspeed -> launch.py -> ranks); the rank touches 64 MiB, frees it, and
    # starts a process with a rank-like command line (as a fork of a rank has): three levels down, not a rank
    grandchild = "import time; time.sleep(1.2)"
    rank = ("import subprocess, sys; b = b'x' * (64 * 2**20); del b; "
            f"subprocess.run([sys.executable, '-c', {grandchild!r}, '--local_rank=7'])")
    middle = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {rank!r}, '--local_rank=1'])"
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {middle!r}])"
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    mon = procmem.RankMonitor(proc.pid)
    while proc.poll() is None:
        mon.sample(in_steps=True)
        time.sleep(0.05)
    ranks = mon.by_rank()
    assert [m.local_rank for m in ranks] == [1]
    assert ranks[0].vm_hwm >= 64 * 2**20  # the kernel's peak, although the bytes were freed before most samples
    assert ranks[0].samples_in_steps > 0 and 0 < ranks[0].rss_steps_max <= ranks[0].vm_hwm


# ------------------------------------------------------------------------------------------ report
def fake_run(stage: int, losses: list[float], hwm: int, rss: int, step: float) -> dict:
    ranks = [{"pid": 10 + r, "local_rank": r, "vm_hwm": hwm + r * MIB, "vm_hwm_before_steps": hwm,
              "rss_steps_max": rss, "anon_steps_max": rss - 100 * MIB, "shmem_steps_max": 66 * MIB,
              "file_steps_max": 0, "samples_in_steps": 5} for r in range(2)]
    return {"stage": stage, "ranks": ranks, "step_time_s_median": step, "train_losses": losses, "wall_s": 30.0,
            "loadavg_start": [2.0, 2.0, 2.0], "loadavg_end": [2.5, 2.0, 2.0], "window_found": True,
            "frozen_unchanged": True}


def test_loss_agreement():
    runs = {0: fake_run(0, [5.0, 4.0, 3.0], 0, 0, 1.0), 2: fake_run(2, [5.0, 4.001, 3.0], 0, 0, 1.0),
            3: fake_run(3, [5.0, 3.998, 3.002], 0, 0, 1.0)}
    agree = zero_runs.loss_agreement(runs)
    assert agree["reference_stage"] == 0
    assert agree["max_abs_diff_vs_reference"][2] == pytest.approx(0.001)
    assert agree["max_abs_diff_vs_reference"][3] == pytest.approx(0.002)
    assert agree["max_abs_diff_any_pair"] == pytest.approx(0.003)


def test_report_tables_json_and_plot(tmp_path):
    runs = {0: fake_run(0, [5.0, 4.0], 2000 * MIB, 1500 * MIB, 2.0),
            2: fake_run(2, [5.0, 4.0], 2010 * MIB, 1490 * MIB, 2.1),
            3: fake_run(3, [5.0, 4.001], 2020 * MIB, 1200 * MIB, 2.6)}
    params = {"trainable": 1_000_000, "frozen": 10_000_000}
    report = {"schema": zero_cli.SCHEMA, "date": "2026-12-01T00:00:00",
              "machine": {"cpus": 2, "loadavg_start": [2.0, 2.0, 2.0], "loadavg_end": [2.1, 2.0, 2.0]},
              "measured": {"steps": 2, "ranks": 2, "params": params, "runs": runs,
                           "loss_agreement": zero_runs.loss_agreement(runs), "cpu_check": zero_memory.cpu_check(params, runs, 2)}}
    inp = small_inputs()
    report["projection"] = {"inputs": asdict(inp), "facts": {"config": "x.yaml", "encoder": "enc"},
                            "assumptions": ["a1"], "per_gpu": zero_memory.project(inp)}
    chk = report["measured"]["cpu_check"]
    # fp32 at 2 ranks: ZeRO-0 -> 2: grads 4 MB -> 2 MB, m+v 8 MB -> fp32 copy + m + v 12 MB / 2 = 6 MB: -4 MB;
    # ZeRO-2 -> 3: frozen 40 MB -> 20 MB, connector weights 4 MB -> 2 MB: -22 MB
    assert [round(d["predicted_mib"] * MIB) for d in chk["deltas"]] == [-4_000_000, -22_000_000]
    assert [d["measured_mib"] for d in chk["deltas"]] == [-10, -290]
    path = tmp_path / "out" / "report.json"
    zero_report.write_report(path, report)
    back = json.loads(path.read_text())  # int keys come back as strings: the tables must still work
    assert back["measured"]["runs"]["3"]["step_time_s_median"] == 2.6
    assert not list(path.parent.glob(".*tmp"))  # atomic: no temporary left
    for rep in (report, back):
        text = zero_report.render(rep)
        assert "| ZeRO-3 | 2,020 / 2,021 | 1,200 / 1,200 | 1,100 / 1,100 | 2.600 | 1,000,000 | 10,000,000 | 1.00e-03 | yes |" in text
        assert "| ZeRO-2 -> ZeRO-3 | -21 | -290 |" in text
        assert "| frozen LLM weights (bf16) | 0.00 | 0.00 | same | same |" in text
        assert "**total per GPU**" in text and "- a1" in text
    png = zero_report.plot(report, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_inputs_are_named(tmp_path, capsys):
    rc = zero_cli.main(["--work-dir", str(tmp_path / "w"), "--train-manifest", str(tmp_path / "nope.jsonl"),
                  "--min-available-gib", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"train_manifest={tmp_path / 'nope.jsonl'}" in err
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert "nope.jsonl" in report["error"]


# ------------------------------------------------------------------------------------------ end to end
def _free_ports(n: int) -> int:
    """A port P with P .. P+n-1 all free now (the benchmark's stage i uses P + i): no clash with other jobs."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for k in range(1, n):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


@pytest.mark.slow
def test_two_rank_runs_on_the_tiny_world(tmp_path):
    """ZeRO-0 and ZeRO-3 launcher runs of stage 2 on the tiny random world: ranks found, losses agree."""
    from training_helpers import make_world

    w = make_world(tmp_path / "world")
    work = tmp_path / "bench"
    rc = zero_cli.main(["--steps", "3", "--stages", "0", "3", "--work-dir", str(work), "--master-port", str(_free_ports(2)),
                  "--config", str(ROOT / "recipes" / "configs" / "stage2_tiny.yaml"),
                  "--train-manifest", w["manifest"], "--valid-manifest", w["manifest"], "--feature-cache", w["cache"],
                  "--valid-feature-cache", w["cache"], "--llm", w["llm"], "--encoder", w["enc"], "--init-connector", "",
                  "--min-available-gib", "0", "--timeout-s", "300",
                  "--override", "model.connector.d_model=32", "model.connector.n_layers=1", "model.connector.n_heads=2",
                  "data.max_frames=400", "data.max_tokens=40", "engine.threads=1", "model.connector.stack=1"])
    assert rc == 0, (work / "zero3.log").read_text()[-3000:] if (work / "zero3.log").exists() else ""
    report = json.loads((work / "report.json").read_text())
    runs = report["measured"]["runs"]
    for s in ("0", "3"):
        assert [r["local_rank"] for r in runs[s]["ranks"]] == [0, 1]
        assert all(r["vm_hwm"] > 100 * MIB for r in runs[s]["ranks"])
        assert runs[s]["window_found"] and len(runs[s]["train_losses"]) == 3
    assert report["measured"]["loss_agreement"]["max_abs_diff_any_pair"] < 1e-3
    assert Path(report["plot"]).is_file()
