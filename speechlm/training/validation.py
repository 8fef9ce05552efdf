"""Batches made ready for the model (the same on every rank) and validation: token-weighted metrics over
every rank's share of the validation data."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from speechlm.data.batching import Batch, TextBatches, encode_batch, uses_text_batch
from speechlm.training.deepspeed_engine import Engine
from speechlm.training.distributed import all_max, all_sum
from speechlm.training.failures import raise_everywhere

#: Metrics that are counts: summed over batches and ranks, never averaged.
COUNT_KEYS = ("tokens", "targets", "acc_correct", "acc_total")


@dataclass
class BatchPrep:
    """What happens to a loaded batch before the forward pass (same on every rank)."""

    device: torch.device
    dtype: torch.dtype | None = None  # features cast to the training precision (bf16)
    encoder: Any = None  # on-the-fly path: a SpeechEncoder (frozen), run on the training device
    text: TextBatches | None = None  # multitask: text-only LM batches
    text_ratio: float = 0.0  # fraction of steps that also get a text batch
    seed: int = 0
    # An adapted encoder runs inside the trained module (its parameters need gradients): leave the waves as they are
    encode_in_module: bool = False

    def __call__(self, batch: Batch, step: int | None = None) -> Batch:
        if batch.features is None and not self.encode_in_module:
            if self.encoder is None:
                raise ValueError("batch has no features and no encoder was given to compute them")
            batch = encode_batch(batch, self.encoder)
        batch = batch.to(self.device, self.dtype)
        if step is not None and self.text is not None and uses_text_batch(step, self.text_ratio, self.seed):
            ids, mask = self.text.batch(step)
            batch = replace(batch, text_ids=ids.to(self.device), text_mask=mask.to(self.device))
        return batch


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each non-count metric over the rows that have it (a step's micro-batches)."""
    keys = {k for r in rows for k in r if k not in COUNT_KEYS}
    return {k: sum(r[k] for r in rows if k in r) / max(1, sum(1 for r in rows if k in r)) for k in sorted(keys)}


@torch.no_grad()
def validate(engine: Engine, batches: Iterable[Batch], prep: BatchPrep) -> dict[str, float]:
    """Token-weighted validation metrics over every rank's share (filler batches not counted).

    Float metrics are weighted by the batch's ``tokens`` (stage 1) or ``targets`` (stage 2) count;
    ``acc_correct / acc_total`` becomes ``token_acc``. With several ranks, each batch's loading is agreed
    on first: an error on one rank is raised on all, and a batch left empty by ``data.skip_bad`` on one
    rank is skipped on all (their forward passes must pair up under ZeRO-3).
    """
    engine.ds.eval()
    multi = engine.info.world_size > 1
    sums: dict[str, float] = {}
    it = iter(batches)
    while True:
        batch, err, done = None, None, False
        try:
            raw = next(it)
            batch = None if raw.empty else prep(raw)
        except StopIteration:
            done = True
        except Exception as e:  # noqa: BLE001 -- every rank must hear of it
            err = e
        if multi:
            failed, empty, done_any = all_max([err is not None, batch is None and not done, done])
            if failed:
                raise_everywhere(err, 0, "validation data")
            if done_any:
                break
            if empty:
                continue
        else:
            if err is not None:
                raise err
            if done:
                break
            if batch is None:
                continue
        _, m = engine.ds(batch)
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
