"""Hierarchical feature fusion against picking encoder layers: stage 1 (distillation) of the SSR connector for each
variant, on the same data, steps, schedule and seed.

    nice -n 19 .venv/bin/python tools/benchmarks/bench_fusion.py --run runs/small --steps 300 \\
        [--variants top,middle,weighted,hierarchical] [--middle K] [--group 2] [--fusion-dim 0] [--ranks 2] \\
        [--work runs/fusion] [--out runs/bench/fusion.json]

Variants (``recipes/configs/stage1_<preset>.yaml``'s connector and schedule, ``--steps`` steps, the run's aligned
train and valid manifests; only the layers and ``model.connector.layer_fusion`` differ):

  top           the last encoder layer only (``encoder_layers [-1]``: what the recipes train on)
  middle        one middle layer only (``--middle``, default: half the encoder's depth, layer 3 of Whisper base's 6)
  weighted      every hidden state, ``layer_fusion=weighted`` (learned softmax-weighted sum)
  hierarchical  every hidden state, ``layer_fusion=hierarchical`` (``fusion_group=--group``, ``fusion_dim=--fusion-dim``)

Features. A run's feature cache holds only the layers the recipe cached (``[-1]`` in recipes/run_cpu.sh), so the
benchmark first caches every hidden state (the embeddings output and each layer: 7 for Whisper base, L times the
disk of one layer: about 6 GB for the small run's 4.5 h of train audio, plus ~0.9 GB per one-layer cut below) of the
aligned train and valid rows into ``<work>/features/all``, running (when ``<work>/features/all/<split>/index.json``
is missing; ``--all-features DIR`` uses an existing all-layers cache instead)::

    for s in train valid; do .venv/bin/python tools/cache_features.py --manifest runs/small/aligned/$s.jsonl \\
        --encoder ~/.cache/speechlm/models/whisper-base --out runs/fusion/features/all/$s \\
        --layers 0 1 2 3 4 5 6 --batch-size 8 --threads 2; done

The one-layer caches are cut from it without the encoder (``speechlm.data.feature_cache.select_layers``) into
``<work>/features/layer<k>``, so every variant reads the same frames.

Table: stage-1 valid cosine and token accuracy (the final validation, metrics.json), trainable parameters (the
whole connector trains in stage 1; the layer fusion's share), median step time, and the feature cache each variant
needs per second of audio: L x D x frame rate x 2 bytes (the cache is fp16), and as measured (shard bytes / cached
audio seconds). Stage-1 runs that already reached ``--steps`` are reused (``--retrain`` trains them again).
Writes JSON (``--out``).
"""

from __future__ import annotations

from speechlm.perf.bench import add_run_args, add_stage1_training_args, bench_parser
from speechlm.perf.benchmarks.fusion import VARIANTS, run


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__)
    add_run_args(ap)
    ap.add_argument("--all-features", default="", help="an existing cache of every hidden state (<dir>/train, "
                    "<dir>/valid); default: build one in <work>/features/all")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--middle", type=int, default=-1, help="the middle variant's layer (default: depth // 2)")
    ap.add_argument("--group", type=int, default=2, help="hierarchical: fusion_group")
    ap.add_argument("--fusion-dim", type=int, default=0, help="hierarchical: fusion_dim (0 = d_enc)")
    add_stage1_training_args(ap, "fusion", ranks=2, master_port=29561)
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
