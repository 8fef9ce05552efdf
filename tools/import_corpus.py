"""Write a manifest from a LibriSpeech, MLS or plain folder corpus, or a Hugging Face datasets / Lhotse one.

    python tools/import_corpus.py --layout librispeech --root LibriSpeech/train-clean-100 \
        --split train --out data/train.jsonl [--skip-bad] [--no-check-speech] [--workers 4]
    python tools/import_corpus.py --layout hf --root 'data/cv#text=sentence' --split train --out data/train.jsonl
    python tools/import_corpus.py --layout lhotse --root data/cuts_dev.jsonl.gz --split valid --out data/valid.jsonl

(--layout hf / lhotse: the rows of that split; options after '#': speechlm/data/sources.py, docs/OWN_DATA.md.)

Every clip is also checked for speech (speechlm/data/speech_check.py): a clip in which the voice-activity
detector finds no speech, or too little for its transcript's words, is a bad row like an unreadable file
(the import stops naming them all, or --skip-bad leaves them out and lists them). --no-check-speech skips
the check (it reads every clip: about 2 ms of CPU per audio second, on --workers threads).
"""

from __future__ import annotations

import argparse
import os
import sys

from speechlm.data.importers import IMPORTERS
from speechlm.data.manifest import write_manifest
from speechlm.errors import SpeechLMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=sorted(IMPORTERS), required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-bad", action="store_true", help="skip and report bad rows instead of stopping")
    ap.add_argument("--check-speech", action=argparse.BooleanOptionalAction, default=True,
                    help="reject clips with no or too little detected speech for their transcript (default: on)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads of the speech check")
    args = ap.parse_args(argv)
    bad: list[str] = []
    try:
        rows = IMPORTERS[args.layout](args.root, args.split, skip_bad=args.skip_bad, bad_rows=bad,
                                      check_speech=args.check_speech, workers=args.workers)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = write_manifest(args.out, rows)
    hours = sum(r.duration_s for r in rows) / 3600
    print(f"wrote {n} rows ({hours:.2f} h) to {args.out}; skipped {len(bad)} bad rows")
    for b in bad:
        print(f"  skipped: {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
