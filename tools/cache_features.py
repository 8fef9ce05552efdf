"""Encode a manifest's audio once with a frozen speech encoder and store the features (fp16 shards + index).

    python tools/cache_features.py --manifest data/train.jsonl --encoder ~/.cache/speechlm/models/whisper-base \
        --out ~/.cache/speechlm/features/train-whisper-base [--layers -1] [--batch-size 8] [--skip-bad] \
        [--dtype auto|fp32|fp16|bf16]

Running it again reuses what is cached and fresh; changed audio or another encoder is re-encoded.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from speechlm.data.cache_jobs import encode_manifest
from speechlm.errors import SpeechLMError
from speechlm.models.encoder import DTYPES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--encoder", required=True, help="Hugging Face encoder name or folder")
    ap.add_argument("--out", required=True, help="cache folder (outside the git tree)")
    ap.add_argument("--layers", type=int, nargs="+", default=[-1],
                    help="hidden_states indices to keep (0 = embeddings output, -1 = last)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-bad", action="store_true", help="skip and report unreadable audio instead of stopping")
    ap.add_argument("--whisper-pad-to-30s", action="store_true", help="Whisper: the standard 30 s padded input")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="precision the encoder runs in (auto: bf16 on a GPU that has it, else fp32); "
                         "the cache stores fp16 either way")
    ap.add_argument("--shard-mb", type=float, default=256.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cache = encode_manifest(args.manifest, args.encoder, args.out, layers=args.layers, batch_size=args.batch_size,
                                skip_bad=args.skip_bad, whisper_pad_to_30s=args.whisper_pad_to_30s, dtype=args.dtype,
                                shard_mb=args.shard_mb)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(cache)} utterances, layers {list(cache.layers)}, {cache.frame_rate_hz:g} Hz, "
          f"{len(cache.skipped)} skipped")
    for s in cache.skipped:
        print(f"  skipped: {s.get('id', '')} {s.get('error', s.get('row', ''))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
