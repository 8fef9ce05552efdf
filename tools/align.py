"""Add per-token boundaries (one inclusive end frame per LLM token) to a manifest with a trained CTC aligner.

    python tools/align.py --manifest corpus/train.jsonl --aligner ~/.cache/speechlm/aligners/charctc \
        --tokenizer ~/.cache/speechlm/models/smollm2-135m --out corpus/train.aligned.jsonl \
        [--feature-cache DIR] [--target-frame-rate 50] [--decoder ctc_segmentation|forced_align] [--free] [--skip-bad]

Each output row gets ``token_boundaries`` (for ``tokenizer(text, add_special_tokens=False)``) and
``boundary_frame_rate_hz``. Forced mode aligns the row's transcript; ``--free`` ignores it, decodes the
speech and replaces ``text`` by what was decoded (test-time use). The output is written atomically;
with ``--skip-bad`` rows that cannot be aligned are left out and listed at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from alignment.aligner import Aligner
from alignment.decoders import DECODERS
from alignment.features import iter_feature_batches, open_frame_source
from speechlm.data.manifest import read_manifest, write_manifest
from speechlm.errors import AlignmentError, SpeechLMError
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
        return run(args)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    aligner = Aligner.from_pretrained(args.aligner, tokenizer, decoder=args.decoder, beam_size=args.beam_size)
    encoder, cache = open_frame_source(aligner, args.encoder, args.feature_cache)
    bad: list[str] = []
    utts = read_manifest(args.manifest, skip_bad=args.skip_bad, bad_rows=bad)
    to_hz = args.target_frame_rate or aligner.frame_rate_hz
    out = []
    with tqdm(total=len(utts), desc="align", unit="utt") as bar:
        for fb in iter_feature_batches(utts, args.batch_size, encoder=encoder, cache=cache,
                                       skip_bad=args.skip_bad, bad_rows=bad):
            lp = aligner.frame_outputs(fb.features, fb.lengths)
            for k, utt in enumerate(fb.utts):
                try:
                    res = aligner.align_posteriors(lp[k, : int(fb.lengths[k])], None if args.free else utt.text,
                                                   utt.id, to_hz)
                except AlignmentError as e:
                    if not args.skip_bad:
                        raise
                    bad.append(f"{utt.id}: {e}")
                    continue
                # free mode replaces the text, so the reference word timings no longer describe it
                out.append(replace(utt, text=res.text, token_boundaries=res.token_boundaries,
                                   boundary_frame_rate_hz=res.frame_rate_hz,
                                   words=None if args.free else utt.words))
            bar.update(len(fb.utts))
    n = write_manifest(args.out, out)
    print(f"wrote {n} aligned rows to {args.out} ({'free' if args.free else 'forced'} mode, {args.decoder}, "
          f"{to_hz} Hz)")
    if bad:
        print(f"{len(bad)} bad row(s) skipped:", file=sys.stderr)
        for b in bad:
            print(f"  {b}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
