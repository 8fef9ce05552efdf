"""Add per-token boundaries (one inclusive end frame per LLM token) to a manifest with a trained aligner.

    python tools/align.py --manifest corpus/train.jsonl --aligner ~/.cache/speechlm/aligners/charctc \
        --tokenizer ~/.cache/speechlm/models/smollm2-135m --out corpus/train.aligned.jsonl \
        [--feature-cache DIR] [--target-frame-rate 50] [--decoder ctc_segmentation|forced_align] [--free] [--skip-bad]

Each output row gets ``token_boundaries`` (for ``tokenizer(text, add_special_tokens=False)``) and
``boundary_frame_rate_hz``. Forced mode aligns the row's transcript; ``--free`` ignores it, decodes the
speech and replaces ``text`` by what was decoded (test-time use). The output is written atomically;
with ``--skip-bad`` rows that cannot be aligned are left out and listed at the end.
The work is :func:`alignment.annotate.align_manifest`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from alignment.annotate import align_manifest
from alignment.decoders import DECODERS
from speechlm.errors import SpeechLMError
from speechlm.paths import SMOLLM2_135M, default_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--aligner", required=True, help="aligner folder (recipes/train_aligner.py)")
    ap.add_argument("--tokenizer", default=str(default_model(SMOLLM2_135M)), help="the LLM's tokenizer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--encoder", default="", help="encoder folder (default: the one the aligner names)")
    ap.add_argument("--feature-cache", default="", help="feature cache of this manifest (else run the encoder)")
    ap.add_argument("--decoder", choices=DECODERS, default="ctc_segmentation")
    ap.add_argument("--target-frame-rate", type=float, default=0.0,
                    help="frame rate of the connector's encoder (default: the aligner's)")
    ap.add_argument("--free", action="store_true", help="ignore the transcripts: decode, then align")
    ap.add_argument("--beam-size", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-bad", action="store_true", help="leave out and report rows that cannot be aligned")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        done = align_manifest(args.manifest, args.aligner, args.tokenizer, args.out, encoder=args.encoder,
                              feature_cache=args.feature_cache, decoder=args.decoder,
                              target_frame_rate=args.target_frame_rate, free=args.free, beam_size=args.beam_size,
                              batch_size=args.batch_size, skip_bad=args.skip_bad)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {done.rows} aligned rows to {args.out} ({'free' if args.free else 'forced'} mode, {args.decoder}, "
          f"{done.frame_rate_hz} Hz)")
    if done.bad:
        print(f"{len(done.bad)} bad row(s) skipped:", file=sys.stderr)
        for b in done.bad:
            print(f"  {b}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
