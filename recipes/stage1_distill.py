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

from speechlm.config import load_config
from speechlm.training.configs import Stage1Config
from speechlm.training.engine import run_main
from speechlm.training.loop import install_stop_handlers
from speechlm.training.stage_runs import run_stage1, stage_arguments


def main(argv: list[str] | None = None) -> dict:
    args = stage_arguments(argv, __doc__)
    install_stop_handlers()  # SIGTERM/SIGUSR1: checkpoint at the end of the step, exit 75 (before any worker forks)
    return run_stage1(load_config(Stage1Config, args.config, args.overrides))


if __name__ == "__main__":
    run_main(main)
