#!/usr/bin/env bash
# The embedded default, end to end on 2 CPU cores (what `make demo` runs): 2 h of synthesized speech,
# Whisper base + SmolLM2-135M, the configs recipes/configs/*_tiny.yaml -> runs/tiny/summary.json.
# The flow and its knobs (HOURS, FROM=<step>, STAGE1_STEPS, RANKS, ...) are in recipes/run_cpu.sh.
export PRESET=tiny
export RUN=${RUN:-runs/tiny} HOURS=${HOURS:-2.0}
export STORIES=${STORIES:-60} QUESTIONS_PER_SUBJECT=${QUESTIONS_PER_SUBJECT:-8} ASR_UTTS=${ASR_UTTS:-40}
# The 20-minute budget leaves out the random wrong endings and the Whisper cascade (run_small.sh has them).
export WRONG_STYLES=${WRONG_STYLES:-[adversarial]} CASCADE=${CASCADE:-false}
exec bash "$(dirname "$0")/run_cpu.sh"
