"""Spoken StoryCloze: text / S->T / S accuracy of the LLM alone and of each connector, JSON + markdown report.

    python recipes/eval_storycloze.py [--config file.yaml] [key=value ...]
    python recipes/eval_storycloze.py connectors=[runs/tiny/stage2/connector] aligner=runs/tiny/aligner
    python recipes/eval_storycloze.py text_only=true            # the LLM alone on the embedded set

Data: ``data`` (a StoryCloze JSONL: ours, or a spoken manifest with audio paths; default the embedded
210-story set, rendered with eSpeak in the held-out ``voices``), evaluated with adversarial and/or
random wrong endings (``wrong_styles``); ``release`` (a TWIST sStoryCloze/tStoryCloze folder) adds the
whole-story S condition. Boundaries come from the aligner in ``boundaries=free`` mode (default) or
``forced`` (labelled in every row). ``cascade=true`` adds Whisper -> transcript -> LLM.

Every spoken figure (S->T, S, speech and cascade, and the text condition on the same stories) is also
reported per TTS engine of the story's voice (``voices[i % n]``, or a spoken manifest's ``speaker``;
see :func:`speechlm.data.tts.engine_of`): ``by_engine`` in the JSON report, a second markdown table,
and ``storycloze.by_engine`` in the summary (``{engine: {n, text_acc, s2t_acc, s_acc, cascade_s2t_acc,
cascade_s_acc}}``, first wrong-ending style, headline scoring, first connector).

The run: speechlm/eval/run_storycloze.py (config fields shared by all three: speechlm/eval/config.py).
"""

from __future__ import annotations

from speechlm.eval.recipe_main import run_recipe
from speechlm.eval.run_storycloze import StoryClozeEvalConfig, run


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(StoryClozeEvalConfig, run, argv, __doc__)


if __name__ == "__main__":
    main()
