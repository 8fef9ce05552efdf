"""Answer a prompt about audio files with a trained SpeechLM; one JSON line per file.

    python tools/infer.py clip.wav --out answers.jsonl                      # one file
    python tools/infer.py recordings/ --out answers.jsonl --prompt "Summarize: {speech}\\nAnswer:"
    python tools/infer.py corpus/test.jsonl --out answers.jsonl --run runs/small --max-new-tokens 32

INPUT is an audio file, a folder (every .wav/.flac/.ogg/.mp3 below it, sorted) or a manifest (.jsonl: each
row's ``audio``, relative to the manifest's folder, and its ``id``). Each output row holds id, audio, prompt,
answer, transcript (what the aligner decoded), tokens (per LLM token of the transcript: text, start_s, end_s),
duration_s, timings and warnings. A file that cannot be answered (unreadable, empty, too short) gets a row
with an ``error`` field, is reported on stderr and skipped; the rest go on. The output is written atomically
when all files are done. Exit status: 0 when the batch ran (also with skipped files), 1 when the model or
the input cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from speechlm.atomic import atomic_write_text
from speechlm.errors import ManifestError, SpeechLMError
from speechlm.inference import AUDIO_EXTENSIONS, DEFAULT_PROMPT, DEFAULT_STOP, SpeechLMPipeline


def list_inputs(source: str | Path) -> list[tuple[str, Path | None, str | None]]:
    """(id, audio path, error) per input: one file, a folder's audio files, or a manifest's rows."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            raise ManifestError(f"{source}: no {'/'.join(AUDIO_EXTENSIONS)} files in this folder")
        return [(str(p.relative_to(source).with_suffix("")), p, None) for p in files]
    if not source.is_file():
        raise ManifestError(f"{source}: no such file or folder")
    if source.suffix.lower() != ".jsonl":
        return [(source.stem, source, None)]
    out: list[tuple[str, Path | None, str | None]] = []
    for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            audio = Path(row["audio"])
        except (ValueError, KeyError, TypeError) as e:
            out.append((f"{source.name}:{lineno}", None, f"{source}:{lineno}: not a manifest row with 'audio' ({e})"))
            continue
        path = audio if audio.is_absolute() else source.parent / audio
        out.append((str(row.get("id") or path.stem), path, None))
    return out


def unescape(text: str) -> str:
    """``\\n`` and ``\\t`` typed on a command line as a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="LLM precision: auto, fp32, bf16, fp16")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stop = DEFAULT_STOP if args.stop is None else [unescape(s) for s in args.stop if s]
    args.prompt = unescape(args.prompt)
    try:
        inputs = list_inputs(args.input)
        pipe = SpeechLMPipeline.from_run(args.run, connector=args.connector, aligner=args.aligner, llm=args.llm,
                                         encoder=args.encoder, device=args.device, dtype=args.dtype)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from tqdm import tqdm

    rows, failed = [], 0
    for uid, path, error in tqdm(inputs, desc="infer", unit="file", file=sys.stderr):
        row = {"id": uid, "audio": str(path) if path else None, "prompt": args.prompt}
        if error is None:
            try:
                result = pipe.generate(path, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
                                       temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=stop,
                                       no_repeat_ngram=args.no_repeat_ngram)
                row.update(result.to_dict())
            except SpeechLMError as e:
                error = str(e)
        if error is not None:
            failed += 1
            row["error"] = error
            tqdm.write(f"skipped {uid}: {error}", file=sys.stderr)
        rows.append(row)
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows) - failed} answered, {failed} skipped -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
