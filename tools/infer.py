"""Answer a prompt about audio files with a trained SpeechLM; one JSON line per file.

    python tools/infer.py clip.wav --out answers.jsonl                      # one file
    python tools/infer.py recordings/ --out answers.jsonl --prompt "Summarize: {speech}\\nAnswer:"
    python tools/infer.py corpus/test.jsonl --out answers.jsonl --run runs/small --max-new-tokens 32

INPUT is an audio file, a folder (every .wav/.flac/.ogg/.mp3 below it, sorted) or a manifest (.jsonl: each
row's ``audio``, relative to the manifest's folder, and its ``id``). Each output row holds id, audio, prompt,
answer, transcript (what the aligner decoded), tokens (per LLM token of the transcript: text, start_s, end_s),
duration_s, speech_s (seconds of detected speech), no_speech, speech_regions, timings and warnings. Only the
speech the voice-activity detector finds is decoded; a clip without speech is answered by --no-speech
(refuse: an empty answer; answer: the prompt alone), flagged either way; --no-vad decodes whole clips.
A file that cannot be answered (unreadable, empty, too short) gets a row
with an ``error`` field, is reported on stderr and skipped; the rest go on. The output is written atomically
when all files are done. Exit status: 0 when the batch ran (also with skipped files), 1 when the model or
the input cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from speechlm.atomic import atomic_write_text
from speechlm.data.vad import VADConfig
from speechlm.errors import SpeechLMError
from speechlm.inference import DEFAULT_PROMPT, DEFAULT_STOP, NO_SPEECH_POLICIES, SpeechLMPipeline
from speechlm.serving.batch import answer_files, list_inputs, unescape


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="an audio file, a folder of audio files, or a manifest (.jsonl)")
    ap.add_argument("--out", required=True, help="JSON Lines output")
    ap.add_argument("--run", default="runs/tiny", help="a run folder or a connector folder (default runs/tiny)")
    ap.add_argument("--connector", default=None)
    ap.add_argument("--aligner", default=None)
    ap.add_argument("--llm", default=None)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="text with one {speech} placeholder (\\n: a newline)")
    ap.add_argument("--chat", action="store_true", help="put the prompt in a user turn of the chat template")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-repeat-ngram", type=int, default=0, help="never repeat an n-gram of the answer (0 = off)")
    ap.add_argument("--stop", action="append", default=None,
                    help="stop string (repeatable; \\n: a newline; default: a newline; --stop '' for none)")
    ap.add_argument("--no-speech", choices=NO_SPEECH_POLICIES, default="refuse",
                    help="a clip without detected speech: refuse (empty answer, default) or answer the prompt alone")
    ap.add_argument("--no-vad", action="store_true", help="no voice-activity detection: decode the whole clip")
    ap.add_argument("--vad-threshold", type=float, default=VADConfig.threshold, help="speech probability threshold")
    ap.add_argument("--vad-pad-ms", type=int, default=VADConfig.pad_ms, help="padding around detected speech")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="LLM precision: auto, fp32, bf16, fp16")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stop = DEFAULT_STOP if args.stop is None else [unescape(s) for s in args.stop if s]
    prompt = unescape(args.prompt)
    try:
        inputs = list_inputs(args.input)
        vad = VADConfig(enabled=not args.no_vad, threshold=args.vad_threshold, pad_ms=args.vad_pad_ms)
        pipe = SpeechLMPipeline.from_run(args.run, connector=args.connector, aligner=args.aligner, llm=args.llm,
                                         encoder=args.encoder, device=args.device, dtype=args.dtype, vad=vad,
                                         no_speech=args.no_speech)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from tqdm import tqdm

    rows, failed = answer_files(pipe, inputs, prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=stop,
                                no_repeat_ngram=args.no_repeat_ngram,
                                on_error=lambda uid, err: tqdm.write(f"skipped {uid}: {err}", file=sys.stderr))
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    silent = sum(bool(r.get("no_speech")) for r in rows)
    print(f"{len(rows) - failed} answered, {failed} skipped -> {args.out} ({silent} without speech)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
