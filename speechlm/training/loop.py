"""The training loop both stages share: steps, validation, checkpoints, TensorBoard, progress, curves."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from speechlm.atomic import atomic_path, atomic_write_text
from speechlm.data.batching import Batch, TextBatches, encode_batch, uses_text_batch
from speechlm.training.engine import Engine, all_mean, all_sum, save_checkpoint

log = logging.getLogger(__name__)

#: Metrics that are counts: summed over batches and ranks, never averaged.
COUNT_KEYS = ("tokens", "targets", "acc_correct", "acc_total")


@dataclass
class LoopConfig:
    max_steps: int = 1000  # optimizer steps
    log_every: int = 10
    eval_every: int = 200  # 0 = validate only at the end
    save_every: int = 200  # 0 = checkpoint only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in <out_dir>/checkpoints
    progress: bool = True  # tqdm bar on rank 0
    crash_after: int = 0  # tests: the process dies right after this step (after any checkpoint), 0 = never


@dataclass
class BatchPrep:
    """What happens to a loaded batch before the forward pass (same on every rank)."""

    device: torch.device
    dtype: torch.dtype | None = None  # features cast to the training precision (bf16)
    encoder: Any = None  # on-the-fly path: a SpeechEncoder (frozen), run on the training device
    text: TextBatches | None = None  # multitask: text-only LM batches
    text_ratio: float = 0.0  # fraction of steps that also get a text batch
    seed: int = 0

    def __call__(self, batch: Batch, step: int | None = None) -> Batch:
        if batch.features is None:
            if self.encoder is None:
                raise ValueError("batch has no features and no encoder was given to compute them")
            batch = encode_batch(batch, self.encoder)
        batch = batch.to(self.device, self.dtype)
        if step is not None and self.text is not None and uses_text_batch(step, self.text_ratio, self.seed):
            ids, mask = self.text.batch(step)
            batch = replace(batch, text_ids=ids.to(self.device), text_mask=mask.to(self.device))
        return batch


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r if k not in COUNT_KEYS}
    return {k: sum(r[k] for r in rows if k in r) / max(1, sum(1 for r in rows if k in r)) for k in sorted(keys)}


@torch.no_grad()
def validate(engine: Engine, batches: Iterable[Batch], prep: BatchPrep) -> dict[str, float]:
    """Token-weighted validation metrics over every rank's share (filler batches not counted).

    Float metrics are weighted by the batch's ``tokens`` (stage 1) or ``targets`` (stage 2) count;
    ``acc_correct / acc_total`` becomes ``token_acc``.
    """
    engine.ds.eval()
    sums: dict[str, float] = {}
    for batch in batches:
        _, m = engine.ds(prep(batch))
        # Filler batches count zero but still add their keys: every rank must all-reduce the same keys.
        use = 1.0 if batch.counted else 0.0
        w = float(m.get("tokens", m.get("targets", 1))) * use
        for k, v in m.items():
            if k in COUNT_KEYS:
                sums[k] = sums.get(k, 0.0) + float(v) * use
            else:
                sums[k] = sums.get(k, 0.0) + float(v) * w
                sums["_w_" + k] = sums.get("_w_" + k, 0.0) + w
    keys = sorted(sums)
    total = all_sum({k: sums[k] for k in keys}) if keys else {}
    out = {k: total[k] / total["_w_" + k] for k in keys if not k.startswith("_w_") and k not in COUNT_KEYS
           and total.get("_w_" + k)}
    if total.get("acc_total"):
        out["token_acc"] = total["acc_correct"] / total["acc_total"]
    for k in ("tokens", "targets"):
        if k in total:
            out[k] = total[k]
    engine.ds.train()
    return out


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


def train_loop(engine: Engine, batches: Iterator[Batch], prep: BatchPrep, run_validation: Callable[[], dict],
               cfg: LoopConfig, out_dir: Path, identity: dict, export: Callable[[Path], None],
               start: dict | None = None, title: str = "training",
               frozen_check: Callable[[], str] | None = None) -> dict:
    """Train to ``cfg.max_steps``; returns the final metrics (also written to ``out_dir/metrics.json``).

    ``start`` is the trainer state of a resumed checkpoint (step, data position, history). Each step
    runs ``grad_accum`` micro-batches; logged losses are averaged over micro-batches and ranks.
    ``frozen_check`` (a fingerprint of the frozen weights) runs before and after: the result says
    whether they stayed bit-identical.
    """
    info = engine.info
    step = int(start["step"]) if start else 0
    runlog = RunLog(out_dir, info.is_main, start.get("history") if start else None)
    position = start.get("position", (0, 0)) if start else (0, 0)
    step_times: list[float] = []
    wall_start = time.perf_counter()
    frozen_start = frozen_check() if frozen_check else None
    accum = engine.cfg.grad_accum
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (info.is_main and cfg.progress), desc=title,
               dynamic_ncols=True)
    engine.ds.train()

    def valid_row() -> dict:
        t = time.perf_counter()
        row = run_validation()
        return {**row, "time_s": time.perf_counter() - t}

    def checkpoint(done: int) -> None:
        state = {"position": position, "history": runlog.history if info.is_main else None}
        save_checkpoint(engine, out_dir / "checkpoints", done, identity, state, keep=cfg.keep_checkpoints)
        export(out_dir / "connector")

    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = engine.lr
        micro: list[dict] = []
        for _ in range(accum):
            batch = prep(next(batches), step)
            loss, metrics = engine.ds(batch)
            engine.ds.backward(loss)
            engine.ds.step()
            position = (batch.epoch, batch.index + 1)
            micro.append(metrics)
        step += 1
        step_times.append(time.perf_counter() - t0)
        values = {**all_mean(_mean(micro)), "lr": lr}
        runlog.add("train", step, values)
        bar.update(1)
        if step % max(1, cfg.log_every) == 0 or step == cfg.max_steps:
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
            if not cfg.progress and info.is_main:
                log.info("step %d loss %.4f lr %.3g", step, values["loss"], lr)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            runlog.add("valid", step, valid_row())
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
            if step == cfg.max_steps:
                runlog.add("valid", step, valid_row())
            checkpoint(step)
        if cfg.crash_after and step == cfg.crash_after:
            bar.close()
            os._exit(17)  # simulates a crash: no cleanup, no final files
    bar.close()
    if not runlog.history["valid"] or runlog.history["valid"][-1]["step"] != step:
        runlog.add("valid", step, valid_row())  # a resumed run that had already finished
    final = runlog.history["valid"][-1]
    times = sorted(step_times)
    result = {
        "steps": step,
        "world_size": info.world_size,
        "final_valid": {k: v for k, v in final.items() if k != "step"},
        "final_train_loss": runlog.history["train"][-1]["loss"] if runlog.history["train"] else None,
        "step_time_s_median": times[len(times) // 2] if times else None,
        "step_time_s_mean": sum(times) / len(times) if times else None,
        "loop_wall_s": time.perf_counter() - wall_start,  # this process: steps + validation + checkpoints
        "train_losses": [r["loss"] for r in runlog.history["train"]],
    }
    if frozen_check is not None:
        frozen_end = frozen_check()
        result.update(frozen_sha256_start=frozen_start, frozen_sha256_end=frozen_end,
                      frozen_unchanged=frozen_start == frozen_end)
    if info.is_main:
        plot_curves(runlog.history, out_dir / "curves.png", title)
        atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1))
        atomic_write_text(out_dir / "history.json", json.dumps(runlog.history))
    runlog.close()
    return result
