"""Check a manifest's clips for speech: list those with no or too little detected speech for their transcript.

    python tools/check_speech.py ~/.cache/speechlm/corpus/tiny-2.0h/test.jsonl [--workers 2]

The gate of the importers and the corpus builder (speechlm/data/speech_check.py: Silero voice activity, at
least 0.05 s of speech per transcript word). Exit status: 0 when every clip passes, 2 when some are flagged
(each printed with its id, file and reason), 1 when the manifest cannot be read.
"""

from __future__ import annotations

import argparse
import os
import sys

from speechlm.data.speech_check import check_manifest
from speechlm.errors import SpeechLMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest", help="a manifest (.jsonl)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads")
    args = ap.parse_args(argv)
    try:
        checked, flagged = check_manifest(args.manifest, workers=args.workers)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in flagged:
        print(f"  flagged: {line}")
    print(f"{checked} clips checked, {len(flagged)} flagged")
    return 2 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
