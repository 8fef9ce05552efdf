"""Performance tooling as a library: real-scale model shapes, FLOP and ZeRO memory models, the GPU check's parts
and the benchmark harness. Kept import-light: ``tools/gpu_check.sh`` imports it before its wheels are installed."""

from __future__ import annotations

from pathlib import Path

#: The checkout these tools run in: they read recipes/configs, recipes/ds and tests/ from it, and write runs/.
ROOT = Path(__file__).resolve().parents[2]
