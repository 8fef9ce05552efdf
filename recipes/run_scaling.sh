#!/usr/bin/env bash
# The scaling curve of the large preset: the same flow, configs and evaluations as recipes/run_large.sh
# (`make large`) at fewer hours of speech, then the curve against hours (tools/scaling_curve.py) and, at two of
# the amounts, SSR against the stack-8 and Q-Former baselines with the same stage-2 budget and two seeds, paired
# on the same items (tools/benchmarks/bench_quality.py).
#   HOURS_LIST="2.0 5.0 12.5"  the amounts run here, each into runs/scale-<h>h (30 h: runs/large, from make large);
#              an amount whose run has its summary.json, or a point in REPORT, is not run again (RERUN=1 runs it
#              again); the curve takes every runs/scale-<h>h with a summary and REPORT's points, so amounts run at
#              different times, on different machines, join one curve
#   COMPARE_AT="runs/scale-5.0h runs/large"  runs whose connectors are compared with the baselines ("" = none)
#   SEEDS=0,1  STEPS2=400 (the stage-2 budget of every connector in the comparison: the large preset's)
#   CASCADE=false  the Whisper cascade is not evaluated at each amount: it reads no connector, so its answers
#              are the same at every amount (make large reports it); the curve is SSR against text, paired
#   RUNS=runs  the folder of the runs
#   DRY_RUN=1  print the commands (each run's steps too), run nothing
#   REPORT=docs/bench/scaling.json  the curve's points, kept in the repository: amounts measured before (their run
#              folders gone) are read back from it and join the runs here; the curve writes every point it draws
#              back into it (a run folder here replaces its recorded point)
# Each run costs what make large costs at its hours (synthesis and feature caching scale with hours; the
# aligner, the stages and the evaluations do not): see docs/PERFORMANCE.md, "Learning per hour of speech".
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}  # where the runs go: $RUNS/scale-<h>h, and make large's $RUNS/large
HOURS_LIST=${HOURS_LIST:-"2.0 5.0 12.5"}
COMPARE_AT=${COMPARE_AT-"$RUNS/scale-5.0h $RUNS/large"}  # set and empty: no comparison
SEEDS=${SEEDS:-0,1}
STEPS2=${STEPS2:-400}
DRY_RUN=${DRY_RUN:-0}
RERUN=${RERUN:-0}
REPORT=${REPORT:-docs/bench/scaling.json}
export CASCADE=${CASCADE:-false}
PY=${VENV:-.venv}/bin/python
run() { echo "=== $*"; [ "$DRY_RUN" = 1 ] || "$@"; }
recorded() { [ -f "$REPORT" ] && grep -q "\"run\": \"$1\"" "$REPORT"; }  # REPORT holds the point of run $1

for h in $HOURS_LIST; do
  r="$RUNS/scale-${h}h"
  if [ -f "$r/summary.json" ] && [ "$RERUN" != 1 ]; then
    echo "=== $r has its summary.json: not run again (RERUN=1 runs it)"; continue
  fi
  if [ "$RERUN" != 1 ] && recorded "$r"; then
    echo "=== $r has its point in $REPORT: not run again (RERUN=1 runs it)"; continue
  fi
  echo "=== $r: RUN=$r HOURS=$h bash recipes/run_large.sh"
  RUN="$r" HOURS="$h" bash recipes/run_large.sh  # DRY_RUN=1 reaches it: it prints its steps
done
# the curve: every amount with a summary (in a dry run, the amounts above as well)
runs=()
for r in "$RUNS"/scale-*h; do
  if [ -f "$r/summary.json" ]; then runs+=("$r"); fi
done
if [ "$DRY_RUN" = 1 ]; then
  for h in $HOURS_LIST; do
    r="$RUNS/scale-${h}h"
    if [ ! -f "$r/summary.json" ] && { [ "$RERUN" = 1 ] || ! recorded "$r"; }; then runs+=("$r"); fi
  done
fi
if [ -f "$RUNS/large/summary.json" ]; then runs+=("$RUNS/large")
else echo "=== $RUNS/large has no summary.json (make large): the curve takes 30 h from $REPORT, if it is there"; fi
recorded=()
if [ -f "$REPORT" ]; then recorded=(--recorded "$REPORT"); fi
run "$PY" tools/scaling_curve.py --runs "${runs[@]}" "${recorded[@]}" --png docs/scaling.png --out "$REPORT" \
  --target storycloze_parity=0.9
for r in $COMPARE_AT; do
  hours=${r##*/scale-}; hours=${hours%h}; [ "$r" = "$RUNS/large" ] && hours=30.0
  run "$PY" tools/benchmarks/bench_quality.py --run "$r" --preset large --hours "$hours" --steps "$STEPS2" \
    --connectors ssr,stack,qformer --seeds "$SEEDS" --stories 0 --questions 0 --out "$r/bench_quality"
done
