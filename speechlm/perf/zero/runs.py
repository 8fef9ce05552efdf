"""The measured side of the ZeRO benchmark: stage 2 under one ZeRO stage per deepspeed launcher run on CPU ranks,
its ranks' memory polled from outside, parameters counted from safetensors headers, the stages' losses compared."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from speechlm.perf import ROOT
from speechlm.perf.procmem import RankMonitor, mem_available, shm_buffers
from speechlm.perf.zero.memory import GIB, BenchError

STEP_LINE = re.compile(r"\bstep (\d+) loss ")
#: what each rank runs (``deepspeed --module``): the recipe, with the step lines logged
RANK_MODULE = "speechlm.perf.zero.rank"


@dataclass
class BenchPaths:
    config: Path
    train_manifest: Path
    valid_manifest: Path
    feature_cache: Path
    valid_feature_cache: Path
    llm: Path
    encoder: Path
    init_connector: Path | None

    def check(self) -> None:
        missing = [f"{name}={p}" for name, p in asdict(self).items() if p is not None and not Path(p).exists()]
        if missing:
            raise BenchError("missing input(s): " + "; ".join(missing) + " (the small corpus comes from "
                             "`make small` / recipes/run_small.sh; models from tools/prepare_models.py)")


def stage_overrides(paths: BenchPaths, stage: int, steps: int, out_dir: Path, valid_max_utts: int,
                    extra: list[str]) -> list[str]:
    over = [f"data.train_manifest={paths.train_manifest}", f"data.valid_manifest={paths.valid_manifest}",
            f"data.feature_cache={paths.feature_cache}", f"data.valid_feature_cache={paths.valid_feature_cache}",
            f"model.llm={paths.llm}", f"model.encoder={paths.encoder}",
            f"model.init_connector={paths.init_connector or ''}", f"out_dir={out_dir}",
            f"engine.zero_stage={stage}", f"loop.max_steps={steps}", "loop.eval_every=0", "loop.save_every=0",
            "loop.progress=false", "loop.log_every=1", "loop.resume=false", "leakage_utts=0",
            f"data.valid_max_utts={valid_max_utts}"]
    return over + list(extra)

def run_stage(stage: int, paths: BenchPaths, args: argparse.Namespace, work: Path, port: int) -> dict:
    """One launcher run of stage 2 under ZeRO ``stage``, its ranks polled until it exits."""
    out_dir = work / f"zero{stage}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    log_path = work / f"zero{stage}.log"
    need = args.min_available_gib * GIB
    waited = 0.0
    while need > 0 and (mem_available() or 0) < need:
        if waited >= args.wait_mem_s:
            shm = sum(p.stat().st_size for p in shm_buffers() if p.exists())
            raise BenchError(f"ZeRO-{stage}: only {(mem_available() or 0) / GIB:.1f} GiB of memory available, "
                             f"{args.min_available_gib} GiB asked for the 2 ranks (--min-available-gib; other jobs "
                             f"hold the rest; /dev/shm holds {shm / GIB:.1f} GiB of DeepSpeed all-reduce buffers). "
                             "Not started, so that the kernel's OOM killer cannot pick another job's process")
        time.sleep(5.0)
        waited += 5.0
    venv_bin = Path(sys.executable).parent
    deepspeed = venv_bin / "deepspeed"
    if not deepspeed.is_file():
        raise BenchError(f"{deepspeed}: the deepspeed launcher is not installed in this environment")
    over = stage_overrides(paths, stage, args.steps, out_dir, args.valid_max_utts, args.override)
    cmd = [str(deepspeed), "--num_gpus", str(args.ranks), "--master_port", str(port), "--module", RANK_MODULE,
           "--config", str(paths.config), *over]
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    t_start = time.time()
    load_start = os.getloadavg()
    window = {"open": None, "close": None}
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env,
                                start_new_session=True)
        mon = RankMonitor(proc.pid)
        pos = 0
        try:
            while True:
                with open(log_path, errors="replace") as f:
                    f.seek(pos)
                    new = f.read()
                    pos = f.tell()
                opened = False
                for m in STEP_LINE.finditer(new):
                    s = int(m.group(1))
                    if s >= 1 and window["open"] is None:
                        window["open"], opened = time.time(), True
                    if s >= args.steps and window["close"] is None:
                        window["close"] = time.time()
                in_steps = window["open"] is not None and window["close"] is None
                mon.sample(in_steps, window_opened=opened)
                if proc.poll() is not None:
                    break
                if time.time() - t_start > args.timeout_s:
                    os.killpg(proc.pid, 15)  # the launcher's own session: this run's processes only
                    proc.wait(30)
                    raise BenchError(f"ZeRO-{stage}: no exit after {args.timeout_s} s (--timeout-s); log {log_path}")
                time.sleep(args.poll_s)
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(30)
            raise
    load_end = os.getloadavg()
    removed = []
    if not args.keep_shm:  # only the buffers of this port that this run wrote
        for p in shm_buffers(port):
            try:
                if p.stat().st_mtime >= t_start - 1:
                    p.unlink()
                    removed.append(p.name)
            except OSError:
                pass
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchError(f"ZeRO-{stage}: the launcher exited {proc.returncode}; log {log_path}:\n{tail}")
    metrics_path = out_dir / "metrics.json"
    if not metrics_path.is_file():
        raise BenchError(f"ZeRO-{stage}: {metrics_path} not written; log {log_path}")
    metrics = json.loads(metrics_path.read_text())
    ranks = mon.by_rank()
    if len(ranks) != args.ranks:
        raise BenchError(f"ZeRO-{stage}: saw {len(ranks)} rank process(es), expected {args.ranks}; log {log_path}")
    return {"stage": stage, "port": port, "log": str(log_path), "out_dir": str(out_dir),
            "wall_s": round(time.time() - t_start, 1), "loadavg_start": list(load_start),
            "loadavg_end": list(load_end), "window_found": window["open"] is not None and window["close"] is not None,
            "window_s": (window["close"] - window["open"]) if window["open"] and window["close"] else None,
            "ranks": [asdict(m) for m in ranks], "shm_removed": removed,
            "step_time_s_median": metrics.get("step_time_s_median"),
            "step_time_s_mean": metrics.get("step_time_s_mean"), "train_losses": metrics.get("train_losses", []),
            "steps": metrics.get("steps"), "world_size": metrics.get("world_size"),
            "frozen_unchanged": metrics.get("frozen_unchanged"), "optimizer_updates": metrics.get("optimizer_updates")}


def safetensors_numel(path: Path) -> int:
    """Sum of the tensor sizes of a safetensors file (or of an index's files), read from the headers only."""
    from safetensors import safe_open

    files = [path]
    if path.name.endswith(".index.json"):
        files = sorted({path.parent / f for f in json.loads(path.read_text())["weight_map"].values()})
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += math.prod(st.get_slice(k).get_shape())
    return total


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    raise BenchError(f"{folder}: no model.safetensors(.index.json) to count parameters from")


def measured_params(paths: BenchPaths) -> dict:
    """Trainable = the connector (variant frozen: nothing else trains), frozen = the LLM (tied tables once).
    The encoder is not loaded by these runs (features cached, leakage_utts=0)."""
    trainable = safetensors_numel(_weights_file(paths.init_connector)) if paths.init_connector else None
    frozen = safetensors_numel(_weights_file(paths.llm))
    return {"trainable": trainable, "frozen": frozen}


def loss_agreement(runs: dict[int, dict]) -> dict:
    """Max |difference| of the train losses, step by step, of every stage against the first one and over all pairs."""
    stages = sorted(runs)
    if not stages:
        return {}
    ref = runs[stages[0]]["train_losses"]
    vs_ref = {}
    worst = 0.0
    for s in stages:
        a = runs[s]["train_losses"]
        n = min(len(a), len(ref))
        vs_ref[s] = max((abs(a[i] - ref[i]) for i in range(n)), default=0.0)
        for t in stages:
            b = runs[t]["train_losses"]
            m = min(len(a), len(b))
            worst = max([worst] + [abs(a[i] - b[i]) for i in range(m)])
    return {"reference_stage": stages[0], "max_abs_diff_vs_reference": vs_ref, "max_abs_diff_any_pair": worst}


# ====================================================================================== projection
