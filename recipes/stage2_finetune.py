"""Stage 2: next-token prediction, speech in / text out, through the frozen (or LoRA-adapted) LLM.

    deepspeed --num_gpus 2 recipes/stage2_finetune.py --config recipes/configs/stage2_tiny.yaml \
        model.init_connector=runs/tiny/stage1/connector [key=value ...]
    python recipes/stage2_finetune.py --config ... [key=value ...]

Variants (``variant=``): frozen (connector only, default), lora (+ LoRA on the LLM), multitask (LoRA +
text-only LM batches from ``text_corpus`` on a ``text_ratio`` of the steps). ``model.encoder_adapt`` /
``model.init_encoder_adapt=<stage1>/encoder_adapt`` adapt the encoder (run on the fly, trained with the connector,
exported as encoder_adapt/). ``distill_weight`` mixes
the stage-1 loss in (SSR only). The baseline connectors (``model.connector.name=stack|conv|qformer``, no
``init_connector``, ``distill_weight=0``) have no vector per token: they train with the clip's vectors as a
prefix of its transcript, every transcript token a target. Validation reports the speech loss, the same LLM's loss on the transcripts as
text, and the leakage check (speech loss with each token's future audio cut away, minus the plain one).

The supervised mid-training stage (recipes/stage_mid_supervised.py) is this recipe with ``objective=supervised``
(task prompt + speech -> transcript or translation); stage 2 then starts from its connector
(``model.init_connector=<mid>/connector``) and, when it trained one, its LoRA (``model.init_lora=<mid>/lora``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from speechlm.config import load_config, save_config
from speechlm.data.batching import TextBatches
from speechlm.data.tasks import SupervisedTasks
from speechlm.errors import ConfigError
from speechlm.models.connectors.base import load_connector
from speechlm.models.speechlm import SpeechLM
from speechlm.training import build
from speechlm.training.configs import Stage2Config
from speechlm.training.engine import (
    build_engine,
    export_encoder_adapt,
    export_lora,
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
from speechlm.training.stages import OBJECTIVES, Stage2Finetune


def main(argv: list[str] | None = None, config_class: type = Stage2Config, stage: str = "stage2",
         description: str = "") -> dict:
    """Train; ``config_class``/``stage`` name the stage (the mid-training recipe passes its own)."""
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher; ignored")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    install_stop_handlers()  # SIGTERM/SIGUSR1: checkpoint at the end of the step, exit 75 (before any worker forks)
    cfg = load_config(config_class, args.config, args.overrides)
    if cfg.variant not in ("frozen", "lora", "multitask"):
        raise ConfigError(f"variant must be frozen, lora or multitask, not {cfg.variant!r}")
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, not {cfg.objective!r}")

    info = init_distributed()
    set_threads(cfg.engine.threads, info)
    seed_everything(cfg.seed, 0)
    out_dir = Path(cfg.out_dir)
    if info.is_main:
        save_config(cfg, out_dir / "config.yaml")

    # Models: frozen LLM + connector (from stage 1); the encoder when features are not cached or for leakage.
    # The LLM is read straight into the training precision (bf16 on GPUs): no ranks x fp32 copies in host RAM.
    adapt = build.encoder_adapt_config(cfg.model, cfg.data, cfg.engine)  # None: the frozen encoder (default)
    dtype = train_dtype(cfg.engine)
    llm, tokenizer = build.load_llm(cfg.model.llm, dtype)
    need_encoder = not cfg.data.feature_cache or cfg.leakage_utts > 0
    encoder = build.load_encoder(cfg.model, dtype) if need_encoder else None
    enc = build.encoder_facts(cfg.model, cfg.data, encoder)
    if cfg.model.init_connector:
        connector = load_connector(cfg.model.init_connector, llm=llm)
    else:
        connector = build.make_connector(cfg.model, enc, llm)
    # An adapted encoder runs inside the module (its adaptation trains); the frozen one stays outside, as before
    speechlm = SpeechLM(connector, llm, tokenizer=tokenizer, encoder=encoder if adapt is not None else None,
                        gradient_checkpointing=cfg.model.gradient_checkpointing)
    train_lora = cfg.variant in ("lora", "multitask")
    if cfg.model.init_lora:  # e.g. the mid-training stage's adapter: go on training it, or keep it frozen
        speechlm.load_lora(cfg.model.init_lora, trainable=train_lora)
    elif train_lora:
        speechlm.apply_lora(cfg.lora.r, cfg.lora.alpha, tuple(cfg.lora.targets), cfg.lora.dropout)
    bos = tokenizer.bos_token_id if cfg.bos else None
    model = Stage2Finetune(speechlm, bos, cfg.distill_weight, cfg.mse_weight, cfg.cosine_weight, cfg.text_weight,
                           objective=cfg.objective)

    engine = build_engine(model, cfg.engine, cfg.loop.max_steps, info)  # frozen LLM: no optimizer state
    extra = {"objective": cfg.objective, "supervised": vars(cfg.supervised)} if cfg.objective != "ntp" else {}
    if cfg.model.init_lora:
        extra["init_lora"] = str(cfg.model.init_lora)
    extra.update(build.adapt_identity(cfg.model, adapt))
    identity = build.run_identity(stage, connector, cfg.data, variant=cfg.variant, lora=vars(cfg.lora) if
                                  cfg.variant != "frozen" else None, **extra)
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
    reader = build.make_reader(cfg.data, enc, tokenizer, need_boundaries=need_bnd, tasks=tasks)
    valid_reader = build.make_reader(cfg.data, enc, tokenizer, valid=True, need_boundaries=need_bnd, tasks=tasks)
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
                        batch_limits={"data.max_frames": cfg.data.max_frames, "data.max_tokens": cfg.data.max_tokens,
                                      "data.max_batch": cfg.data.max_batch})
    if info.is_main:
        print(json.dumps({stage: result["final_valid"], "step_time_s": result["step_time_s_median"]}, indent=1))
    return result


if __name__ == "__main__":
    run_main(main)
