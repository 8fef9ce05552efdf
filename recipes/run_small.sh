#!/usr/bin/env bash
# What the method reaches on a CPU: the tiny flow with more text, voices and steps, under an hour on 2
# cores. 5 h of synthesized speech (4.5 h of train), the configs recipes/configs/*_small.yaml, both
# StoryCloze wrong-ending styles and the Whisper cascade in the evaluations -> runs/small/summary.json.
# The flow and its knobs are in recipes/run_cpu.sh.
export PRESET=small
export RUN=${RUN:-runs/small} HOURS=${HOURS:-5.0}
export STORIES=${STORIES:-80} QUESTIONS_PER_SUBJECT=${QUESTIONS_PER_SUBJECT:-8} ASR_UTTS=${ASR_UTTS:-60}
export CASCADE=${CASCADE:-true}  # the Whisper-base cascade beside SSR
export HARD_EVAL=${HARD_EVAL:-true}  # StoryCloze also in the hard condition (held-out eSpeak voices)
exec bash "$(dirname "$0")/run_cpu.sh"
