"""Train an aligner (charCTC, subCTC or CIF) on speech-encoder frames of a manifest.

    python recipes/train_aligner.py --config recipes/configs/aligner_tiny.yaml \
        train_manifest=~/.cache/speechlm/corpus/train.jsonl valid_manifest=~/.cache/speechlm/corpus/valid.jsonl \
        out_dir=~/.cache/speechlm/aligners/charctc-whisper-base [steps=3000 model.layers=4 ...]

Frames come from ``feature_cache_train``/``feature_cache_valid`` (tools/cache_features.py) when set,
else the frozen encoder runs once over each manifest at start. Every ``valid_every`` steps the greedy
CER on the validation manifest is printed and the best model so far is saved to ``out_dir``
(``config.json`` + ``model.safetensors``, written atomically; ``train_state.json`` beside it).

``encoder_adapt.method=adapter|lora|prompt`` (speechlm.models.encoder_adapt; ``init_encoder_adapt=FOLDER`` starts
from an exported adaptation) adapts the encoder while the head trains: the audio is held in memory and the encoder
runs on every batch (no feature cache), its adaptation trained with the CTC head and saved with the best model
as ``out_dir/encoder_adapt/`` (config.json + model.safetensors).

The config and the training are :mod:`alignment.training` (``TrainAlignerConfig``, ``train``).
"""

from __future__ import annotations

import argparse
import sys

from alignment.training import load_train_config, train
from speechlm.errors import SpeechLMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (recipes/configs/aligner_tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=500 model.layers=4")
    args = ap.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        if cfg.missing_required():
            print("error: train_manifest, valid_manifest and out_dir must be set", file=sys.stderr)
            return 2
        train(cfg)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
