"""What the benchmarks share: machine facts, their JSON and PNG written atomically, peak memory, the options of
their command lines, and running the training recipes (launcher command, environment, reading a finished stage's
metrics)."""


from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from speechlm.atomic import atomic_path, atomic_write_text
from speechlm.errors import ConfigError
from speechlm.perf import ROOT
from speechlm.perf.procmem import read_proc_status


def machine() -> dict[str, Any]:
    """Where and when the numbers were taken: CPU, cores, 1-minute load average (others' work skews timings)."""
    return {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as PNG atomically (a crash never leaves half a file) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
    return path


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux ``VmHWM``; ``ru_maxrss`` elsewhere)."""
    status = read_proc_status(os.getpid())
    if status and "VmHWM" in status:
        return status["VmHWM"] / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_outputs(result: Any, json_path: str | Path, png_path: str | Path, plot: Any) -> None:
    """A benchmark's result as JSON at ``json_path`` and ``plot(Path(png_path))`` (said on stdout), each only when
    its path is set (``--json ''`` / ``--png ''`` skip them)."""
    if json_path:
        write_json(json_path, result)
    if png_path:
        plot(Path(png_path))
        print(f"wrote {png_path}")


# ------------------------------------------------------------------------------------ command lines
def bench_parser(description: str | None) -> argparse.ArgumentParser:
    """A benchmark script's parser: its docstring (``description``) printed as written."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_args(ap: argparse.ArgumentParser, run_help: str = "a run with aligned/{train,valid}.jsonl",
                 preset_help: str = "config recipes/configs/stage1_<preset>.yaml (default: the run's name)",
                 cache: tuple[str, ...] = ()) -> None:
    """What a benchmark trains from: ``--run`` (a finished run folder, default runs/small), ``--preset``, the cache
    options named in ``cache`` (``hours``: the corpus size in the cache folder names; ``corpus``, ``features``: the
    folders themselves, default from preset and hours), ``--llm`` and ``--encoder`` (default: the embedded models).
    The defaults of ``run_help`` and ``preset_help`` are the stage-1 benchmarks' (``stage1_inputs``)."""
    ap.add_argument("--run", default="runs/small", help=run_help)
    ap.add_argument("--preset", default="", help=preset_help)
    if "hours" in cache:
        ap.add_argument("--hours", default="5.0", help="corpus size in the cache folder names (<preset>-<hours>h)")
    for name in ("corpus", "features"):
        if name in cache:
            ap.add_argument(f"--{name}", default="")
    ap.add_argument("--llm", default="")
    ap.add_argument("--encoder", default="", help="the run's encoder (default: the embedded Whisper base)")


def add_launch_args(ap: argparse.ArgumentParser, ranks: int, master_port: int, port_help: str | None = None) -> None:
    """``--ranks`` (CPU ranks of each training run: ``recipe_command``) and the launcher's ``--master-port``."""
    ap.add_argument("--ranks", type=int, default=ranks)
    ap.add_argument("--master-port", type=int, default=master_port, help=port_help)


def add_stage1_training_args(ap: argparse.ArgumentParser, name: str, ranks: int, master_port: int) -> None:
    """The options of a benchmark that trains stage-1 variants (``stage1_overrides``): ``--steps``, ``--seed``, the
    launcher's, the runs' folder ``--work`` (default runs/NAME), the JSON ``--out`` (default runs/bench/NAME.json)
    and ``--retrain`` (else a finished run is reused: ``run_finished``)."""
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    add_launch_args(ap, ranks, master_port)
    ap.add_argument("--work", default=f"runs/{name}")
    ap.add_argument("--out", default=f"runs/bench/{name}.json")
    ap.add_argument("--retrain", action="store_true")


def add_timing_args(ap: argparse.ArgumentParser, threads: int, repeats: int | None = None) -> None:
    """``--threads`` (torch CPU threads) and, when ``repeats`` is given, ``--repeats`` (timed repeats)."""
    ap.add_argument("--threads", type=int, default=threads)
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats)


def add_output_args(ap: argparse.ArgumentParser, name: str) -> None:
    """``--json`` and ``--png`` (default runs/bench/NAME.json and .png; '' skips one: ``write_outputs``)."""
    ap.add_argument("--json", default=f"runs/bench/{name}.json")
    ap.add_argument("--png", default=f"runs/bench/{name}.png")


# ------------------------------------------------------------------------------------ training recipes
def recipe_env() -> dict[str, str]:
    """The environment a recipe runs in from a benchmark: this venv's bin first on PATH (the deepspeed launcher)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def launch_recipe(name: str, script: str, config: str | Path, keys: list[str], args: argparse.Namespace, log: Path,
                  what: str, peak_rss: bool = False) -> tuple[float, float | None]:
    """recipes/``script`` with ``--config config`` and the overrides ``keys`` under the launcher of ``args.ranks``
    and ``args.master_port`` (``recipe_command``), said on stdout as ``[name] training: ...``, its output appended
    to ``log``; (wall seconds, with ``peak_rss`` the peak resident set in MB of it and its waited children, else
    None). RuntimeError ``<what> failed (exit N); see <log>`` when it fails."""
    cmd = [*recipe_command(ROOT / "recipes" / script, args.ranks, args.master_port), "--config", str(config), *keys]
    print(f"[{name}] training: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rss = None
    with open(log, "a") as f:
        if peak_rss:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=recipe_env())
            _, status, usage = os.wait4(proc.pid, 0)
            rc = proc.returncode = os.waitstatus_to_exitcode(status)
            rss = usage.ru_maxrss / 1024.0  # Linux: KiB
        else:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=recipe_env())
    if rc != 0:
        raise RuntimeError(f"{what} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0, rss


def reuse_finished(name: str, out: Path, steps: int, retrain: bool) -> bool:
    """``--retrain`` removes the run in ``out``; True (said on stdout) when a finished run of ``steps`` is there to
    reuse (``run_finished``)."""
    if retrain and out.exists():
        shutil.rmtree(out)
    if run_finished(out, steps):
        print(f"[{name}] reusing {out}", flush=True)
        return True
    return False


def write_stage1_report(result: dict[str, Any], args: argparse.Namespace, table: str, note: str = "") -> None:
    """A stage-1 benchmark's JSON report (``args.out``) and its ``table`` on stdout, under a line of the setting:
    steps, ranks, ``note`` and the machine (``result["machine"]``)."""
    write_json(args.out, result)
    m = result["machine"]
    print(f"\nstage 1, {args.steps} steps, {args.ranks} rank(s), {note}{m['cpu']}, load {m['load_1min']}\n")
    print(table)
    print(f"\nwrote {args.out}")


def pick_names(text: str, known: list[str] | tuple[str, ...], what: str) -> list[str]:
    """A comma-separated choice from ``known`` (``--connectors a,b``), in the order given; ConfigError names the
    unknown ones and the choices (``what``: the benchmark and option, for the message)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{what}: unknown choice(s) {unknown}; choose from {list(known)}")
    return names


def recipe_command(script: str | Path, ranks: int, master_port: int) -> list[str]:
    """A training recipe as recipes/run_cpu.sh starts it: plain python for one rank, else the deepspeed launcher
    with ``ranks`` CPU ranks (append ``--config ...`` and the overrides)."""
    if ranks == 1:
        return [sys.executable, str(script)]
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(master_port),
            str(script)]


def run_finished(out: str | Path, steps: int) -> bool:
    """True when the stage run in ``out`` reached ``steps`` and exported its connector (a benchmark reuses it)."""
    m = Path(out) / "metrics.json"
    return m.is_file() and (Path(out) / "connector").is_dir() and json.loads(m.read_text()).get("steps") == steps


def stage_metrics(folder: str | Path) -> dict[str, Any] | None:
    """A stage run's final numbers: steps, the last validation's metrics, step time, loop wall time (metrics.json),
    and ``connector``: its exported connector's config (None without connector/config.json); None without
    metrics.json."""
    folder = Path(folder)
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    cfg = folder / "connector" / "config.json"
    return {"steps": m["steps"], **m["final_valid"], "step_time_s_median": m["step_time_s_median"],
            "loop_wall_s": m.get("loop_wall_s"),
            "connector": json.loads(cfg.read_text())["config"] if cfg.is_file() else None}


def stage1_inputs(run: str | Path, preset: str, llm: str, encoder: str, what: str) -> dict[str, Path]:
    """What a stage-1 benchmark trains from: a run's aligned train and valid manifests, the stage-1 config of
    ``preset`` (default: the run's folder name), the LLM and the encoder (default: the embedded models).
    ConfigError names the first one missing (``what``: the benchmark, for the message)."""
    from speechlm.paths import models_dir

    run = Path(run)
    paths = {"train": run / "aligned" / "train.jsonl", "valid": run / "aligned" / "valid.jsonl",
             "config": ROOT / "recipes" / "configs" / f"stage1_{preset or run.name}.yaml",
             "llm": Path(llm) if llm else models_dir() / "smollm2-135m",
             "encoder": Path(encoder) if encoder else models_dir() / "whisper-base"}
    for key, path in paths.items():
        if not path.exists():
            raise ConfigError(f"{what}: {key} not found: {path} (run `make small` first, or pass --run/--preset/--llm/"
                              "--encoder)")
    return paths


def stage1_overrides(paths: dict[str, Path], out: str | Path, seed: int, steps: int) -> list[str]:
    """The overrides every stage-1 benchmark run shares: the inputs of ``stage1_inputs``, ``out_dir``, the seed and
    ``steps`` steps with one save at the end and no validation before it (append the variant's own)."""
    return [f"data.train_manifest={paths['train']}", f"data.valid_manifest={paths['valid']}",
            f"model.llm={paths['llm']}", f"model.encoder={paths['encoder']}", f"out_dir={out}", f"seed={seed}",
            f"loop.max_steps={steps}", "loop.eval_every=0", f"loop.save_every={steps}", "loop.progress=false"]
