"""Measure an aligner against reference word timings: word-boundary error, CER, speed; writes a JSON report.

    python tools/eval_alignment.py --manifest corpus/test.jsonl --aligner ~/.cache/speechlm/aligners/charctc \
        --out runs/align_eval.json [--feature-cache DIR] [--decoders ctc_segmentation forced_align] \
        [--modes forced free] [--limit 200]

Reference timings are the manifest rows' ``words`` (the synthesis engine's own segment timings for the
synthesized corpus). For each decoder and mode: word-boundary error in ms (``mae_ms``, start/end separately,
share within 20 and 50 ms), the aligner's greedy CER and real-time factors; ``by_engine`` repeats them per TTS
engine of the rows' speakers. The fields are described in :func:`alignment.evaluation.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from alignment.aligner import MODES
from alignment.decoders import DECODERS
from alignment.evaluation import EvalOptions, evaluate
from speechlm.atomic import atomic_write_text
from speechlm.errors import SpeechLMError
from speechlm.paths import SMOLLM2_135M, default_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="rows with reference 'words' timings")
    ap.add_argument("--aligner", required=True)
    ap.add_argument("--tokenizer", default=str(default_model(SMOLLM2_135M)))
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--encoder", default="")
    ap.add_argument("--feature-cache", default="")
    ap.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--beam-size", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=0, help="first N rows only")
    ap.add_argument("--offset-ms", type=float, default=0.0,
                    help="constant shift added to predicted times (calibration; report it when used)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate(EvalOptions(
            manifest=args.manifest, aligner=args.aligner, tokenizer=args.tokenizer, encoder=args.encoder,
            feature_cache=args.feature_cache, decoders=args.decoders, modes=args.modes, beam_size=args.beam_size,
            batch_size=args.batch_size, limit=args.limit, offset_ms=args.offset_ms))
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(json.dumps(report["results"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
