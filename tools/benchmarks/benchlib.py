"""What the benchmarks in this folder share: machine facts, and their JSON and PNG written atomically.

The benchmark scripts import it as a sibling module (``python tools/benchmarks/<name>.py`` puts this folder first
on ``sys.path``; the tests add it).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from speechlm.atomic import atomic_path, atomic_write_text


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
