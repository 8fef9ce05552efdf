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

from speechlm.training.configs import Stage1Config
from speechlm.training.engine import run_main
from speechlm.training.recipe_main import stage_main
from speechlm.training.stage_runs import run_stage1


def main(argv: list[str] | None = None) -> dict:
    return stage_main(Stage1Config, run_stage1, argv, __doc__)


if __name__ == "__main__":
    run_main(main)
