"""One stage run from its checked config: distributed set-up, the stage module (factory), data, the loop with
its export, validation and frozen-weights check; what recipes/stage1_distill.py, stage2_finetune.py and
stage_mid_supervised.py run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speechlm.config import save_config
from speechlm.data.batching import TextBatches
from speechlm.data.tasks import SupervisedTasks
from speechlm.errors import ConfigError
from speechlm.training import build
from speechlm.training.checkpoint import load_checkpoint
from speechlm.training.configs import DataConfig, Stage1Config, Stage2Config
from speechlm.training.deepspeed_engine import build_engine, frozen_fingerprint
from speechlm.training.distributed import init_distributed, seed_everything, set_threads
from speechlm.training.export import export_encoder_adapt, export_lora, export_module
from speechlm.training.factory import StageParts, build_stage1, build_stage2, check_stage2
from speechlm.training.loop import BatchPrep, train_loop, validate


def stage_arguments(argv: list[str] | None, doc: str) -> argparse.Namespace:
    """A stage recipe's command line: ``--config`` and ``key=value`` overrides (``--local_rank`` from the deepspeed
    launcher is accepted and ignored); ``doc``: the recipe's docstring, whose first line describes it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher; ignored")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def batch_limits(data: DataConfig) -> dict[str, int]:
    """The config keys that bound a batch's size (quoted when one runs out of memory)."""
    return {"data.max_frames": data.max_frames, "data.max_tokens": data.max_tokens, "data.max_batch": data.max_batch}


def run_stage1(cfg: Stage1Config) -> dict:
    """Stage 1: distil the connector's vectors onto the frozen LLM's embeddings; returns train_loop's result."""
    info = init_distributed()
    set_threads(cfg.engine.threads, info)
    seed_everything(cfg.seed, 0)  # same initial weights on every rank
    out_dir = Path(cfg.out_dir)
    if info.is_main:
        save_config(cfg, out_dir / "config.yaml")

    parts = build_stage1(cfg)
    model, connector, encoder, adapt, enc = parts.model, parts.connector, parts.encoder, parts.adapt, parts.enc
    engine = build_engine(model, cfg.engine, cfg.loop.max_steps, info)
    identity = build.run_identity("stage1", connector, cfg.data, **build.adapt_identity(cfg.model, adapt))
    start = load_checkpoint(engine, out_dir / "checkpoints", identity) if cfg.loop.resume else None
    if start is None:  # a resumed run has restored every rank's RNG instead
        seed_everything(cfg.seed, info.rank)

    if encoder is not None:
        encoder.to(engine.device)
    prep = BatchPrep(engine.device, next(model.connector.parameters()).dtype, encoder,
                     encode_in_module=adapt is not None)
    reader = build.make_reader(cfg.data, enc, parts.tokenizer)
    valid_reader = build.make_reader(cfg.data, enc, parts.tokenizer, valid=True)
    train = build.train_batches(cfg.data, reader, info, cfg.seed, tuple(start["position"]) if start else (0, 0))
    valid = build.valid_batches(cfg.data, valid_reader, info)

    def export(folder: Path) -> None:
        export_module(engine, connector, folder)
        if adapt is not None:  # the encoder's adaptation next to the connector: <out_dir>/encoder_adapt
            export_encoder_adapt(engine, encoder, folder.parent / "encoder_adapt")

    # adapted: the frozen encoder weights inside the module are checked as well as the embedding table
    frozen = model if adapt is not None else parts.embedding
    result = train_loop(engine, train, prep, lambda: validate(engine, valid(), prep), cfg.loop, out_dir, identity,
                        export=export, start=start,
                        frozen_check=lambda: frozen_fingerprint(frozen, engine), title="stage 1: distillation",
                        batch_limits=batch_limits(cfg.data))
    if info.is_main:
        print(json.dumps({"stage1": result["final_valid"], "step_time_s": result["step_time_s_median"]}, indent=1))
    return result


def stage2_identity(cfg: Stage2Config, stage: str, parts: StageParts) -> dict:
    """What a stage-2 (or mid-training) checkpoint must match to be resumed."""
    extra = {"objective": cfg.objective, "supervised": vars(cfg.supervised)} if cfg.objective != "ntp" else {}
    if cfg.model.init_lora:
        extra["init_lora"] = str(cfg.model.init_lora)
    extra.update(build.adapt_identity(cfg.model, parts.adapt))
    return build.run_identity(stage, parts.connector, cfg.data, variant=cfg.variant, lora=vars(cfg.lora) if
                              cfg.variant != "frozen" else None, **extra)


def run_stage2(cfg: Stage2Config, stage: str = "stage2") -> dict:
    """Stage 2 (or, with ``objective=supervised``, the mid-training stage: ``stage="mid"``): next-token prediction
    through the frozen (or LoRA-adapted) LLM; returns train_loop's result."""
    check_stage2(cfg)
    info = init_distributed()
    set_threads(cfg.engine.threads, info)
    seed_everything(cfg.seed, 0)
    out_dir = Path(cfg.out_dir)
    if info.is_main:
        save_config(cfg, out_dir / "config.yaml")

    parts = build_stage2(cfg)
    model, connector, speechlm, encoder, adapt = parts.model, parts.connector, parts.speechlm, parts.encoder, parts.adapt
    tokenizer = parts.tokenizer
    engine = build_engine(model, cfg.engine, cfg.loop.max_steps, info)  # frozen LLM: no optimizer state
    identity = stage2_identity(cfg, stage, parts)
    start = load_checkpoint(engine, out_dir / "checkpoints", identity) if cfg.loop.resume else None
    if start is None:  # a resumed run has restored every rank's RNG instead
        seed_everything(cfg.seed, info.rank)

    # Data (+ text-only batches for multitask)
    if encoder is not None:
        encoder.to(engine.device)
    text = None
    if cfg.variant == "multitask":
        if not cfg.text_corpus:
            raise ConfigError("variant=multitask needs text_corpus (a text file or .jsonl manifest)")
        text = TextBatches.from_file(cfg.text_corpus, tokenizer, max_tokens=cfg.text_max_tokens, seed=cfg.seed,
                                     rank=info.rank)
    need_bnd = connector.uses_boundaries
    dtype = next(connector.parameters()).dtype
    prep = BatchPrep(engine.device, dtype, encoder, text, cfg.text_ratio, cfg.seed, encode_in_module=adapt is not None)
    tasks = None
    if cfg.objective == "supervised":
        sup = cfg.supervised
        tasks = SupervisedTasks(tokenizer, sup.transcribe_prompt, sup.translate_prompt, sup.language,
                                sup.translate_ratio, cfg.seed)
    reader = build.make_reader(cfg.data, parts.enc, tokenizer, need_boundaries=need_bnd, tasks=tasks)
    valid_reader = build.make_reader(cfg.data, parts.enc, tokenizer, valid=True, need_boundaries=need_bnd, tasks=tasks)
    train = build.train_batches(cfg.data, reader, info, cfg.seed, tuple(start["position"]) if start else (0, 0))
    valid = build.valid_batches(cfg.data, valid_reader, info)
    leak_utts = (build.read_split(cfg.data.valid_manifest or cfg.data.train_manifest, cfg.data.valid_split,
                                  cfg.leakage_utts) if cfg.leakage_utts > 0 and need_bnd else [])

    def run_validation() -> dict:
        out = validate(engine, valid(), prep)
        if leak_utts:
            out.update(build.leakage_check(engine, model, encoder, leak_utts, valid_reader))
        return out

    def export(folder: Path) -> None:
        export_module(engine, connector, folder)
        if speechlm.lora:  # the adapter of the LLM next to the connector: <out_dir>/lora
            export_lora(engine, speechlm.llm, folder.parent / "lora")
        if adapt is not None:  # the encoder's adaptation: <out_dir>/encoder_adapt
            export_encoder_adapt(engine, encoder, folder.parent / "encoder_adapt")

    def frozen_check() -> str:
        llm_sha = frozen_fingerprint(speechlm.llm, engine)
        return llm_sha if adapt is None else llm_sha + "+" + frozen_fingerprint(encoder.model, engine)

    result = train_loop(engine, train, prep, run_validation, cfg.loop, out_dir, identity, export=export, start=start,
                        frozen_check=frozen_check,
                        title=(f"mid-training: supervised tasks ({cfg.variant})" if cfg.objective == "supervised"
                               else f"stage 2: next-token ({cfg.variant})"),
                        batch_limits=batch_limits(cfg.data))
    if info.is_main:
        print(json.dumps({stage: result["final_valid"], "step_time_s": result["step_time_s_median"]}, indent=1))
    return result
