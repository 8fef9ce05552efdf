"""What a run leaves to read: the train/valid history (kept in checkpoints), TensorBoard scalars and the
curves PNG."""

from __future__ import annotations

import math
from pathlib import Path

from speechlm.atomic import atomic_path


class RunLog:
    """Train/valid history (kept in checkpoints so resumed curves are whole) + TensorBoard on rank 0."""

    def __init__(self, out_dir: Path, is_main: bool, history: dict | None = None):
        self.is_main = is_main
        self.history = history or {"train": [], "valid": []}
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def add(self, kind: str, step: int, values: dict[str, float]) -> None:
        self.history[kind].append({"step": step, **values})
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(history: dict, path: Path, title: str) -> None:
    """PNG of the training loss and every validation metric against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = ("step", "tokens", "targets", "leakage_targets", "time_s")
    valid_keys = sorted({k for r in history["valid"] for k in r if k not in skip})
    n = 1 + len(valid_keys)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    flat = list(axes.flat)
    tr = history["train"]
    flat[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=1)
    flat[0].set_title("train loss")
    for ax, k in zip(flat[1:], valid_keys):
        pts = [r for r in history["valid"] if k in r]
        ax.plot([r["step"] for r in pts], [r[k] for r in pts], marker="o")
        ax.set_title(f"valid {k}")
    for ax in flat[n:]:
        ax.axis("off")
    for ax in flat[:n]:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
