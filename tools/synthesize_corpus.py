"""Synthesize a spoken corpus (Flite, Festival, Piper and eSpeak voices): WAVs plus train/valid/test manifests.

    python tools/synthesize_corpus.py --out ~/.cache/speechlm/corpus/default [--hours 2.0] \
        [--text FILE ...] [--seed 0] [--workers 2] [--force] [--skip-bad]

Default text: WordNet usage examples, generated everyday sentences, news, Wikipedia and movie reviews
(half the training hours chosen to cover frequent English words); ``--text`` files replace them. Valid
and test hold unseen sentences in held-out voices (see speechlm/data/corpus.py for who speaks what).
A complete corpus in --out made from the same plan is kept (so are its cached features); --force redoes it.
Each clip is checked for speech (speechlm/data/speech_check.py); the clips with none or too little for their
text are listed, and --skip-bad leaves them out of the manifests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechlm.data.corpus import build_corpus
from speechlm.data.coverage import COVERAGE_TOP_WORDS
from speechlm.errors import SpeechLMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="corpus folder (keep it outside the git tree)")
    ap.add_argument("--hours", type=float, default=2.0, help="total audio hours (train gets 90%%)")
    ap.add_argument("--text", nargs="+", default=None, metavar="FILE", help="plain-text files to speak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--force", action="store_true",
                    help="synthesize again even if --out holds a complete corpus from the same plan")
    ap.add_argument("--skip-bad", action="store_true",
                    help="leave out clips with no or too little detected speech for their text")
    args = ap.parse_args(argv)
    try:
        s = build_corpus(Path(args.out).expanduser(), hours=args.hours, text_files=args.text, seed=args.seed,
                         workers=args.workers, force=args.force, skip_bad=args.skip_bad)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"corpus in {args.out}")
    for split in s.counts:
        print(f"  {split:5s}: {s.counts[split]:5d} utterances, {s.hours[split]:.3f} h, "
              f"{len(s.voices[split])} voices ({', '.join(s.voices[split][:4])}"
              f"{', ...' if len(s.voices[split]) > 4 else ''}); sources {s.sources[split]}")
    print(f"  synthesis: {s.wall_s:.1f} s wall, {s.audio_s_per_wall_s:.1f} audio s per wall s")
    for split, engines in s.by_engine.items():
        print(f"  {split:5s} by engine: " + ", ".join(f"{e} {v['utterances']} utt / {v['hours']:.2f} h"
                                                   for e, v in engines.items()))
    if s.missing_voices:
        print(f"  voices left out (not installed; see tools/install_tts.sh): {', '.join(s.missing_voices)}")
    print(f"  augmented training clips: {s.augmented_share:.0%}")
    if s.speech_flagged:
        print(f"  {len(s.speech_flagged)} clip(s) with no or too little speech"
              f"{' (left out)' if args.skip_bad else ' (kept; --skip-bad leaves them out)'}:")
        for line in s.speech_flagged:
            print(f"    {line}")
    print(f"  word-type coverage of {s.coverage_against} by the training text: {s.coverage:.1%}")
    print(f"  coverage of the {COVERAGE_TOP_WORDS} most frequent English words: {s.coverage_general:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
