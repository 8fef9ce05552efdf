"""Plot alignments of manifest rows to PNG: spectrogram + reference and predicted boundaries + token labels.

    python tools/plot_alignment.py --manifest corpus/test.jsonl --aligner ~/.cache/speechlm/aligners/charctc \
        --out-dir runs/align_plots [--ids ID ...] [--limit 4] [--free] [--decoder forced_align]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.aligner import Aligner
from alignment.decoders import DECODERS
from alignment.features import iter_feature_batches, open_frame_source
from alignment.plot import plot_alignment
from speechlm.data.audio import load_audio
from speechlm.data.manifest import read_manifest
from speechlm.errors import SpeechLMError
from speechlm.paths import SMOLLM2_135M, default_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--aligner", required=True)
    ap.add_argument("--tokenizer", default=str(default_model(SMOLLM2_135M)))
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--encoder", default="")
    ap.add_argument("--feature-cache", default="")
    ap.add_argument("--ids", nargs="*", default=None)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--free", action="store_true")
    ap.add_argument("--decoder", choices=DECODERS, default="ctc_segmentation")
    args = ap.parse_args(argv)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        aligner = Aligner.from_pretrained(args.aligner, tokenizer, decoder=args.decoder)
        encoder, cache = open_frame_source(aligner, args.encoder, args.feature_cache)
        utts = read_manifest(args.manifest)
        utts = [u for u in utts if u.id in set(args.ids)] if args.ids else utts[: args.limit]
        out_dir = Path(args.out_dir)
        for fb in iter_feature_batches(utts, 4, encoder=encoder, cache=cache):
            texts = [None if args.free else u.text for u in fb.utts]
            for utt, res in zip(fb.utts, aligner.align(fb.features, fb.lengths, texts, [u.id for u in fb.utts]),
                                strict=True):
                ref = [(w.word, w.start_s, w.end_s) for w in utt.words] if utt.words else None
                png = out_dir / f"{utt.id}.{res.mode}.png"
                plot_alignment(png, load_audio(utt.audio_path), 16_000, res, tokenizer, ref)
                print(png)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
