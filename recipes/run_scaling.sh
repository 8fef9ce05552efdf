#!/usr/bin/env bash
# The scaling curve of the large preset: the same flow, configs and evaluations as recipes/run_large.sh
# (`make large`) at fewer hours of speech, then the curve against hours (tools/scaling_curve.py) and, at two of
# the amounts, SSR against the stack-8 and Q-Former baselines with the same stage-2 budget and two seeds, paired
# on the same items (tools/benchmarks/bench_quality.py).
#   HOURS_LIST="2.0 5.0 12.5"  the amounts run here, each into runs/scale-<h>h (30 h: runs/large, from make large)
#   COMPARE_AT="runs/scale-5.0h runs/large"  runs whose connectors are compared with the baselines
#   SEEDS=0,1  STEPS2=400 (the stage-2 budget of every connector in the comparison: the large preset's)
#   CASCADE=false  the Whisper cascade is not evaluated at each amount: it reads no connector, so its answers
#              are the same at every amount (make large reports it); the curve is SSR against text, paired
#   DRY_RUN=1  print the commands (each run's steps too), run nothing
# Each run costs what make large costs at its hours (synthesis and feature caching scale with hours; the
# aligner, the stages and the evaluations do not): see docs/PERFORMANCE.md, "Learning per hour of speech".
set -euo pipefail
cd "$(dirname "$0")/.."
HOURS_LIST=${HOURS_LIST:-"2.0 5.0 12.5"}
COMPARE_AT=${COMPARE_AT:-"runs/scale-5.0h runs/large"}
SEEDS=${SEEDS:-0,1}
STEPS2=${STEPS2:-400}
DRY_RUN=${DRY_RUN:-0}
export CASCADE=${CASCADE:-false}
PY=${VENV:-.venv}/bin/python
run() { echo "=== $*"; [ "$DRY_RUN" = 1 ] || "$@"; }

runs=()
for h in $HOURS_LIST; do
  echo "=== runs/scale-${h}h: RUN=runs/scale-${h}h HOURS=$h bash recipes/run_large.sh"
  RUN="runs/scale-${h}h" HOURS="$h" bash recipes/run_large.sh  # DRY_RUN=1 reaches it: it prints its steps
  runs+=("runs/scale-${h}h")
done
[ -f runs/large/summary.json ] && runs+=(runs/large) || echo "=== runs/large has no summary.json (make large): the curve goes without 30 h"
run "$PY" tools/scaling_curve.py --runs "${runs[@]}" --png docs/scaling.png --out runs/scaling.json \
  --target storycloze_parity=0.9
for r in $COMPARE_AT; do
  hours=${r#runs/scale-}; hours=${hours%h}; [ "$r" = runs/large ] && hours=30.0
  run "$PY" tools/benchmarks/bench_quality.py --run "$r" --preset large --hours "$hours" --steps "$STEPS2" \
    --connectors ssr,stack,qformer --seeds "$SEEDS" --stories 0 --questions 0 --out "$r/bench_quality"
done
