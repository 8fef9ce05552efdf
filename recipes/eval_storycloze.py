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

import argparse
import logging

from speechlm.config import load_config
from speechlm.eval.run_storycloze import StoryClozeEvalConfig, run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(StoryClozeEvalConfig, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run(cfg)


if __name__ == "__main__":
    main()
