"""Train a speaker-verification probe (attentive statistics pooling + Transformer block + AM-softmax) on FROZEN
features: cached encoder frames, or the vectors of a trained connector.

    python recipes/train_speaker_probe.py --config recipes/configs/speaker_probe_tiny.yaml [key=value ...]
    python recipes/train_speaker_probe.py --config recipes/configs/speaker_probe_tiny.yaml \
        data.input=connector data.connector=runs/tiny/stage1/connector \
        data.train_manifest=runs/tiny/aligned/train.jsonl out_dir=runs/speaker_probe/connector
    python recipes/train_speaker_probe.py --config ... model.partition_groups=4   # partition-and-fusion blocks

Writes ``out_dir/probe/`` (config.json + model.safetensors, read by tools/eval_speaker.py), ``out_dir/metrics.json``
(loss curve, parameters, step time) and ``out_dir/config.yaml``. The model and metrics: speechlm/eval/speaker.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speechlm.config import load_config, save_config
from speechlm.errors import SpeechLMError
from speechlm.eval.speaker import SpeakerProbeConfig, train_probe


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(SpeakerProbeConfig, args.config, args.overrides)
    save_config(cfg, Path(cfg.out_dir) / "config.yaml")
    metrics = train_probe(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("losses", "config")}, indent=1))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
