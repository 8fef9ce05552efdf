"""GPU readiness check: the real-scale path (w2v-BERT 2.0 / Whisper large-v3 -> SSR -> Llama-3-8B) on one GPU.

    bash tools/gpu_check.sh                        # on the lent GPU machine (installs .gpu_wheels/ first)
    python tools/gpu_check.py --cpu --tiny         # the CPU dry run (tests/test_gpu_check.py)
    python tools/gpu_check.py --parts stage2_zero3 --llm 1b --budget 150   # a rerun of one part

Every model is a RANDOMLY INITIALISED model of the real architecture, built in code (no weights travel):
w2v-BERT 2.0 (24 conformer layers, 1024 wide) and Whisper large-v3's encoder (32 layers, 1280 wide, 128 mel
bins), the SSR connector of recipes/configs/librispeech_llama3_stage1.yaml, and a Llama-3-8B-shaped LLM in
bf16 (Llama-3.2-1B-shaped with ``--llm 1b``, or when ``--llm auto`` finds too little time left for the 8B).
``--tiny`` swaps all of them for tiny stand-ins (the CPU dry run).

Parts, in order, each in its own process with its own time budget (``--isolation part``), so that a
crash, a hang or an out-of-memory in one still leaves a report with the others' numbers and its error:

  env            versions, the GPU, a bf16 8192^3 matmul rate (the practical peak)
  stage1_zero2   stage-1 steps (connector -> Llama-3 embedding targets) under DeepSpeed ZeRO-2
  stage1_zero3   the same under ZeRO-3
  stage2_zero2   stage-2 steps (connector -> frozen LLM, activation checkpointing, distill mix) under ZeRO-2
  stage2_zero3   the same under ZeRO-3 (frozen LLM partitioned too)
  encoders       feature-caching throughput of both encoders (bf16, batches of 30 s clips): the encoder
                 call alone and tools/cache_features.py's build_feature_cache end to end
  tests          pytest -m gpu tests/test_gpu.py (bf16 vs fp32, Whisper variable length, SDPA masks,
                 frozen LLM)
  stage1_run     a short stage-1 run (recipes/stage1_distill.py, the real config) on eSpeak speech:
                 does the loss fall?

The report (JSON) goes to $OUT/gpu_report.json when $OUT is set, else runs/gpu_check/report.json
(``--out`` overrides); the log of every part to gpu_check.log beside it. Formulas: speechlm/perf/flops.py
(FORMULAS) and docs/PERFORMANCE.md ("GPU check"). The parts live in speechlm/perf/gpu_check/.
"""

from __future__ import annotations

import sys

from speechlm.perf.gpu_check.cli import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
