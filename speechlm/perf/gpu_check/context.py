"""What a GPU-check part runs with: its options, the device and dtype, and a result file saved as it grows."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from speechlm.perf import ROOT

STAGE_CONFIGS = {1: ROOT / "recipes" / "configs" / "librispeech_llama3_stage1.yaml",
                 2: ROOT / "recipes" / "configs" / "librispeech_llama3_stage2.yaml"}


class Ctx:
    """What a part gets: the options, the device, and a result dict saved as it grows."""

    def __init__(self, args: argparse.Namespace, out: Path | None):
        self.args = args
        self.out = out
        self.result: dict[str, Any] = {}
        self.checks: dict[str, bool] = {}
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.name = ""

    @property
    def gpu(self) -> bool:
        return not self.args.cpu

    @property
    def tiny(self) -> bool:
        return bool(self.args.tiny)

    @property
    def device(self) -> str:
        return "cpu" if self.args.cpu else "cuda"

    def dtype(self):
        import torch

        return torch.bfloat16 if self.gpu else torch.float32

    def save(self, status: str = "running", error: str | None = None, tb: str | None = None) -> None:
        if self.out is None:
            return
        data = {"status": status, "error": error, "traceback": tb, "result": self.result, "checks": self.checks,
                "wall_s": time.time() - self.start}
        dump_json(self.out, data)

    def put(self, key: str, value: Any) -> None:
        self.result[key] = value
        self.save()
        text = json.dumps(value, default=jsonable)
        print(f"[{self.name} {time.time() - self.start:6.1f} s] {key}: {text[:300]}", flush=True)  # the log

    def check(self, name: str, ok: bool) -> bool:
        self.checks[name] = bool(ok)
        self.save()
        return bool(ok)

    def sync(self) -> None:
        if self.gpu:
            import torch

            torch.cuda.synchronize()


def jsonable(x: Any) -> Any:
    """JSON for what json.dumps does not know: paths as text, tensors and numpy scalars as numbers."""
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def dump_json(path: Path, data: Any) -> None:
    """Replace ``path`` in one rename (no fsync: a part saves after every number, and a reader polls the file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=jsonable))
    tmp.replace(path)


def ds_json(ctx: Ctx, zero: int) -> Path:
    """recipes/ds/zero{2,3}_gpu.json (the recipe's; 2e8-element communication buckets), or with ``--ds cpu``
    the CPU ones (the dry run: zero-filling those buckets every step costs ~0.5 s on the CPU)."""
    return ROOT / "recipes" / "ds" / (f"zero{zero}_gpu.json" if ctx.args.ds == "gpu" else f"zero{zero}.json")
