#!/usr/bin/env bash
# What the method reaches on a CPU: the tiny flow with more text, voices and steps, under an hour on 2
# cores. 5 h of synthesized speech (4.5 h of train), the configs recipes/configs/*_small.yaml, larger
# evaluation subsets -> runs/small/summary.json. The flow and its knobs are in recipes/run_cpu.sh.
export PRESET=small
export RUN=${RUN:-runs/small} HOURS=${HOURS:-5.0}
export STORIES=${STORIES:-100} QUESTIONS_PER_SUBJECT=${QUESTIONS_PER_SUBJECT:-13} ASR_UTTS=${ASR_UTTS:-60}
exec bash "$(dirname "$0")/run_cpu.sh"
