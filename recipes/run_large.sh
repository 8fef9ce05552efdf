#!/usr/bin/env bash
# The large CPU preset (`make large`): 30 h of synthesized speech (27 h of train, the same held-out voices and
# unseen test sentences as the smaller presets), a wider aligner and connector, the configs
# recipes/configs/*_large.yaml, and the whole embedded evaluation sets (310 stories, 8 x 40 questions: 95%
# intervals of at most +-5.5 points) with the Whisper cascade beside SSR -> runs/large/summary.json.
# Budget: at most 2.5 h on 2 idle cores (docs/PERFORMANCE.md, "Learning per hour of speech"). The flow and its
# knobs are in recipes/run_cpu.sh.
export PRESET=large
export RUN=${RUN:-runs/large} HOURS=${HOURS:-30.0}
export STORIES=${STORIES:-0} QUESTIONS_PER_SUBJECT=${QUESTIONS_PER_SUBJECT:-0} ASR_UTTS=${ASR_UTTS:-200}
export WRONG_STYLES=${WRONG_STYLES:-[adversarial]}  # the headline style only: the whole set is the cost
export MMLU_SHOTS=${MMLU_SHOTS:-[0]}  # 0-shot only: 5-shot prompts on the whole set took the budget's last half hour
export CASCADE=${CASCADE:-true}  # the Whisper-base cascade beside SSR, paired on the same items
export HARD_EVAL=${HARD_EVAL:-false}
exec bash "$(dirname "$0")/run_cpu.sh"
