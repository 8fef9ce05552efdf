"""Supervised mid-training: task prompt + speech -> transcript (or translation), between stage 1 and stage 2.

    deepspeed --num_gpus 2 recipes/stage_mid_supervised.py --config recipes/configs/stage_mid_tiny.yaml \
        model.init_connector=runs/tiny/stage1/connector [key=value ...]
    python recipes/stage_mid_supervised.py --config ... [key=value ...]

After Jain et al. (2024), multi-stage multi-modal pre-training: a supervised step between unsupervised
pre-training and fine-tuning. Each training row becomes ``[BOS] prompt-before [speech vectors] prompt-after
answer<EOS>`` with only the answer scored: its transcript under ``supervised.transcribe_prompt``, or, on rows
whose manifest has a ``translation`` (with an optional ``translation_lang``), its translation under
``supervised.translate_prompt`` on a ``supervised.translate_ratio`` of the epochs. It is stage 2's recipe with
``objective=supervised`` (recipes/stage2_finetune.py: the same variants, DeepSpeed ZeRO stages, checkpoints and
exact resume, stage-1 loss mixing); it writes the same outputs. Stage 2 then continues from
``model.init_connector=<out_dir>/connector`` (and ``model.init_lora=<out_dir>/lora`` after ``variant=lora``).
"""

from __future__ import annotations

from speechlm.training.configs import StageMidConfig
from speechlm.training.engine import run_main
from speechlm.training.recipe_main import stage_main
from speechlm.training.stage_runs import run_stage2


def main(argv: list[str] | None = None) -> dict:
    return stage_main(StageMidConfig, run_stage2, argv, __doc__, stage="mid")


if __name__ == "__main__":
    run_main(main)
