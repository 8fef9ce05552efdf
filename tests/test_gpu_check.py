"""tools/gpu_check.sh cannot rot between GPU loans: its CPU dry run (tiny models, every part, DeepSpeed included)
writes the report with all its keys and prints the table; its install plan (speechlm.perf.gpu_check.install_plan),
FLOP formulas (speechlm.perf.flops) and orchestration (speechlm.perf.gpu_check.orchestrate) are checked too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speechlm.perf import flops
from speechlm.perf.gpu_check import cli as gpu_cli
from speechlm.perf.gpu_check import install_plan
from speechlm.perf.gpu_check import orchestrate as gpu_orchestrate
from speechlm.perf.gpu_check import report as gpu_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "report.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("OUT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_PORT")}
    env["GPU_CHECK_SITE"] = str(tmp / "site")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--cpu", "--tiny", "--out", str(out),
                           "--work", str(tmp / "work"), "--budget", "240"],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=420, check=False)
    wall = time.perf_counter() - t0
    log = (tmp / "gpu_check.log")
    assert proc.returncode == 0, (proc.stdout[-4000:] + proc.stderr[-3000:]
                                  + (log.read_text()[-6000:] if log.is_file() else ""))
    return {"report": json.loads(out.read_text()), "stdout": proc.stdout, "wall_s": wall, "log": log}


def test_dry_run_report_has_every_part_and_key(dry_run):
    r = dry_run["report"]
    print(f"dry run: {dry_run['wall_s']:.1f} s")
    assert r["schema"] == gpu_orchestrate.SCHEMA and r["mode"] == "cpu" and r["tiny"] is True
    assert r["isolation"] == "group"  # the --tiny default: GROUPS share processes (part on a GPU)
    assert list(r["parts"]) == gpu_orchestrate.PART_NAMES
    for name, part in r["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("checks"), part.get("log_tail"))
        assert part["wall_s"] > 0 and part["budget_s"] > 0
    assert set(r["formulas"]) >= {"mfu", "connector_flops", "frozen_llm_flops", "hfu"}
    assert r["peak_flops"] == 989e12 and r["llm_size"] == "tiny" and r["ds_configs"] == "cpu"
    assert dry_run["log"].is_file()

    env = r["parts"]["env"]["result"]
    assert env["env"]["packages"]["deepspeed"] and env["matmul"]["tflops"] > 0
    for name in ("stage1_zero2", "stage1_zero3", "stage2_zero2", "stage2_zero3"):
        res, checks = r["parts"][name]["result"], r["parts"][name]["checks"]
        assert res["setup"]["zero"] == int(name[-1]) and res["setup"]["stage"] == int(name[5])
        assert res["setup"]["ds_config"] == f"zero{name[-1]}.json"  # --cpu: the CPU ones (zero*_gpu.json on a GPU)
        s = res["steps"]
        for key in ("step_s_median", "tokens_per_s", "audio_s_per_s", "model_tflop_per_step", "losses"):
            assert key in s, (name, key)
        assert s["tokens_per_s"] > 0 and s["model_tflop_per_step"] > 0
        assert checks == {"loss_finite": True, "frozen_unchanged": True, "trained_changed": True}
        assert res["frozen"]["tensors"] > 0 and res["params"]["connector"]["params"] > 0
    assert r["parts"]["stage2_zero2"]["result"]["setup"]["gradient_checkpointing"] is True
    assert r["parts"]["stage2_zero2"]["result"]["params"]["llm"]["layers"] == 2

    enc = r["parts"]["encoders"]["result"]
    for kind in ("w2v-bert", "whisper"):
        assert enc[kind]["audio_s_per_s"] > 0 and enc[kind]["cache_e2e_audio_s_per_s"] > 0
        assert enc[kind]["cache_utts"] == enc[kind]["clips"] and enc[kind]["feature_extractor_s"] > 0

    run = r["parts"]["stage1_run"]["result"]
    assert run["audio_source"].startswith("espeak")  # eSpeak is installed here (espeakng-loader)
    assert run["run"]["steps"] == 60 and run["run"]["loss_ratio"] < 0.9
    assert run["run"]["frozen_unchanged"] is True and "cosine" in run["run"]["final_valid"]

    tests = r["parts"]["tests"]["result"]["pytest"]
    n_gpu_tests = 12  # tests/test_gpu.py, parametrized: all skipped without CUDA
    assert tests["tests"] == n_gpu_tests and tests["skipped"] == n_gpu_tests and tests["failures"] == 0


def test_dry_run_prints_the_table(dry_run):
    out = dry_run["stdout"]
    assert re.search(r"^part\s+status\s+wall s\s+numbers$", out, re.MULTILINE)
    for name in gpu_orchestrate.PART_NAMES:
        assert re.search(rf"^{name}\s+ok\s+[\d.]+\s", out, re.MULTILINE), name
    assert "report: " in out
    assert dry_run["report"]["table"].splitlines()[0].startswith("part")


def test_shell_scripts_parse_and_agree_on_the_wheels():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / "tools" / script)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    text = (ROOT / "tools" / "gpu_wheels.sh").read_text()
    binary = re.search(r"BINARY=\(([^)]*)\)", text).group(1).split()
    downloaded = {n.replace("-", "_").lower() for n in binary} | {"deepspeed"}
    planned = {w for _, _, wheels in install_plan.INSTALL_PLAN for w in wheels}
    assert planned == downloaded
    assert 'carry=[".gpu_wheels"]' in (ROOT / "tools" / "gpu_check.sh").read_text()
    assert ".gpu_wheels/" in (ROOT / ".gitignore").read_text().splitlines()


def test_install_plan_takes_missing_and_out_of_range_packages(tmp_path):
    for name in ("deepspeed-0.19.8-py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl",
                 "pytest-1.0-py3-none-any.whl", "transformers-4.57.6-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    plan = [("pytest", ">=1", ["pytest"]),  # installed and in range: nothing
            ("pytest", "<1", ["transformers"]),  # installed but out of range: its wheels
            ("no-such-distribution-xyz", ">=0", ["deepspeed", "hjson", "pydantic"])]  # missing: its wheels
    files, notes = install_plan.plan_install(tmp_path, plan)
    assert [Path(f).name for f in files] == ["transformers-4.57.6-py3-none-any.whl",
                                             "deepspeed-0.19.8-py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl"]
    assert any("no pydantic wheel" in n for n in notes)


def test_flops_formulas_by_hand():
    conn = {"params_per_frame": 1000, "params_per_token": 100, "layers": 2, "d_model": 8, "stack": 2}
    llm = {"params_flops": 10_000, "params_layers": 8_000, "layers": 3, "hidden": 16}
    one = flops.step_flops(1, clips=2, frames=10, tokens=4, conn=conn, llm=None)
    per_clip = 6 * (1000 * 5 + 100 * 4) + 12 * 2 * 8 * 5 * 5
    assert one == {"model_flops": 2 * per_clip, "hardware_flops": 2 * per_clip}
    two = flops.step_flops(2, clips=2, frames=10, tokens=4, conn=conn, llm=llm)
    s = 5  # tokens + BOS
    frozen = 4 * 10_000 * s + 12 * 3 * 16 * s * s
    assert two["model_flops"] == 2 * (per_clip + frozen)
    assert two["hardware_flops"] == two["model_flops"] + 2 * (2 * 8_000 * s + 4 * 3 * 16 * s * s)


def test_report_goes_to_out_when_set(monkeypatch):
    args = gpu_cli.parse_args(["--cpu", "--tiny"])
    monkeypatch.setenv("OUT", "/somewhere")
    assert gpu_report.report_path(args) == Path("/somewhere/gpu_report.json")
    monkeypatch.delenv("OUT")
    assert gpu_report.report_path(args) == ROOT / "runs" / "gpu_check" / "report.json"
    assert gpu_cli.parse_args([]).budget == 420 and gpu_cli.parse_args([]).llm_size == "8b"


def _fake_parts(monkeypatch, calls: list):
    def stage2(ctx):
        calls.append(ctx.args.llm_size)
        ctx.put("setup", {"llm": ctx.args.llm_size})
        if ctx.args.llm_size == "8b":
            raise RuntimeError("CUDA out of memory (simulated)")
        ctx.check("frozen_unchanged", True)

    monkeypatch.setitem(gpu_orchestrate.PART_FUNCS, "stage2_zero2", stage2)
    monkeypatch.setitem(gpu_orchestrate.PART_FUNCS, "stage2_zero3", stage2)


def test_llm_falls_back_to_1b_after_a_failed_8b_part(monkeypatch, tmp_path, capsys):
    calls: list = []
    _fake_parts(monkeypatch, calls)
    out = tmp_path / "r.json"
    args = gpu_cli.parse_args(["--cpu", "--isolation", "none", "--parts", "stage2_zero2,stage2_zero3",
                                 "--out", str(out), "--work", str(tmp_path / "w")])
    assert gpu_orchestrate.orchestrate(args) == 0
    r = json.loads(out.read_text())
    assert calls == ["8b", "1b", "1b"] and r["llm_size"] == "1b" and "out of memory" in r["llm_choice"]
    first = r["parts"]["stage2_zero2"]
    assert first["status"] == "ok" and first["fallback_from"]["llm"] == "8b"
    assert r["parts"]["stage2_zero3"]["result"]["setup"]["llm"] == "1b"
    assert "stage2_zero2  ok" in capsys.readouterr().out


def test_llm_auto_takes_1b_when_time_is_short(monkeypatch, tmp_path):
    calls: list = []
    _fake_parts(monkeypatch, calls)
    out = tmp_path / "r.json"
    args = gpu_cli.parse_args(["--cpu", "--isolation", "none", "--parts", "stage2_zero2,stage2_zero3",
                                 "--budget", "100", "--out", str(out), "--work", str(tmp_path / "w")])
    assert gpu_orchestrate.orchestrate(args) == 0
    r = json.loads(out.read_text())
    assert calls == ["1b", "1b"] and r["llm_choice"].startswith("1b:")


def test_a_hanging_part_is_killed_at_its_budget_and_reported(tmp_path):
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["GPU_CHECK_HANG"] = "env"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu", "--tiny", "--isolation",
                           "part", "--parts", "env", "--budget", "6", "--out", str(out), "--work", str(tmp_path / "w")],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and time.perf_counter() - t0 < 60, proc.stdout + proc.stderr
    part = json.loads(out.read_text())["parts"]["env"]
    assert part["status"] == "timeout" and "killed at the 6 s budget" in part["error"]
    assert part["result"] == {"hanging": True} and "===== part env" in part["log_tail"]
    assert re.search(r"^env\s+timeout\s", proc.stdout, re.MULTILINE)
