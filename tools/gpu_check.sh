#!/usr/bin/env bash
# GPU readiness check: the real-scale path on one GPU, under 8 minutes, one JSON report + a table.
#
# When a GPU machine is lent (one H200, no network; see docs/PERFORMANCE.md, "GPU check"):
#   1. here, once, with network:   bash tools/gpu_wheels.sh        (-> .gpu_wheels/, git-ignored, ~33 MiB)
#   2. the device tool, one call:  run(command="bash tools/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=540)
#      -> $OUT/gpu_report.json and $OUT/gpu_check.log come back; the table is at the end of the output.
#   A rerun of some parts, e.g. with the 1B LLM:
#      run(command="bash tools/gpu_check.sh --parts stage2_zero2,stage2_zero3 --llm 1b --budget 200",
#          carry=[".gpu_wheels"], timeout_s=260)
# The CPU dry run (tests/test_gpu_check.py):  bash tools/gpu_check.sh --cpu --tiny
#
# It installs, into $GPU_CHECK_SITE (default /tmp/speechlm_gpu_site, first on PYTHONPATH), only the wheels
# of .gpu_wheels/ whose package is missing on this machine or outside the version range the project
# supports (tools/gpu_check.py --plan-install), then runs tools/gpu_check.py with the arguments given.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS:-.gpu_wheels}
SITE=${GPU_CHECK_SITE:-/tmp/speechlm_gpu_site}
# GPU_CHECK_PYTHON picks the interpreter (not PYTHON: the Makefile exports PYTHON=python3 for venv creation)
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then PY=$GPU_CHECK_PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python   # the development machine
else PY=python3; fi                                        # the GPU machine's image (torch, CUDA)
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

start=$(date +%s)
mapfile -t need < <("$PY" tools/gpu_check.py --plan-install "$WHEELS")
if [ "${#need[@]}" -gt 0 ] && [ -n "${need[0]}" ]; then
  echo "gpu_check.sh: installing ${#need[@]} wheels into $SITE"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${need[@]}" 2>&1 | grep -v -E "^WARNING: (Target directory|Location|Running pip as)" || true
  echo "gpu_check.sh: install took $(( $(date +%s) - start )) s"
fi
exec "$PY" tools/gpu_check.py "$@"
