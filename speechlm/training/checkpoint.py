"""Resumable training checkpoints: written atomically by every rank, checked (identity, sizes, sha256) and
loaded safely (:mod:`speechlm.training.safe_load`) for an exact resume.

Checkpoint layout (``ckpt_dir``)::

    step-00000100/   DeepSpeed's files (trainable parameters + optimizer + LR schedule only),
                     trainer_state_rank{r}.pt (step, data position, RNG states of that rank),
                     meta.json (identity of the run + size and sha256 of every file), written last
    latest           name of the newest COMPLETE checkpoint, replaced atomically after meta.json

A checkpoint is written into ``.step-00000100.tmp/`` and renamed to ``step-00000100/`` once every rank's
files (checked by name: :func:`missing_files`) and meta.json are there; ``latest`` is replaced last. A failed
write (a full disk, an I/O error on any rank, a rank's file gone) is agreed on by all ranks, removes the temporary
folder and raises :class:`CheckpointWriteError` on every rank naming the folder, the space the checkpoint needs
and the space free: the previous checkpoint and ``latest`` are left as they were, so a restart resumes from there.
Weights that are not finite are never saved or exported (:class:`NonFiniteError` instead)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from speechlm.atomic import atomic_write_text
from speechlm.errors import CheckpointError, CheckpointWriteError, SpeechLMError
from speechlm.training.deepspeed_engine import Engine, check_finite_weights, trainable_shapes
from speechlm.training.distributed import agree_failures, barrier, rng_state, set_rng_state
from speechlm.training.safe_load import safe_torch_load, unsafe_object_error

CKPT_FORMAT = "speechlm-train-checkpoint-1"


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())  # on disk before meta.json calls the checkpoint complete
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def missing_files(names: Iterable[str], world_size: int, zero_stage: int) -> list[str]:
    """What a checkpoint of ``world_size`` ranks under ZeRO-``zero_stage`` lacks among its files ``names``: every
    rank's trainer state and DeepSpeed's files (the module states, one per rank under ZeRO-3; each rank's optimizer
    partition under ZeRO-1 to 3), as name patterns (DeepSpeed prefixes some with its precision)."""
    names = list(names)
    ranks = range(world_size)
    want = [f"trainer_state_rank{r}.pt" for r in ranks]
    if zero_stage == 3:
        want += [f"zero_pp_rank_{r}_mp_rank_*_model_states.pt" for r in ranks]
    else:
        want.append("mp_rank_*_model_states.pt")
    if zero_stage >= 1:
        want += [f"*zero_pp_rank_{r}_mp_rank_*_optim_states.pt" for r in ranks]
    return [w for w in want if not fnmatch.filter(names, w)]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None when there is none yet."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    path = ckpt_dir / tag
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{pointer} names {tag!r} but {path} is not a complete checkpoint")
    return path


def checkpoint_bytes(path: str | Path) -> int:
    """Size of a complete checkpoint folder, from its meta.json."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    return sum(int(f["size"]) for f in meta["files"].values()) + (Path(path) / "meta.json").stat().st_size


def estimate_checkpoint_bytes(engine: Engine, ckpt_dir: str | Path) -> int:
    """Bytes the next checkpoint will take: the size of the latest one, else trainable parameters x (their
    own size + fp32 master copy + two Adam moments)."""
    with contextlib.suppress(CheckpointError, OSError, ValueError, KeyError):
        latest = latest_checkpoint(ckpt_dir)
        if latest is not None:
            return checkpoint_bytes(latest)
    total = 0
    for p in engine.module.parameters():
        if p.requires_grad:
            n = int(getattr(p, "ds_numel", p.numel()))
            total += n * (p.element_size() + 12)
    return total


def space_text(folder: Path, needed: int | None = None) -> str:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:,.1f} MiB free on the filesystem of {probe}"
    except OSError as e:
        free = f"free space of {probe} unknown ({e})"
    return (f"the checkpoint needs ~{needed / 2**20:,.1f} MiB, " if needed is not None else "") + free


def save_checkpoint(engine: Engine, ckpt_dir: str | Path, step: int, identity: dict, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Save a resumable checkpoint (all ranks call this); it becomes ``latest`` only once complete.

    Written into ``.step-N.tmp`` and renamed when every rank's files and meta.json are there. Any rank's
    failure (a full disk: also refused up front when the filesystem has less free space than the last
    checkpoint took) raises :class:`CheckpointWriteError` on every rank; the previous checkpoint and
    ``latest`` stay as they were.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = f"step-{step:08d}"
    path = ckpt_dir / tag
    tmp = ckpt_dir / f".{tag}.tmp"
    check_finite_weights(engine, f"checkpoint {path}")
    needed = estimate_checkpoint_bytes(engine, ckpt_dir)
    previous = None
    with contextlib.suppress(CheckpointError, OSError):
        previous = latest_checkpoint(ckpt_dir)

    def fail(failures: list[str], err: BaseException | None) -> None:
        if engine.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        kept = (f"the previous checkpoint {previous} is untouched and `latest` still names it: a restart "
                "resumes from there" if previous is not None else "there is no earlier checkpoint")
        raise CheckpointWriteError(f"{path}: writing the checkpoint failed ({'; '.join(failures)}); "
                                   f"{space_text(ckpt_dir, needed)}; {kept}") from err

    err: BaseException | None = None
    if engine.info.is_main:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in ckpt_dir.glob(".step-*.tmp"):  # temporaries of a killed or failed save
                shutil.rmtree(stale, ignore_errors=True)
            free = shutil.disk_usage(ckpt_dir).free
            if free < needed:
                raise OSError(errno.ENOSPC, f"not enough free space: {free / 2**20:,.1f} MiB free, "
                              f"~{needed / 2**20:,.1f} MiB needed", str(ckpt_dir))
            tmp.mkdir()
        except OSError as e:
            err = e
    failures = agree_failures(engine.info.rank, err)
    if failures:
        fail(failures, err)

    try:
        engine.ds.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"step": step}, save_latest=False,
                                  exclude_frozen_parameters=True)
    except Exception as e:  # noqa: BLE001 -- torch.save raises RuntimeError on a failed write, not only OSError
        err = e
        # DeepSpeed's save ends in a barrier that the ranks whose writes worked are waiting in: join it, then agree
        barrier()
    if err is None:
        state = {"step": step, "rank": engine.info.rank, "rng": rng_state(), **trainer_state}
        try:
            torch.save(state, tmp / f"trainer_state_rank{engine.info.rank}.pt")
        except Exception as e:  # noqa: BLE001
            err = e
    failures = agree_failures(engine.info.rank, err)
    if failures:
        fail(failures, err)

    if engine.info.is_main:
        try:
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            lacking = missing_files(files, engine.info.world_size, engine.ds.zero_optimization_stage())
            if lacking:  # a rank's write vanished (the folder removed under it): never call this complete
                raise CheckpointError(f"incomplete: no {', '.join(lacking)} in {tmp}")
            meta = {"format": CKPT_FORMAT, "step": step, "world_size": engine.info.world_size,
                    "zero_stage": engine.ds.zero_optimization_stage(), "identity": identity,
                    "trainable": trainable_shapes(engine.module), "files": files}
            atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
            _fsync_dir(tmp)
            old = ckpt_dir / f".{tag}.old"
            if path.exists():  # an earlier save of this step (another run into the same out_dir)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(ckpt_dir)
            atomic_write_text(ckpt_dir / "latest", tag + "\n")
            shutil.rmtree(old, ignore_errors=True)
            complete = sorted(p for p in ckpt_dir.glob("step-*") if (p / "meta.json").is_file())
            for stale in complete[:-keep] if keep > 0 else []:
                if stale != path:
                    shutil.rmtree(stale, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            err = e
            old = ckpt_dir / f".{tag}.old"
            if not path.exists() and old.exists():
                with contextlib.suppress(OSError):
                    os.replace(old, path)  # put back what was there
    failures = agree_failures(engine.info.rank, err)
    if failures:
        fail(failures, err)
    return path


def _with_new_defaults(identity: dict) -> dict:
    """A saved run identity with connector-config fields added since it was written set to their defaults, and an
    encoder adaptation in its per-method form, so a checkpoint from before either change still resumes."""
    from speechlm.models.connectors.base import connector_config_from_dict
    from speechlm.models.encoder_adapt_config import adapt_config_from_dict

    out = dict(identity)
    cfg = identity.get("connector")
    if isinstance(cfg, dict) and "name" in cfg:
        try:
            out["connector"] = dataclasses.asdict(connector_config_from_dict(cfg))
        except SpeechLMError:  # a field this code does not know: reported as a mismatch below
            pass
    adapt = identity.get("encoder_adapt")
    if isinstance(adapt, dict):  # checkpoints from before the per-method configs hold every method's fields
        try:
            out["encoder_adapt"] = dataclasses.asdict(adapt_config_from_dict(adapt, strict=False))
        except SpeechLMError:
            pass
    return out


def _check_meta(path: Path, engine: Engine, identity: dict) -> dict:
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{meta_path}: not a {CKPT_FORMAT} checkpoint")
    for name, f in meta["files"].items():
        p = path / name
        if not p.is_file() or p.stat().st_size != f["size"] or _sha256(p) != f["sha256"]:
            raise CheckpointError(f"{p}: checkpoint file missing or corrupt (size/sha256 differ from {meta_path})")
    lacking = missing_files(meta["files"], meta["world_size"], meta["zero_stage"])
    if lacking:
        raise CheckpointError(f"{path}: incomplete checkpoint, no {', '.join(lacking)} (remove it to resume from an "
                              "earlier one, or use another out_dir or loop.resume=false)")
    problems = []
    if meta["world_size"] != engine.info.world_size:
        problems.append(f"saved with {meta['world_size']} ranks, resuming with {engine.info.world_size} "
                        "(exact resume needs the same number)")
    if meta["zero_stage"] != engine.ds.zero_optimization_stage():
        problems.append(f"saved under ZeRO-{meta['zero_stage']}, resuming under "
                        f"ZeRO-{engine.ds.zero_optimization_stage()}")
    saved = _with_new_defaults(meta["identity"])
    for k in sorted(set(saved) | set(identity)):
        if saved.get(k) != identity.get(k):
            problems.append(f"{k}: checkpoint has {saved.get(k)!r}, this run {identity.get(k)!r}")
    mine = trainable_shapes(engine.module)
    if meta["trainable"] != mine:
        diff = sorted(k for k in set(meta["trainable"]) | set(mine) if meta["trainable"].get(k) != mine.get(k))
        problems.append(f"trainable parameters differ ({len(diff)}: {', '.join(diff[:5])})")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match this run (use another out_dir or "
                              "loop.resume=false): " + "; ".join(problems))
    return meta


def load_checkpoint(engine: Engine, ckpt_dir: str | Path, identity: dict, path: str | Path | None = None
                    ) -> dict | None:
    """Restore the newest complete checkpoint (or ``path``): weights, optimizer, schedule, RNG.

    Returns this rank's trainer state (``step``, data position ...) or None when there is nothing
    to resume. A corrupt, incomplete or mismatched checkpoint raises :class:`CheckpointError`.
    """
    path = Path(path) if path is not None else latest_checkpoint(ckpt_dir)
    if path is None:
        return None
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
    _check_meta(path, engine, identity)
    try:
        with safe_torch_load():
            load_path, _ = engine.ds.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    except pickle.UnpicklingError as e:
        raise unsafe_object_error(path, e) from None
    except Exception as e:  # noqa: BLE001 -- DeepSpeed raises assertion/pickle/runtime errors on bad files
        raise CheckpointError(f"{path}: DeepSpeed could not load the checkpoint ({type(e).__name__}: {e})") from None
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load")
    state_path = path / f"trainer_state_rank{engine.info.rank}.pt"
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise unsafe_object_error(state_path, e) from None
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types on a damaged file
        raise CheckpointError(f"{state_path}: unreadable trainer state ({e})") from None
    set_rng_state(state["rng"])
    return state
