"""DeepSpeed ZeRO stages 0 / 2 / 3 for stage 2: measured on 2 CPU ranks, projected for Llama-3-8B on 8 GPUs.

    python tools/benchmarks/bench_zero.py --steps 12 --master-port 29561
    python tools/benchmarks/bench_zero.py --projection-only          # the second table alone, no training

**Measured.** ``recipes/stage2_finetune.py`` with ``--config`` (default ``recipes/configs/stage2_small.yaml``),
the same data, seed and ``--steps`` steps under ``engine.zero_stage`` 0, 2 and 3: one ``deepspeed
--num_gpus 2`` launcher run per stage, each into ``--work-dir/zero{S}`` (removed first, so nothing resumes).
Validation and checkpoints are pushed out of the timed steps (``loop.eval_every=0 loop.save_every=0
leakage_utts=0``; the final validation that every run ends with reads ``--valid-max-utts`` rows). The
ranks are watched from outside (the launcher's children's children, found with psutil): their
``/proc/<pid>/status`` is read every ``--poll-s`` seconds for ``VmHWM`` (the kernel's peak resident set of
the whole process: model load, DeepSpeed init, steps, final validation) and ``VmRSS`` / ``RssAnon`` /
``RssShmem``, whose maxima are kept for the window between the ranks' "step 1" and "step N" log lines
(steps 2..N only). To get those lines the ranks run through this file (``--rank-of RECIPE``: it turns the
``speechlm`` logger on and runs the recipe unchanged with ``loop.log_every=1``). Step time is the run's
``metrics.json`` ``step_time_s_median``; the train losses of the stages are compared step by step.
Trainable / frozen parameters are counted from the safetensors headers of the connector and the LLM
(nothing loaded). DeepSpeed's CPU shared-memory all-reduce buffers that a run leaves in ``/dev/shm``
(``deepspeed_allreduce_buffer_*_<port>_*``, 66 MB per rank, never removed by DeepSpeed) are removed
after each run when this run created them (``--keep-shm`` keeps them).

**Projected** (``--real-config``, default ``recipes/configs/librispeech_llama3_stage2.yaml``): memory per GPU
on ``--gpus`` GPUs under ZeRO-2 and ZeRO-3 for the frozen Meta-Llama-3-8B (bf16; its shape from
``tools/gpu_check.py``'s ``llama_config("8b")``, built on the meta device), w2v-BERT 2.0 (built the same way;
loaded on every rank only when the config needs it: no feature cache, or ``leakage_utts`` > 0) and the SSR
connector built by ``speechlm.training.build.make_connector`` from that config; the DeepSpeed settings are
``engine.ds_config`` as ``speechlm.training.engine.ds_config`` builds it. Formulas: :func:`model_states`,
:func:`llm_activations`, :func:`connector_activations`, :func:`zero_buffers`; every assumption is printed and
written to the JSON (``projection.assumptions``).

Writes ``--out`` (JSON, atomically; default ``--work-dir/report.json``), a PNG (``--plot``) and prints both
tables as markdown with the machine's load average, because the timings are taken on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: the repository and this folder (benchlib) importable
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from benchlib import pyplot, save_figure, write_json

SCHEMA = "speechlm-bench-zero-1"
GIB = 2.0**30
MIB = 2.0**20
STEP_LINE = re.compile(r"\bstep (\d+) loss ")
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmPeak")


class BenchError(RuntimeError):
    """A benchmark input is missing or a run failed: the message names the path / the log."""


# ============================================================================================ /proc
def parse_proc_status(text: str) -> dict[str, int]:
    """The memory lines of a ``/proc/<pid>/status`` text, in bytes (``VmHWM:  123 kB`` -> 125952)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or key not in STATUS_FIELDS:
            continue
        parts = rest.split()
        if not parts:
            continue
        value = int(parts[0])
        unit = parts[1].lower() if len(parts) > 1 else "b"
        out[key] = value * {"kb": 1024, "mb": 1024**2, "gb": 1024**3, "b": 1}.get(unit, 1)
    return out


def read_proc_status(pid: int) -> dict[str, int] | None:
    try:
        return parse_proc_status(Path(f"/proc/{pid}/status").read_text())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def local_rank_of(cmdline: list[str]) -> int | None:
    """The ``--local_rank=N`` the deepspeed launcher gives each rank (None: not a rank)."""
    for i, arg in enumerate(cmdline):
        if arg.startswith("--local_rank="):
            return int(arg.split("=", 1)[1])
        if arg == "--local_rank" and i + 1 < len(cmdline):
            return int(cmdline[i + 1])
    return None


@dataclass
class RankMemory:
    """What was seen of one rank process (bytes)."""

    pid: int
    local_rank: int
    vm_hwm: int = 0  # kernel's peak RSS of the process, last value read before it exited
    vm_hwm_before_steps: int = 0  # VmHWM when the window opened (load + DeepSpeed init + step 1)
    rss_steps_max: int = 0  # maxima of the samples taken inside the window (steps 2..N)
    anon_steps_max: int = 0
    shmem_steps_max: int = 0
    file_steps_max: int = 0
    samples_in_steps: int = 0


class RankMonitor:
    """Polls the rank processes under a launcher pid (children's children) from outside."""

    def __init__(self, launcher_pid: int):
        self.launcher_pid = launcher_pid
        self.ranks: dict[int, RankMemory] = {}  # pid -> memory

    def discover(self) -> None:
        import psutil

        # exactly two levels down (deepspeed -> launch.py -> ranks): a process a rank forks carries the rank's
        # command line too, and must not count as another rank
        kids = []
        try:
            for child in psutil.Process(self.launcher_pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    kids += child.children()
        except psutil.NoSuchProcess:
            return
        for proc in kids:
            if proc.pid in self.ranks:
                continue
            try:
                rank = local_rank_of(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
                continue
            if rank is not None:
                self.ranks[proc.pid] = RankMemory(proc.pid, rank)

    def sample(self, in_steps: bool, window_opened: bool = False) -> None:
        self.discover()
        for mem in self.ranks.values():
            st = read_proc_status(mem.pid)
            if not st or "VmHWM" not in st:
                continue  # exited (its last VmHWM is kept)
            mem.vm_hwm = max(mem.vm_hwm, st["VmHWM"])
            if window_opened:
                mem.vm_hwm_before_steps = st["VmHWM"]
            if in_steps:
                mem.samples_in_steps += 1
                mem.rss_steps_max = max(mem.rss_steps_max, st.get("VmRSS", 0))
                mem.anon_steps_max = max(mem.anon_steps_max, st.get("RssAnon", 0))
                mem.shmem_steps_max = max(mem.shmem_steps_max, st.get("RssShmem", 0))
                mem.file_steps_max = max(mem.file_steps_max, st.get("RssFile", 0))

    def by_rank(self) -> list[RankMemory]:
        return sorted(self.ranks.values(), key=lambda m: m.local_rank)


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def shm_buffers(port: int | None = None) -> list[Path]:
    pat = f"deepspeed_allreduce_buffer_*_{port}_*" if port is not None else "deepspeed_allreduce_buffer_*"
    return [Path(p) for p in glob.glob(f"/dev/shm/{pat}")]


# ============================================================================================ runs
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


def _rank_main(argv: list[str]) -> None:
    """Inside a rank (``--rank-of RECIPE``): the ``speechlm`` logger on stderr, then the recipe as __main__."""
    import logging
    import runpy

    i = argv.index("--rank-of")
    recipe = argv[i + 1]
    rest = argv[:i] + argv[i + 2:]
    lg = logging.getLogger("speechlm")
    lg.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    lg.addHandler(handler)
    sys.argv = [recipe, *rest]
    runpy.run_path(recipe, run_name="__main__")


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
    cmd = [str(deepspeed), "--num_gpus", str(args.ranks), "--master_port", str(port), str(Path(__file__).resolve()),
           "--rank-of", str(ROOT / "recipes" / "stage2_finetune.py"), "--config", str(paths.config), *over]
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
def model_states(frozen_params: int, trainable_params: int, n_gpus: int, zero: int, outside_frozen_params: int = 0,
                 frozen_bytes: int = 2, weight_bytes: int = 2, grad_bytes: int = 2, optim_bytes: int = 12) -> dict:
    """Bytes per GPU of the weights and optimizer state (ZeRO paper, Rajbhandari et al. 2020, mixed-precision Adam).

    Frozen parameters inside the DeepSpeed model: ``frozen_bytes`` each, replicated under ZeRO-0/1/2,
    partitioned under ZeRO-3; they get no gradient and no optimizer state (engine.param_groups gives the
    optimizer only trainable ones). ``outside_frozen_params`` (the encoder, never handed to DeepSpeed) are
    replicated under every stage. Trainable: weights ``weight_bytes`` (partitioned only by ZeRO-3),
    gradients ``grad_bytes`` (partitioned by ZeRO-2/3), optimizer ``optim_bytes`` (fp32 master + Adam's two
    moments = 12; partitioned by ZeRO-1/2/3).
    """
    n = max(1, n_gpus)
    return {
        "frozen_weights": frozen_params * frozen_bytes / (n if zero >= 3 else 1),
        "outside_frozen_weights": outside_frozen_params * frozen_bytes,
        "trainable_weights": trainable_params * weight_bytes / (n if zero >= 3 else 1),
        "trainable_grads": trainable_params * grad_bytes / (n if zero >= 2 else 1),
        "optimizer_states": trainable_params * optim_bytes / (n if zero >= 1 else 1),
    }


def llm_layer_bytes_per_token(hidden: int, intermediate: int, act_bytes: int = 2, norm_bytes: int = 4) -> float:
    """What one frozen Llama decoder layer keeps for the backward pass, per token, when gradients flow to its
    inputs only: frozen linears keep no input (the input gradient needs only the weight); the two RMSNorms
    keep their fp32 input (HF upcasts: ``norm_bytes`` x hidden each); attention keeps q, k, v (k, v repeated to
    all heads, ``repeat_kv``) and its output (4 x hidden); SwiGLU keeps gate, silu(gate) and up (3 x
    intermediate)."""
    return 2 * norm_bytes * hidden + act_bytes * (4 * hidden + 3 * intermediate)


def llm_activations(tokens: int, layers: int, hidden: int, intermediate: int, vocab: int, checkpointing: bool,
                    act_bytes: int = 2, logit_bytes: int = 10) -> dict:
    """Bytes of the frozen LLM's activations for ``tokens`` tokens of one micro-batch.

    Without checkpointing every layer keeps :func:`llm_layer_bytes_per_token`; with it (HF, non-reentrant)
    each layer keeps its input (``act_bytes`` x hidden) and one layer's activations are rebuilt at a time in
    the backward pass. The logits peak at the loss: bf16 logits + their fp32 copy + fp32 log-softmax
    (``logit_bytes`` = 2 + 4 + 4 per element).
    """
    per_layer = llm_layer_bytes_per_token(hidden, intermediate, act_bytes)
    if checkpointing:
        layers_b = tokens * (layers * act_bytes * hidden + per_layer)
    else:
        layers_b = tokens * layers * per_layer
    return {"llm_layers": float(layers_b), "logits": float(tokens * vocab * logit_bytes)}


def connector_activations(frames: int, clips: int, layers: int, d_model: int, ffn_hidden: int, d_enc: int,
                          act_bytes: int = 2, dropout: bool = True) -> dict:
    """Bytes of the (trained) SSR connector's activations for ``frames`` frames (after stacking) of a batch.

    Per frame and block: the inputs of the four trained linears (qkv, out, gate/up shared, down:
    d, d, d, ffn_hidden), both RMSNorm inputs (2 d), SDPA's q, k, v, out (4 d), SwiGLU's gate, silu(gate),
    up (3 ffn_hidden), each ``act_bytes``, plus two 1-byte dropout masks (2 d). The adapter keeps its input
    (d_enc per frame). SDPA's boolean mask becomes an additive ``act_bytes`` bias per clip, T x T
    (T = frames / clips), kept by each block. No activation checkpointing inside the connector.
    """
    per_frame = act_bytes * (9 * d_model + 4 * ffn_hidden) + (2 * d_model if dropout else 0)
    t = frames / max(1, clips)
    return {"connector_blocks": float(frames * layers * per_frame + frames * act_bytes * d_enc),
            "connector_masks": float(layers * clips * t * t * act_bytes)}


def zero_buffers(zero_conf: dict, zero: int, largest_gathered: int, buffer_bytes: int = 2) -> dict:
    """DeepSpeed's own buffers per GPU, from the ``zero_optimization`` section (DeepSpeed 0.19 defaults).

    ZeRO-2 with contiguous_gradients: a gradient bucket of reduce_bucket_size elements, two with
    overlap_comm (stage_1_and_2.py allocates them whole, however few parameters train). ZeRO-3: one
    reduce bucket, and the gathered (un-partitioned) parameters: at most stage3_max_live_parameters, but
    never less than the largest module's parameters + stage3_prefetch_bucket_size (the bound is used: with
    stage3_max_reuse_distance as large as max_live, parameters reused in the backward pass stay gathered).
    """
    zc = zero_conf.get("zero_optimization", zero_conf)
    bucket = float(zc.get("reduce_bucket_size", 5e8))
    out = {"reduce_buckets": 0.0, "zero3_gathered_params": 0.0}
    if zero == 2 and zc.get("contiguous_gradients", True):
        out["reduce_buckets"] = bucket * (2 if zc.get("overlap_comm", False) else 1) * buffer_bytes
    if zero >= 3:
        if zc.get("contiguous_gradients", True):
            out["reduce_buckets"] = bucket * buffer_bytes
        live = float(zc.get("stage3_max_live_parameters", 1e9))
        prefetch = float(zc.get("stage3_prefetch_bucket_size", 5e7))
        out["zero3_gathered_params"] = max(live, largest_gathered + prefetch) * buffer_bytes
    return out


@dataclass
class ProjectionInputs:
    n_gpus: int
    llm_params: int
    llm_largest_module_params: int
    llm_layers: int
    llm_hidden: int
    llm_intermediate: int
    llm_vocab: int
    encoder_params: int
    encoder_loaded: bool
    connector_params: int
    connector_layers: int
    connector_d_model: int
    connector_ffn_hidden: int
    connector_stack: int
    d_enc: int
    clips: int
    frames: int  # encoder frames per micro-batch (before stacking)
    tokens: int  # LLM positions per micro-batch (transcript tokens + one BOS per clip)
    zero_confs: dict = field(default_factory=dict)  # stage -> DeepSpeed config dict
    dtype_bytes: int = 2
    runtime_overhead_bytes: float = 1.0 * GIB  # CUDA context + NCCL communicators (assumed)


def project(inp: ProjectionInputs) -> dict:
    """Per-GPU bytes under ZeRO-2 and ZeRO-3, with and without activation checkpointing in the LLM."""
    out: dict[str, Any] = {}
    b = inp.dtype_bytes
    frames_after = math.ceil(inp.frames / max(1, inp.connector_stack))
    conn = connector_activations(frames_after, inp.clips, inp.connector_layers, inp.connector_d_model,
                                 inp.connector_ffn_hidden, inp.d_enc * inp.connector_stack, b)
    for zero in (2, 3):
        parts = model_states(inp.llm_params, inp.connector_params, inp.n_gpus, zero,
                             inp.encoder_params if inp.encoder_loaded else 0, frozen_bytes=b, weight_bytes=b,
                             grad_bytes=b, optim_bytes=12)
        parts.update(zero_buffers(inp.zero_confs.get(zero, {}), zero, inp.llm_largest_module_params, b))
        parts.update(conn)
        parts["runtime_overhead"] = inp.runtime_overhead_bytes
        for ckpt in (True, False):
            llm = llm_activations(inp.tokens, inp.llm_layers, inp.llm_hidden, inp.llm_intermediate, inp.llm_vocab,
                                  ckpt, b)
            p = {**parts, **llm}
            out[f"zero{zero}_{'ckpt' if ckpt else 'nockpt'}"] = {"parts": p, "total": sum(p.values())}
    return out


def _load_gpu_check():
    name = "_bench_zero_gpu_check"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def real_scale_inputs(config: Path, n_gpus: int, clips: int, encoder_params: int | None = None) -> tuple[ProjectionInputs, dict]:
    """Build Llama-3-8B, w2v-BERT 2.0 and the config's SSR on the meta device and read the sizes off them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from speechlm.config import load_config
    from speechlm.training import build
    from speechlm.training.configs import Stage2Config
    from speechlm.training.engine import EngineConfig, ds_config

    if not config.is_file():
        raise BenchError(f"{config}: real-scale config not found (--real-config)")
    gc = _load_gpu_check()
    cfg = load_config(Stage2Config, config, [])
    lcfg = LlamaConfig(**gc.llama_config("8b"))
    with torch.device("meta"):
        llm = LlamaForCausalLM(lcfg)
        if encoder_params is None:
            enc_model, _ = gc.encoder_model("w2v-bert", tiny=False)
            encoder_params = sum(p.numel() for p in enc_model.parameters())
            del enc_model
        d_enc = gc.ENCODERS["w2v-bert"][2]
        facts = build.EncoderFacts("w2v-bert-2.0", list(cfg.model.encoder_layers), d_enc, 50.0, 16000)
        connector = build.make_connector(cfg.model, facts, llm)
    llm_params = sum(p.numel() for p in llm.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in llm.modules())
    ccfg = connector.cfg
    conn_params = sum(p.numel() for p in connector.parameters())
    zero_confs = {}
    for zero in (2, 3):
        ds_path = cfg.engine.ds_config
        if zero != cfg.engine.zero_stage or not ds_path:
            ds_path = str(ROOT / "recipes" / "ds" / f"zero{zero}_gpu.json")
        elif not Path(ds_path).is_absolute():
            ds_path = str(ROOT / ds_path)
        zero_confs[zero] = ds_config(EngineConfig(zero_stage=zero, ds_config=ds_path, precision="fp32"))
    # training reads cached features (recipes/run_librispeech_llama3.sh sets data.feature_cache); the stage-2
    # recipe still loads the encoder on every rank when its leakage check runs (leakage_utts > 0)
    need_encoder = cfg.leakage_utts > 0
    tokens = cfg.data.max_tokens + clips * (1 if cfg.bos else 0)
    inp = ProjectionInputs(
        n_gpus=n_gpus, llm_params=llm_params, llm_largest_module_params=largest, llm_layers=lcfg.num_hidden_layers,
        llm_hidden=lcfg.hidden_size, llm_intermediate=lcfg.intermediate_size, llm_vocab=lcfg.vocab_size,
        encoder_params=int(encoder_params), encoder_loaded=bool(need_encoder), connector_params=conn_params,
        connector_layers=ccfg.n_layers, connector_d_model=ccfg.d_model,
        connector_ffn_hidden=int(ccfg.ffn_mult * ccfg.d_model), connector_stack=ccfg.stack, d_enc=d_enc,
        clips=clips, frames=cfg.data.max_frames, tokens=tokens, zero_confs=zero_confs)
    facts_out = {
        "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        "llm": "Meta-Llama-3-8B shape (tools/gpu_check.py llama_config('8b')), bf16, frozen",
        "encoder": "w2v-BERT 2.0 shape (tools/gpu_check.py encoder_model('w2v-bert')), bf16, frozen; training "
                   "reads cached features (the run script sets data.feature_cache), " + (
                       f"but the leakage check (leakage_utts={cfg.leakage_utts}) loads the encoder on every rank"
                       if need_encoder else "and with leakage_utts=0 the encoder is not loaded"),
        "connector": {k: getattr(ccfg, k) for k in ("d_model", "n_layers", "n_heads", "ffn_mult", "stack", "mask",
                                                    "dropout")},
        "ds_configs": {z: {k: v for k, v in c.get("zero_optimization", {}).items()} for z, c in zero_confs.items()},
        "gradient_checkpointing_in_config": bool(cfg.model.gradient_checkpointing),
        "batch": {"max_frames": cfg.data.max_frames, "max_tokens": cfg.data.max_tokens, "clips_assumed": clips},
    }
    return inp, facts_out


ASSUMPTIONS = [
    "bf16 weights/activations (engine.precision=bf16); DeepSpeed casts the whole module to bf16, frozen parts included",
    ("trainable state per the ZeRO paper's mixed-precision Adam: 2 B weight + 2 B gradient + 12 B (fp32 master, m, v) "
     "per connector parameter; the frozen LLM has none (engine.param_groups passes only trainable parameters)"),
    ("ZeRO-2 replicates all weights (frozen LLM and connector), partitions gradients and optimizer state; ZeRO-3 "
     "partitions every parameter of the DeepSpeed model, the frozen LLM included; the encoder is outside it"),
    ("one micro-batch at the config's budget: max_frames encoder frames (50 Hz) and max_tokens transcript tokens + "
     "one BOS per clip; the clip count (for BOS and the per-clip attention masks) is --clips (12: 12 s clips, "
     "tools/gpu_check.py's recipe batch); grad_accum 1"),
    "memory-efficient / flash SDPA on the GPU: no T x T attention probabilities kept (only the connector's mask bias)",
    ("ZeRO-3 gathered parameters at their stage3_max_live_parameters bound; typical is the largest module "
     "(lm_head / embedding table) + the prefetch bucket"),
    "CUDA context + NCCL: 1 GiB per GPU (assumed, not derived); allocator fragmentation not counted",
    ("host RAM: every rank builds the full bf16 LLM before DeepSpeed partitions it (the model is made outside "
     "deepspeed.zero.Init), so each rank peaks at ~16 GB of host memory at load under ZeRO-2 and ZeRO-3 alike"),
]

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


def cpu_check(params: dict, runs: dict[int, dict], ranks: int) -> dict:
    """The projection's formulas at the CPU runs' size (fp32: no bf16 on this CPU), against the measured
    steady RSS (maximum over ranks of the peak RSS in steps 2..N), as differences between stages."""
    if not params.get("trainable") or not runs:
        return {}
    # fp32 training: weights 4, grads 4; ZeRO-0 runs the client AdamW directly (m, v: 8 B); ZeRO-2/3 add an
    # fp32 partition copy of the weights (12 B partitioned)
    pred = {}
    for s in runs:
        ms = model_states(params["frozen"], params["trainable"], ranks, s, 0, frozen_bytes=4, weight_bytes=4,
                          grad_bytes=4, optim_bytes=8 if s == 0 else 12)
        pred[s] = {"parts": ms, "total": sum(ms.values())}
    meas = {s: max(r["rss_steps_max"] for r in runs[s]["ranks"]) for s in runs}
    out = {"predicted_model_states_mib": {s: pred[s]["total"] / MIB for s in pred},
           "trainable_state_share_predicted": {
               s: (pred[s]["total"] - pred[s]["parts"]["frozen_weights"]) / pred[s]["total"] for s in pred},
           "measured_steady_rss_mib": {s: meas[s] / MIB for s in meas}, "deltas": []}
    stages = sorted(runs)
    for a, b in itertools.pairwise(stages):
        out["deltas"].append({"from": a, "to": b, "predicted_mib": (pred[b]["total"] - pred[a]["total"]) / MIB,
                              "measured_mib": (meas[b] - meas[a]) / MIB})
    return out


# ========================================================================================= output
def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MIB:,.0f}"


def _per_rank(ranks: list[dict], key: str) -> str:
    return " / ".join(_mib(m[key]) for m in ranks)


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


# ============================================================================================ main
def _expand(p: str) -> Path:
    path = Path(os.path.expanduser(p))
    return path if path.is_absolute() else ROOT / path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3], choices=[0, 1, 2, 3])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--master-port", type=int, default=29561, help="stage i uses this + i (29541 is taken)")
    ap.add_argument("--work-dir", default="runs/bench_zero")
    ap.add_argument("--out", default="", help="JSON report (default WORK_DIR/report.json)")
    ap.add_argument("--plot", default="", help="PNG (default WORK_DIR/bench_zero.png)")
    ap.add_argument("--config", default="recipes/configs/stage2_small.yaml")
    ap.add_argument("--train-manifest", default="runs/small/aligned/train.jsonl")
    ap.add_argument("--valid-manifest", default="runs/small/aligned/valid.jsonl")
    ap.add_argument("--feature-cache", default="~/.cache/speechlm/features/small-5.0h/train")
    ap.add_argument("--valid-feature-cache", default="~/.cache/speechlm/features/small-5.0h/valid")
    ap.add_argument("--llm", default="~/.cache/speechlm/models/smollm2-135m")
    ap.add_argument("--encoder", default="~/.cache/speechlm/models/whisper-base")
    ap.add_argument("--init-connector", default="runs/small/stage1/connector", help="'' = a fresh connector")
    ap.add_argument("--valid-max-utts", type=int, default=16, help="rows of the final validation every run ends with")
    ap.add_argument("--override", nargs="*", default=[], help="more key=value overrides for every stage")
    ap.add_argument("--poll-s", type=float, default=0.1)
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per launcher run")
    ap.add_argument("--min-available-gib", type=float, default=3.5,
                    help="MemAvailable needed before a run starts (0 = no check)")
    ap.add_argument("--wait-mem-s", type=float, default=0.0, help="wait this long for that memory, then fail")
    ap.add_argument("--keep-shm", action="store_true", help="leave this run's DeepSpeed /dev/shm buffers")
    ap.add_argument("--projection-only", action="store_true")
    ap.add_argument("--real-config", default="recipes/configs/librispeech_llama3_stage2.yaml")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--clips", type=int, default=12, help="clips per micro-batch assumed by the projection")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if "--rank-of" in raw:
        _rank_main(raw)
        return 0
    args = parse_args(argv)
    work = _expand(args.work_dir)
    out = _expand(args.out) if args.out else work / "report.json"
    png = _expand(args.plot) if args.plot else work / "bench_zero.png"
    report: dict[str, Any] = {
        "schema": SCHEMA, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "mem_available_gib_start": round((mem_available() or 0) / GIB, 1)},
    }
    try:
        if not args.projection_only:
            paths = BenchPaths(_expand(args.config), _expand(args.train_manifest), _expand(args.valid_manifest),
                               _expand(args.feature_cache), _expand(args.valid_feature_cache), _expand(args.llm),
                               _expand(args.encoder), _expand(args.init_connector) if args.init_connector else None)
            paths.check()
            work.mkdir(parents=True, exist_ok=True)
            params = measured_params(paths)
            runs: dict[int, dict] = {}
            report["measured"] = {"steps": args.steps, "ranks": args.ranks, "config": str(paths.config),
                                  "params": params, "runs": runs}
            for i, stage in enumerate(args.stages):
                print(f"=== ZeRO-{stage}: {args.steps} steps on {args.ranks} CPU ranks (log {work}/zero{stage}.log)",
                      flush=True)
                runs[stage] = run_stage(stage, paths, args, work, args.master_port + i)
                r = runs[stage]
                print(f"    median step {r['step_time_s_median']:.3f} s, VmHWM "
                      f"{' / '.join(_mib(m['vm_hwm']) for m in r['ranks'])} MiB, wall {r['wall_s']} s", flush=True)
                write_report(out, report)  # partial results survive a later failure
            report["measured"]["loss_agreement"] = loss_agreement(runs)
            report["measured"]["cpu_check"] = cpu_check(params, runs, args.ranks)
        inp, facts = real_scale_inputs(_expand(args.real_config), args.gpus, args.clips)
        report["projection"] = {"inputs": asdict(inp), "facts": facts, "assumptions": ASSUMPTIONS,
                                "per_gpu": project(inp)}
    except BenchError as e:
        report["error"] = str(e)
        work.mkdir(parents=True, exist_ok=True)
        write_report(out, report)
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    png_path = plot(report, png)
    report["plot"] = str(png_path) if png_path else None
    write_report(out, report)
    print(render(report))
    print(f"\nreport: {out}" + (f"\nplot: {png_path}" if png_path else ""))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
