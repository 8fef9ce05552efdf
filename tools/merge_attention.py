"""Multimodal attention merging (MAM): write a speech encoder folder whose self-attention is blended with a source's.

    python tools/merge_attention.py --encoder ~/.cache/speechlm/models/whisper-base --factor 0.1 \\
        --out ~/.cache/speechlm/models/whisper-base-mam0.1
    python tools/merge_attention.py --encoder ENC --source SRC --source-part encoder \\
        --factors 0.1,0.1,0.2,0.2,0.3,0.3 --projections q,k,v,o --rule spread --out FOLDER

Per attention layer l: W = (1 - a_l) W_encoder + a_l W_source for the chosen projections (see
speechlm/models/merging.py). ``--source`` defaults to the encoder's own folder: for Whisper that merges
the decoder's self-attention into the encoder (``--source-part auto`` = the decoder of an encoder-decoder
source). The output folder holds the *whole* model (``save_pretrained``), the encoder folder's other
files (feature extractor, tokenizer, generation config), and ``merge.json`` (factors, source,
projections, layer map); it is written into a temporary folder and renamed, so it is complete or absent.
Any recipe takes it as ``model.encoder=FOLDER``.

Learnable MAM (Whisper only): ``--learn-manifest M --learn-steps N`` trains the per-layer factors,
starting from ``--factor(s)``, on Whisper's own teacher-forced ASR loss over M's rows (``--learn-split``),
everything else frozen, and writes the learned factors.
"""

from __future__ import annotations

import argparse
import sys

import torch

from speechlm.errors import ConfigError, SpeechLMError
from speechlm.models.merging import PROJECTION_NAMES, RULES
from speechlm.training.merge_export import merge_encoder_folder


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--factors: comma-separated numbers expected, not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="HF speech model folder or hub name (the target)")
    ap.add_argument("--source", default=None, help="HF model folder of the same width (default: --encoder)")
    ap.add_argument("--source-part", choices=("auto", "decoder", "encoder"), default="auto",
                    help="the source's attention stack (auto: the decoder of an encoder-decoder model)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--factor", type=float, help="one factor for every layer, in [0, 1]")
    g.add_argument("--factors", type=_floats, help="one factor per encoder layer, comma-separated")
    ap.add_argument("--projections", default="q,k,v", help=f"comma-separated among {','.join(PROJECTION_NAMES)}")
    ap.add_argument("--rule", choices=RULES, default="same", help="layer pairing (see layer_map)")
    ap.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    ap.add_argument("--learn-manifest", default=None, help="learnable MAM: train the factors on these rows")
    ap.add_argument("--learn-split", default="train", help="rows of --learn-manifest to use ('' = all)")
    ap.add_argument("--learn-steps", type=int, default=100)
    ap.add_argument("--learn-batch-size", type=int, default=4)
    ap.add_argument("--learn-max-utts", type=int, default=0, help="use the first N rows (0 = all)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    factors = args.factor if args.factor is not None else args.factors
    projections = tuple(p.strip() for p in args.projections.split(",") if p.strip())
    try:
        out, record = merge_encoder_folder(
            args.encoder, args.out, factors, source=args.source, source_part=args.source_part,
            projections=projections, rule=args.rule, learn_manifest=args.learn_manifest,
            learn_split=args.learn_split, learn_steps=args.learn_steps, learn_batch_size=args.learn_batch_size,
            learn_max_utts=args.learn_max_utts, lr=args.lr, seed=args.seed)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(record['factors'])} attention layers ({','.join(record['projections'])}; factors "
          + " ".join(f"{a:.4g}" for a in record["factors"]) + f") from {record['source']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
