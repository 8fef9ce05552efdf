"""What the benchmarks share: machine facts, their JSON and PNG written atomically, peak memory, and running the
training recipes (launcher command, environment, reading a finished stage's metrics)."""


from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from speechlm.atomic import atomic_path, atomic_write_text
from speechlm.errors import ConfigError
from speechlm.perf import ROOT


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
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------ training recipes
def recipe_env() -> dict[str, str]:
    """The environment a recipe runs in from a benchmark: this venv's bin first on PATH (the deepspeed launcher)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


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
