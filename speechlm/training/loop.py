"""The training loop both stages share: steps, validation, checkpoints, TensorBoard, progress, curves.

It survives the faults of a shared cluster (docs/PERFORMANCE.md, "Reliability: faults tried"):

* **non-finite loss or gradients**: the step makes no optimizer update on any rank (a non-finite loss on
  any rank, agreed by an all-reduce before the backward pass, makes every rank back-propagate NaN, so
  DeepSpeed's overflow check drops the whole step; a bare optimizer under ZeRO-0 is guarded by our own
  check), is counted (``nonfinite_steps``), logged and shown in TensorBoard and the progress bar;
  ``loop.max_bad_steps`` such steps in a row stop the run with :class:`NonFiniteError` naming the step
  and the batch's utterance ids. fp16 runs report DeepSpeed's loss-scale skips (``loss_scale_skips``,
  ``ds_skipped_steps``, ``loss_scale``); those are normal and not counted as bad.
* **SIGTERM / SIGUSR1** (preemption): every rank finishes its step, the ranks agree (all-reduce) to stop
  at the same step, save a checkpoint there and raise :class:`Preempted`; the recipes exit with
  :data:`EXIT_PREEMPTED` (75). The same command resumes exactly.
* **out of memory on a batch**: :class:`BatchMemoryError` naming the batch's frames, tokens, utterance
  ids and the ``data.max_frames`` / ``data.max_tokens`` budget, on every rank; with
  ``loop.skip_oom_batches`` the batch is dropped on every rank, memory freed, and the step takes the next
  batch instead (counted: ``oom_batches``; ``loop.max_bad_steps`` in a row stop the run). Needs ZeRO-0/1/2
  (under ZeRO-3 the forward pass gathers parameters collectively, so an OOM inside it stops the run), and
  an OOM in the backward pass always stops the run (the other ranks are in gradient collectives).
* **a file gone at training time**: with ``data.skip_bad`` the row is skipped (logged, ``rows_skipped``),
  else every rank stops: the failing rank with the error naming the file, the others with
  :class:`RankError` quoting it. Errors while loading or in the forward pass are agreed on before the
  next collective, so no rank waits forever for a failed one.
* **a failed checkpoint write** (full disk): see :func:`speechlm.training.checkpoint.save_checkpoint`.

A step, in the order :class:`Trainer` runs it: load a batch per micro-batch, agree on failures, forward,
backward, optimizer step (:meth:`Trainer.micro_batch`); tell an applied update from a skipped one
(:meth:`Trainer.outcome`, :meth:`Trainer.count_bad_step`) and reduce the metrics over ranks
(:meth:`Trainer.reduce_metrics`); validate and checkpoint on schedule; stop when asked (:meth:`Trainer.stop_if_asked`). Fault drills (tests, ``SPEECHLM_FAULT``, ``loop.crash_after``) step in through
:mod:`speechlm.training.hooks`; the loop itself holds none (:mod:`speechlm.training.faults`).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from speechlm.atomic import atomic_write_text
from speechlm.data.batching import Batch
from speechlm.errors import EXIT_PREEMPTED, BatchMemoryError, NonFiniteError, Preempted, SpeechLMError
from speechlm.training.checkpoint import save_checkpoint
from speechlm.training.deepspeed_engine import Engine
from speechlm.training.distributed import all_max, all_mean, gather_objects
from speechlm.training.failures import describe_batch, free_memory, is_out_of_memory, raise_everywhere
from speechlm.training.faults import FAULT_ENV, drill_hooks, parse_faults
from speechlm.training.hooks import HookList, TrainHooks
from speechlm.training.preemption import STOP_SIGNALS, install_stop_handlers, stop_requested
from speechlm.training.runlog import RunLog, plot_curves
from speechlm.training.validation import COUNT_KEYS, BatchPrep, mean_metrics, validate

# Besides the loop's own names, what recipes, tools and tests have imported from here since before the split.
__all__ = [
    "COUNT_KEYS", "FAULT_ENV", "MAX_EMPTY_BATCHES", "STOP_SIGNALS", "BatchPrep", "LoopConfig", "RunLog", "Trainer",
    "describe_batch", "install_stop_handlers", "is_out_of_memory", "parse_faults", "plot_curves", "stop_requested",
    "train_loop", "validate",
]

log = logging.getLogger(__name__)

#: Batches in a row whose every row failed to load (data.skip_bad) before the run stops: the data is gone.
MAX_EMPTY_BATCHES = 50


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
    # Stop the run after this many bad steps in a row: steps skipped for a non-finite loss or gradients, or
    # batches skipped for running out of memory (0 = never stop)
    max_bad_steps: int = 5
    # A batch that runs out of memory is skipped on every rank and the step takes the next batch (else the
    # run stops with an error naming the batch and the data.max_frames / data.max_tokens budget)
    skip_oom_batches: bool = False


def _skipped_optimizer_step(engine: Engine) -> None:
    """``engine.ds.step()`` without the update, for a bare torch optimizer (ZeRO-0 in fp32) with non-finite
    gradients: its ``step`` does nothing and it reports an overflow, so DeepSpeed counts a skipped step, leaves
    the LR schedule where it is and clears the gradients, as its own optimizers do."""
    opt = engine.ds.optimizer
    opt.step = lambda *args, **kwargs: None  # the instance attribute hides the method for this one call
    opt.overflow = True
    try:
        engine.ds.step()
    finally:
        del opt.step, opt.overflow


@dataclass
class StepState:
    """What one optimizer step gathers over its micro-batches."""

    number: int  # the step being trained (counts from 1)
    lr: float  # the learning rate it trains with
    metrics: list[dict] = field(default_factory=list)  # one row per micro-batch
    ids: list[str] = field(default_factory=list)  # utterance ids trained on (named when the step goes bad)
    poisoned: bool = False  # some rank's loss was not finite: every rank back-propagates NaN
    own_skip: bool = False  # the loop's own gradient check (bare optimizer) dropped the update
    rows_skipped: int = 0  # unreadable rows left out (data.skip_bad)


class Trainer:
    """Trains one stage to ``cfg.max_steps`` (see the module docstring); :meth:`run` returns the final metrics.

    ``start`` is the trainer state of a resumed checkpoint (step, data position, history, fault counts).
    Each step runs ``grad_accum`` micro-batches; logged losses are averaged over micro-batches and ranks.
    ``frozen_check`` (a fingerprint of the frozen weights) runs before and after: the result says whether
    they stayed bit-identical. ``batch_limits`` (config key -> value, e.g. ``data.max_frames``) are quoted
    when a batch runs out of memory. ``hooks`` are called at the named points of a step (none by default).
    """

    def __init__(self, engine: Engine, batches: Iterator[Batch], prep: BatchPrep, run_validation: Callable[[], dict],
                 cfg: LoopConfig, out_dir: Path, identity: dict, export: Callable[[Path], None],
                 start: dict | None = None, title: str = "training", frozen_check: Callable[[], str] | None = None,
                 batch_limits: dict[str, int] | None = None, hooks: Sequence[TrainHooks] = ()):
        self.engine, self.info, self.cfg = engine, engine.info, cfg
        self.batches, self.prep, self.run_validation, self.export = batches, prep, run_validation, export
        self.out_dir, self.identity, self.title = out_dir, identity, title
        self.frozen_check, self.batch_limits = frozen_check, batch_limits
        self.hooks = HookList(hooks)
        # Where a resumed run left off (all zero for a new one).
        self.start = start or {}
        self.step = int(start["step"]) if start else 0
        self.position = self.start.get("position", (0, 0))  # (epoch, batch index) of the data stream
        self.counts = {"nonfinite_steps": 0, "oom_batches": 0, "rows_skipped": 0, "loss_scale_skips": 0, "updates": 0}
        self.counts.update(self.start.get("faults") or {})
        self.bad_run = int(self.start.get("bad_run", 0))  # bad steps/batches in a row (reset by an applied update)
        self.bad_steps: list[int] = []  # the steps of the current run of bad ones
        self.skipped_rows: list[dict] = list(self.start.get("skipped_rows") or [])  # this rank's, first 100
        self.step_times: list[float] = []
        # A bare torch optimizer (ZeRO-0 in fp32) has no overflow check of its own: the loop checks the gradients.
        self.own_grad_check = not hasattr(engine.ds.optimizer, "overflow")
        self.runlog: RunLog | None = None
        self.bar = None

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Train to ``cfg.max_steps``; returns the final metrics (also written to ``out_dir/metrics.json``).
        Raises :class:`Preempted` after checkpointing when SIGTERM/SIGUSR1 arrived."""
        install_stop_handlers()
        self.runlog = RunLog(self.out_dir, self.info.is_main, self.start.get("history"))
        wall_start = time.perf_counter()
        frozen_start = self.frozen_check() if self.frozen_check else None
        from tqdm import tqdm

        self.bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=self.title, dynamic_ncols=True,
                        disable=not (self.info.is_main and self.cfg.progress))
        self.engine.ds.train()
        while self.step < self.cfg.max_steps:
            self.train_step()
        self.bar.close()
        return self.finish(frozen_start, wall_start)

    def train_step(self) -> None:
        """One optimizer step, then its bookkeeping: log, validate and checkpoint on schedule, stop if asked."""
        cfg = self.cfg
        t0 = time.perf_counter()
        st = StepState(self.step + 1, self.engine.lr)
        self.hooks.start_of_step(st.number)
        done, accum = 0, self.engine.cfg.grad_accum
        while done < accum:
            if self.micro_batch(st, last=done == accum - 1):
                done += 1
        self.step += 1
        self.step_times.append(time.perf_counter() - t0)
        applied, reason = self.outcome(st)
        values, stop_asked = self.reduce_metrics(st)
        if reason is not None:
            self.count_bad_step(st, reason)
        self.add_counts(values, applied)
        self.runlog.add("train", self.step, values)
        self.bar.update(1)
        self.hooks.after_step(self.step, self.engine)
        self.log_progress(values, st.lr, reason)
        busy = saved = False
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
            self.runlog.add("valid", self.step, self.valid_row())
            busy = True
        if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.max_steps:
            if self.step == cfg.max_steps:
                self.runlog.add("valid", self.step, self.valid_row())
            self.checkpoint(self.step)
            busy = saved = True
        self.hooks.end_of_step(self.step)
        self.stop_if_asked(stop_asked, busy, saved)

    # ---------------------------------------------------------------------------------- micro-batches
    def micro_batch(self, st: StepState, last: bool) -> bool:
        """Load, forward, backward and (every micro-batch, as DeepSpeed counts them) step one micro-batch.

        Returns False when the ranks dropped the batch for running out of memory (loop.skip_oom_batches): the
        step then takes the next one. Any other failure on any rank is raised on every rank.
        """
        engine, now = self.engine, st.number
        batch, err, skipped = self.next_batch(now)
        st.rows_skipped += skipped
        where = "loading a batch"
        if engine.zero3:  # the forward pass gathers parameters collectively: agree on the loading first
            oom = err is not None and is_out_of_memory(err)
            failed, any_oom = all_max([err is not None and not oom, oom])
            if failed:
                raise_everywhere(None if oom else err, now, where)
            if any_oom:
                err = None  # drop the exception (its traceback holds the batch's tensors)
                self.on_oom(now, batch, oom, where)
                return False
        loss = metrics = None
        if err is None:
            where = "forward pass"
            loss, metrics, err = self.forward(now, batch)
        # One small all-reduce per micro-batch, before the backward pass's collectives: did any rank fail to
        # load its batch or run its forward pass, run out of memory, or get a non-finite loss?
        oom = err is not None and is_out_of_memory(err)
        bad_loss = err is None and not bool(torch.isfinite(loss.detach()).all())
        failed, any_oom, any_bad_loss = all_max([err is not None and not oom, oom, bad_loss])
        if failed:
            raise_everywhere(None if oom else err, now, where)
        if any_oom:
            loss = metrics = err = None  # free the graph and the exception's frames before anything else
            self.on_oom(now, batch, oom, where)
            return False
        st.ids += batch.utt_ids
        if any_bad_loss:
            st.poisoned = True
        if st.poisoned:  # NaN gradients on every rank: DeepSpeed's overflow check drops the whole step
            loss = loss * float("nan")
        self.backward(now, batch, loss)
        if last and self.own_grad_check:
            grads_bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all())
                            for p in engine.module.parameters() if p.requires_grad)
            st.own_skip = bool(all_max([grads_bad])[0])
        if st.own_skip:
            _skipped_optimizer_step(engine)
        else:
            engine.ds.step()
        st.metrics.append(metrics)
        return True

    def next_batch(self, now: int) -> tuple[Batch | None, BaseException | None, int]:
        """This rank's next batch with at least one row, prepared: (batch, error while loading, rows skipped)."""
        skipped, empties = 0, 0
        while True:
            try:
                raw = next(self.batches)
            except Exception as e:  # noqa: BLE001 -- agreed on with the other ranks before anything collective
                return None, e, skipped
            self.position = (raw.epoch, raw.index + 1)
            for utt_id, why in raw.skipped:
                skipped += 1
                if len(self.skipped_rows) < 100:
                    self.skipped_rows.append({"id": utt_id, "error": why, "rank": self.info.rank, "step": now})
            if not raw.empty:
                break
            empties += 1
            if empties >= MAX_EMPTY_BATCHES:
                last = raw.skipped[-1][1] if raw.skipped else "?"
                return None, SpeechLMError(f"rank {self.info.rank}: every row of {empties} batches in a row failed "
                                           f"to load (data.skip_bad): is the data gone? Last: {last}"), skipped
        try:
            return self.prep(raw, now - 1), None, skipped
        except Exception as e:  # noqa: BLE001 -- e.g. the on-the-fly encoder running out of memory
            return raw, e, skipped

    def forward(self, now: int, batch: Batch) -> tuple[torch.Tensor | None, dict | None, BaseException | None]:
        """(loss, metrics, error): an error is returned, to be agreed on, unless it came from inside ZeRO-3's
        forward pass (the other ranks may be in its parameter gathers: nothing to agree with, it is raised)."""
        try:
            self.hooks.before_forward(now)
        except Exception as e:  # noqa: BLE001 -- before the forward pass: safe to agree on even under ZeRO-3
            return None, None, e
        try:
            loss, metrics = self.engine.ds(batch)
            loss, metrics = self.hooks.after_forward(now, loss, metrics)
        except Exception as e:
            if self.engine.zero3:
                raise
            return None, None, e
        return loss, metrics, None

    def backward(self, now: int, batch: Batch, loss: torch.Tensor) -> None:
        """The backward pass; running out of memory here stops the run (BatchMemoryError naming the batch)."""
        try:
            self.engine.ds.backward(loss)
        except Exception as e:
            if is_out_of_memory(e):
                raise BatchMemoryError(f"out of memory in the backward pass of step {now} on rank {self.info.rank}: "
                                       f"{describe_batch(batch, self.batch_limits)}. An OOM here cannot be skipped "
                                       "(the other ranks are in gradient collectives): lower data.max_frames / "
                                       "data.max_tokens") from None
            raise

    def on_oom(self, now: int, batch: Batch | None, mine: bool, where: str) -> None:
        """Every rank, once some rank ran out of memory (``mine``: this one): raise BatchMemoryError everywhere,
        or (loop.skip_oom_batches) drop the batch on every rank and count it."""
        cfg = self.cfg
        desc = None if not mine else (describe_batch(batch, self.batch_limits) if batch is not None else "(no batch)")
        texts = [f"rank {r}: {d}" for r, d in enumerate(gather_objects(desc)) if d]
        stage = "preparation of the batch" if where == "loading a batch" else where
        what = f"out of memory in the {stage} of step {now} on " + " | ".join(texts)
        free_memory()
        if not cfg.skip_oom_batches:
            raise BatchMemoryError(f"{what}. Lower data.max_frames / data.max_tokens (or data.max_batch), or set "
                                   "loop.skip_oom_batches=true to skip such outlier batches")
        self.counts["oom_batches"] += 1
        self.bad_run += 1
        if cfg.max_bad_steps and self.bad_run >= cfg.max_bad_steps:
            raise BatchMemoryError(f"{self.bad_run} batches in a row without an update ran out of memory "
                                   f"(loop.max_bad_steps={cfg.max_bad_steps}); last: {what}. The batches are too "
                                   "big for this device: lower data.max_frames / data.max_tokens")
        if self.info.is_main:
            log.warning("%s: batch skipped on every rank (loop.skip_oom_batches); the step takes the next one", what)

    # ------------------------------------------------------------------------------- after the update
    def outcome(self, st: StepState) -> tuple[bool, str | None]:
        """(was the update applied, why not when that makes a bad step); counts updates and fp16 scale skips."""
        engine = self.engine
        applied = not st.own_skip and bool(engine.ds.was_step_applied())
        if st.poisoned and applied:
            raise NonFiniteError(f"step {self.step}: DeepSpeed applied an update from non-finite gradients (its "
                                 "overflow check is off in this DeepSpeed config: bf16.check_grad_overflow?); the "
                                 "weights are no longer finite and will not be saved")
        reason = None
        if applied:
            self.counts["updates"] += 1
            self.bad_run, self.bad_steps = 0, []
        elif st.poisoned:
            reason = "non-finite loss"
        elif engine.fp16 and not st.own_skip:
            self.counts["loss_scale_skips"] += 1  # dynamic loss scaling at work: normal, not a bad step
        else:
            reason = "non-finite gradients"
        return applied, reason

    def reduce_metrics(self, st: StepState) -> tuple[dict[str, float], bool]:
        """The step's metrics averaged over micro-batches and ranks, and whether any rank was asked to stop."""
        # the metrics' all-reduce also carries the rows skipped and whether a stop was asked for (mean x ranks = sum)
        values = all_mean({**mean_metrics(st.metrics), "_rows_skipped": st.rows_skipped,
                           "_stop": 1.0 if stop_requested() else 0.0})
        self.counts["rows_skipped"] += round(values.pop("_rows_skipped") * self.info.world_size)
        stop_asked = values.pop("_stop") > 0
        values["lr"] = st.lr
        return values, stop_asked

    def count_bad_step(self, st: StepState, reason: str) -> None:
        """A step without an update: counted, logged naming every rank's rows; loop.max_bad_steps in a row stop."""
        cfg, step = self.cfg, self.step
        self.counts["nonfinite_steps"] += 1
        self.bad_run += 1
        self.bad_steps.append(step)
        where = "; ".join(f"rank {r}: {', '.join(ids[:8])}" for r, ids in enumerate(gather_objects(st.ids)))
        if self.info.is_main:
            log.warning("step %d skipped on every rank (no optimizer update): %s; batches %s", step, reason, where)
        if cfg.max_bad_steps and self.bad_run >= cfg.max_bad_steps:
            self.bar.close()
            raise NonFiniteError(f"{self.bad_run} steps in a row without an update (loop.max_bad_steps="
                                 f"{cfg.max_bad_steps}): steps {', '.join(map(str, self.bad_steps))} had a {reason}; "
                                 f"the last, step {step}, trained on {where}. No checkpoint holds non-finite "
                                 "weights: check those rows, lower engine.lr, or raise loop.max_bad_steps")

    def add_counts(self, values: dict[str, float], applied: bool) -> None:
        """The fault counts (once there is one) and fp16's loss scale, logged with the step's metrics."""
        c = self.counts
        if any(c[k] for k in ("nonfinite_steps", "oom_batches", "rows_skipped")):
            values.update(nonfinite_steps=c["nonfinite_steps"], oom_batches=c["oom_batches"],
                          rows_skipped=c["rows_skipped"], skipped=0.0 if applied else 1.0)
        if self.engine.fp16:
            values.update(loss_scale=self.engine.loss_scale or 0.0, ds_skipped_steps=self.engine.skipped_steps)

    def log_progress(self, values: dict[str, float], lr: float, reason: str | None) -> None:
        """Every ``log_every`` steps, the last one and every bad one: the progress bar, or a log line without it."""
        cfg, step, c = self.cfg, self.step, self.counts
        if step % max(1, cfg.log_every) == 0 or step == cfg.max_steps or reason is not None:
            post = {"loss": f"{values['loss']:.4f}", "lr": f"{lr:.2e}"}
            bad = c["nonfinite_steps"] + c["oom_batches"]
            if bad or c["rows_skipped"]:
                post["skipped"] = f"{bad}+{c['rows_skipped']}rows"
            self.bar.set_postfix(post)
            if not cfg.progress and self.info.is_main:
                log.info("step %d loss %.4f lr %.3g%s", step, values["loss"], lr,
                         f" (skipped: {c['nonfinite_steps']} non-finite steps, {c['oom_batches']} OOM "
                         f"batches, {c['rows_skipped']} rows)" if bad or c["rows_skipped"] else "")

    # ------------------------------------------------------------------- validation, checkpoints, stop
    def valid_row(self) -> dict:
        """One validation, timed."""
        t = time.perf_counter()
        row = self.run_validation()
        return {**row, "time_s": time.perf_counter() - t}

    def checkpoint(self, done: int) -> None:
        """A resumable checkpoint of step ``done`` (with what an exact resume needs), then the export."""
        state = {"position": self.position, "history": self.runlog.history if self.info.is_main else None,
                 "faults": dict(self.counts), "bad_run": self.bad_run, "skipped_rows": self.skipped_rows}
        with self.hooks.saving(done):
            save_checkpoint(self.engine, self.out_dir / "checkpoints", done, self.identity, state,
                            keep=self.cfg.keep_checkpoints)
        self.export(self.out_dir / "connector")

    def stop_if_asked(self, stop_asked: bool, busy: bool, saved: bool) -> None:
        """SIGTERM/SIGUSR1 on any rank: every rank checkpoints this step (unless just done) and raises Preempted.

        ``stop_asked`` came with the step's metrics; after a validation or checkpoint (``busy``) the ranks
        agree once more, since a signal may have arrived meanwhile."""
        step, max_steps = self.step, self.cfg.max_steps
        stop = stop_asked or (busy and all_max([1.0 if stop_requested() else 0.0])[0] > 0)
        if not stop or step >= max_steps:
            return
        if not saved:
            self.checkpoint(step)
        self.bar.close()
        self.runlog.close()
        names = ", ".join(sorted({signal.Signals(s).name for s in gather_objects(stop_requested()) if s}))
        raise Preempted(f"stopped by {names} after step {step} of {max_steps}: checkpoint "
                        f"{self.out_dir / 'checkpoints'}/step-{step:08d} saved; run the same command again to resume "
                        f"(exit status {EXIT_PREEMPTED})", step, names)

    # ------------------------------------------------------------------------------------------ the end
    def finish(self, frozen_start: str | None, wall_start: float) -> dict:
        """The final metrics (validating once more if a resumed run had already finished), written on rank 0."""
        runlog, info, engine, counts, step = self.runlog, self.info, self.engine, self.counts, self.step
        if not runlog.history["valid"] or runlog.history["valid"][-1]["step"] != step:
            runlog.add("valid", step, self.valid_row())  # a resumed run that had already finished
        final = runlog.history["valid"][-1]
        times = sorted(self.step_times)
        all_rows = [r for rows in gather_objects(self.skipped_rows) for r in rows]
        result = {
            "steps": step,
            "world_size": info.world_size,
            "final_valid": {k: v for k, v in final.items() if k != "step"},
            "final_train_loss": runlog.history["train"][-1]["loss"] if runlog.history["train"] else None,
            "step_time_s_median": times[len(times) // 2] if times else None,
            "step_time_s_mean": sum(times) / len(times) if times else None,
            "loop_wall_s": time.perf_counter() - wall_start,  # this process: steps + validation + checkpoints
            "train_losses": [r["loss"] for r in runlog.history["train"]],
            # faults survived (all runs of this out_dir): steps without an update for a non-finite loss/gradients,
            # batches skipped for running out of memory, rows skipped as unreadable (data.skip_bad)
            "nonfinite_steps": counts["nonfinite_steps"],
            "oom_batches": counts["oom_batches"],
            "rows_skipped": counts["rows_skipped"],
            "skipped_rows": all_rows,
            "optimizer_updates": counts["updates"],
            "ds_skipped_steps": engine.skipped_steps,
        }
        if engine.fp16:
            result.update(loss_scale=engine.loss_scale, loss_scale_skips=counts["loss_scale_skips"])
        if self.frozen_check is not None:
            frozen_end = self.frozen_check()
            result.update(frozen_sha256_start=frozen_start, frozen_sha256_end=frozen_end,
                          frozen_unchanged=frozen_start == frozen_end)
        if info.is_main:
            plot_curves(runlog.history, self.out_dir / "curves.png", self.title)
            atomic_write_text(self.out_dir / "metrics.json", json.dumps(result, indent=1))
            atomic_write_text(self.out_dir / "history.json", json.dumps(runlog.history))
        runlog.close()
        return result


def train_loop(engine: Engine, batches: Iterator[Batch], prep: BatchPrep, run_validation: Callable[[], dict],
               cfg: LoopConfig, out_dir: Path, identity: dict, export: Callable[[Path], None],
               start: dict | None = None, title: str = "training",
               frozen_check: Callable[[], str] | None = None,
               batch_limits: dict[str, int] | None = None, hooks: Sequence[TrainHooks] = ()) -> dict:
    """Train to ``cfg.max_steps`` with a :class:`Trainer` (arguments as there); returns the final metrics.

    Installs the fault drills that ``SPEECHLM_FAULT`` or ``loop.crash_after`` ask for
    (:func:`speechlm.training.faults.drill_hooks`: none when neither is set), then ``hooks``.
    """
    drills = drill_hooks(cfg.crash_after, engine.info.rank, engine.info.is_main)
    return Trainer(engine, batches, prep, run_validation, cfg, out_dir, identity, export, start=start, title=title,
                   frozen_check=frozen_check, batch_limits=batch_limits, hooks=[*drills, *hooks]).run()
