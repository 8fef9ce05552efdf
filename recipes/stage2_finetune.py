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

from speechlm.training.configs import Stage2Config
from speechlm.training.engine import run_main
from speechlm.training.recipe_main import stage_main
from speechlm.training.stage_runs import run_stage2


def main(argv: list[str] | None = None) -> dict:
    return stage_main(Stage2Config, run_stage2, argv, __doc__)


if __name__ == "__main__":
    run_main(main)
