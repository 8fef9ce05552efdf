"""Stage 1: distil the connector's vectors onto the frozen LLM's embeddings of the transcript tokens.

    deepspeed --num_gpus 2 recipes/stage1_distill.py --config recipes/configs/stage1_tiny.yaml [key=value ...]
    python recipes/stage1_distill.py --config recipes/configs/stage1_tiny.yaml [key=value ...]

The LLM never runs: only its input-embedding table (the targets) is read, from the safetensors
themselves when it can be (no full model load). Writes to ``out_dir``:
checkpoints/ (resumable), connector/ (the exported connector folder), metrics.json, history.json,
curves.png, tensorboard/, config.yaml; with ``model.encoder_adapt.method=adapter|lora|prompt`` the encoder runs on
the fly inside the trained module and its adaptation trains too, exported as encoder_adapt/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from speechlm.config import load_config, save_config
from speechlm.training import build
from speechlm.training.configs import Stage1Config
from speechlm.training.engine import (
    build_engine,
    export_encoder_adapt,
    export_module,
    frozen_fingerprint,
    init_distributed,
    load_checkpoint,
    run_main,
    seed_everything,
    set_threads,
    train_dtype,
)
from speechlm.training.loop import BatchPrep, install_stop_handlers, train_loop, validate
from speechlm.training.stages import Stage1Distill, TokenEmbedding


def batch_limits(data) -> dict[str, int]:
    """The config keys that bound a batch's size (quoted when one runs out of memory)."""
    return {"data.max_frames": data.max_frames, "data.max_tokens": data.max_tokens, "data.max_batch": data.max_batch}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher; ignored")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    install_stop_handlers()  # SIGTERM/SIGUSR1: checkpoint at the end of the step, exit 75 (before any worker forks)
    cfg = load_config(Stage1Config, args.config, args.overrides)

    info = init_distributed()
    set_threads(cfg.engine.threads, info)
    seed_everything(cfg.seed, 0)  # same initial weights on every rank
    out_dir = Path(cfg.out_dir)
    if info.is_main:
        save_config(cfg, out_dir / "config.yaml")

    # Models: the embedding table of the frozen LLM (targets), the encoder only if features are not cached.
    adapt = build.encoder_adapt_config(cfg.model, cfg.data, cfg.engine)  # None: the frozen encoder (default)
    llm, tokenizer = build.load_llm_embeddings(cfg.model.llm)  # config + input-embedding table only
    encoder = None if cfg.data.feature_cache else build.load_encoder(cfg.model, train_dtype(cfg.engine))
    enc = build.encoder_facts(cfg.model, cfg.data, encoder)
    connector = build.make_connector(cfg.model, enc, llm)
    embedding = TokenEmbedding(llm.get_input_embeddings().weight)
    del llm
    # An adapted encoder runs inside the module: its adaptation reaches the optimizer and the checkpoints
    model = Stage1Distill(connector, embedding, cfg.mse_weight, cfg.cosine_weight,
                          encoder=encoder if adapt is not None else None)

    engine = build_engine(model, cfg.engine, cfg.loop.max_steps, info)
    identity = build.run_identity("stage1", connector, cfg.data, **build.adapt_identity(cfg.model, adapt))
    start = load_checkpoint(engine, out_dir / "checkpoints", identity) if cfg.loop.resume else None
    if start is None:  # a resumed run has restored every rank's RNG instead
        seed_everything(cfg.seed, info.rank)

    # Data
    if encoder is not None:
        encoder.to(engine.device)
    prep = BatchPrep(engine.device, next(model.connector.parameters()).dtype, encoder,
                     encode_in_module=adapt is not None)
    reader = build.make_reader(cfg.data, enc, tokenizer)
    valid_reader = build.make_reader(cfg.data, enc, tokenizer, valid=True)
    train = build.train_batches(cfg.data, reader, info, cfg.seed, tuple(start["position"]) if start else (0, 0))
    valid = build.valid_batches(cfg.data, valid_reader, info)

    def export(folder: Path) -> None:
        export_module(engine, connector, folder)
        if adapt is not None:  # the encoder's adaptation next to the connector: <out_dir>/encoder_adapt
            export_encoder_adapt(engine, encoder, folder.parent / "encoder_adapt")

    # adapted: the frozen encoder weights inside the module are checked as well as the embedding table
    frozen = model if adapt is not None else embedding
    result = train_loop(engine, train, prep, lambda: validate(engine, valid(), prep), cfg.loop, out_dir, identity,
                        export=export, start=start,
                        frozen_check=lambda: frozen_fingerprint(frozen, engine), title="stage 1: distillation",
                        batch_limits=batch_limits(cfg.data))
    if info.is_main:
        print(json.dumps({"stage1": result["final_valid"], "step_time_s": result["step_time_s_median"]}, indent=1))
    return result


if __name__ == "__main__":
    run_main(main)
