"""Speech-MMLU: text MMLU of the LLM alone and spoken-question accuracy per connector, 0/5-shot, letter and cloze.

    python recipes/eval_speech_mmlu.py [--config file.yaml] [key=value ...]
    python recipes/eval_speech_mmlu.py text_only=true                       # the LLM alone, embedded set
    python recipes/eval_speech_mmlu.py connectors=[runs/tiny/stage2/connector] aligner=runs/tiny/aligner
    python recipes/eval_speech_mmlu.py build_only=true out_dir=runs/speech_mmlu   # render the CSVs to audio

``data`` is an MMLU-format folder (``test/<subject>_test.csv``, ``dev/<subject>_dev.csv``; default: the
embedded mini set). Questions are spoken with TTS in the held-out ``voices`` at run time, or read
from ``speech`` (a folder written by ``build_only=true``, or any folder of ``<split>/<subject>.jsonl``
rows in that format). The text accuracy of the same LLM on the same items is the forgetting check:
with a frozen LLM it is identical to the LLM alone.

With ``speech``, the spoken set carries its own texts: its subjects (or ``subjects``) are evaluated,
the text condition reads each spoken subject's own question/options/answer, so a spoken set of your
own needs no CSV. A listed subject the spoken set lacks is taken from ``data`` and spoken at run
time; one missing from both is an error naming it. k-shot exemplars come from ``data``'s
``dev/<subject>_dev.csv``, else from the spoken set's ``dev/<subject>.jsonl`` texts; a subject with
too few is an error (or use ``shots=[0]``).

Every accuracy over spoken items (speech and cascade, and text on the same items) is also reported
per TTS engine of the item's voice (:func:`speechlm.data.tts.engine_of`), over all subjects:
``by_engine`` in the JSON report, a second markdown table, and ``speech_mmlu.by_engine`` in the summary
(``{engine: {n, text_acc, speech_acc_<k>shot, cascade_acc_<k>shot}}``, headline method, first connector).

``other_question=true`` adds the control for what the question's content adds: each connector again with every
item's options after another item's spoken question (``speech_other_<k>shot`` rows; in the summary
``speech_other_acc_<k>shot``, its gain over no question and ``speech_<k>shot_vs_speech_other``, paired on the same
items), and its written twin, the LLM alone with each item's options after another item's question text
(``text_other_<k>shot``; ``text_other_acc`` and ``text_other_vs_noquestion``): how much any question, not this one,
lifts the options. Every question and option is embedded once per connector, whatever the methods, shots and
control.

The run: speechlm/eval/run_speech_mmlu.py (config fields shared by all three: speechlm/eval/config.py).
"""

from __future__ import annotations

from speechlm.eval.recipe_main import run_recipe
from speechlm.eval.run_speech_mmlu import SpeechMMLUEvalConfig, run


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(SpeechMMLUEvalConfig, run, argv, __doc__)


if __name__ == "__main__":
    main()
