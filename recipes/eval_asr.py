"""Zero-shot ASR: greedy read-out of connector vectors through the frozen LLM, WER on a manifest (+ Whisper).

    python recipes/eval_asr.py manifest=runs/tiny/corpus/test.jsonl connectors=[runs/tiny/stage1/connector] \\
        aligner=runs/tiny/aligner [limit=50] [whisper_baseline=true] [text_oracle=true] [summary=runs/tiny/summary.json]
    python recipes/eval_asr.py librivox=true connectors=[...] aligner=...     # real read speech (also: manifest=librivox)

The read-out generates at most N + ``slack`` tokens for a transcript of N tokens (SSR: one vector per
token; ``slack`` 0 by default), stops at a line end, is never empty and repeats no ``no_repeat_ngram``-gram
(3; 0 = off); ``max_new_tokens`` caps it (see speechlm/eval/asr.py).
``text_oracle`` (on by default) reads the reference transcripts out through the same prompt and decoding:
the WER a connector whose vectors equalled the LLM's own embeddings would get (the frozen LLM's copying).

``librivox=true`` adds the five LibriVox utterances of Debian's ``pocketsphinx-testdata``
(``librivox_dir``, default /usr/share/pocketsphinx/test/data/librivox): human read speech, never synthesized.

Writes ``<out_dir>/<name>.json`` (WER/CER per system, boundary mode, the first hypotheses, and ``by_engine``:
the same per TTS engine of the manifest's ``speaker``, with item counts) and ``.md``; the LibriVox set
goes to ``<name>_librivox.json``/``.md``. ``summary`` gets ``asr`` (manifest) and ``asr_librivox``:
``wer``, ``cer``, ``n``, ``system``, ``boundaries`` of the first system and ``by_engine``
(``{engine: {n, wer, cer, <system>_wer, <system>_cer}}``; other systems as ``whisper_*``, ``text_oracle_*``).

The run: speechlm/eval/run_asr.py (config fields shared by all three: speechlm/eval/config.py).
"""

from __future__ import annotations

from speechlm.eval.recipe_main import run_recipe
from speechlm.eval.run_asr import ASREvalConfig, run


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(ASREvalConfig, run, argv, __doc__)


if __name__ == "__main__":
    main()
