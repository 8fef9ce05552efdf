"""Plot alignments of manifest rows to PNG: spectrogram + reference and predicted boundaries + token labels.

    python tools/plot_alignment.py --manifest corpus/test.jsonl --aligner ~/.cache/speechlm/aligners/charctc \
        --out-dir runs/align_plots [--ids ID ...] [--limit 4] [--free] [--decoder forced_align]
"""

from __future__ import annotations

import argparse
import sys

from alignment.decoders import DECODERS
from alignment.plot import plot_manifest
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
        for png in plot_manifest(args.manifest, args.aligner, args.tokenizer, args.out_dir, encoder=args.encoder,
                                 feature_cache=args.feature_cache, ids=args.ids, limit=args.limit, free=args.free,
                                 decoder=args.decoder):
            print(png)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
