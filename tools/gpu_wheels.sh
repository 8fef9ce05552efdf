#!/usr/bin/env bash
# Download, here (with network), the wheels that tools/gpu_check.sh installs on the lent GPU machine,
# which has no network: CPython 3.12, manylinux x86-64, the versions of tools/constraints.txt.
#
#   bash tools/gpu_wheels.sh            # -> .gpu_wheels/ (git-ignored; travels with carry=[".gpu_wheels"])
#   GPU_WHEELS=dir bash tools/gpu_wheels.sh
#
# What the GPU machine's image lacks or has in a version this project does not support (as its install plan
# found it on 2026-12-04: Python 3.12, torch 2.11 + CUDA, transformers 5, no DeepSpeed; see docs/PERFORMANCE.md,
# "GPU check"), by what tools/gpu_check.py (speechlm/perf/gpu_check/) and tests/test_gpu.py import:
#   deepspeed 0.19.8 (only an sdist on PyPI: built here into a pure-Python wheel) + hjson, pydantic,
#     pydantic-core, annotated-types, typing-inspection, typing-extensions (its missing requirements);
#   transformers 4.57.6 + tokenizers 0.22.2 + huggingface-hub 0.36.2 (the image has transformers 5,
#     which pyproject.toml excludes: <5);
#   soundfile + cffi + pycparser (speechlm.data.audio), espeakng-loader (eSpeak for the short stage-1 run);
#   safetensors, sentencepiece (in the image already: installed there only if missing).
# Not carried: ctc-segmentation, jiwer, gguf, piper (the check does not import them); torch, torchaudio,
# numpy, tqdm, pyyaml, tensorboard, matplotlib, msgpack, ninja, psutil, py-cpuinfo, einops, regex, requests,
# filelock, packaging (in the image). The total must stay well under the tool's 64 MiB (tree included).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CONSTRAINTS=tools/constraints.txt
LIMIT_MIB=${LIMIT_MIB:-56}   # leaves room for the working tree (~2 MiB) under the 64 MiB a call may carry

pin() {  # the constraints line of a distribution, - and _ alike
  local pat=${1//[-_]/[-_]}
  local line
  line=$(grep -iE "^${pat}==" "$CONSTRAINTS" | head -1 || true)
  [ -n "$line" ] || { echo "gpu_wheels.sh: $1 is not pinned in $CONSTRAINTS" >&2; exit 1; }
  echo "$line"
}

BINARY=(hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
        transformers tokenizers huggingface_hub soundfile cffi pycparser espeakng-loader safetensors sentencepiece)
SPECS=()
for name in "${BINARY[@]}"; do SPECS+=("$(pin "$name")"); done
DS=$(pin deepspeed)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
  -d "$tmp" "${SPECS[@]}"
# DeepSpeed has no wheel on PyPI: build one (no ops compiled: DS_BUILD_OPS=0; pure Python, py3-none-any).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$tmp" "$DS"

n=$(ls "$tmp"/*.whl | wc -l)
want=$(( ${#SPECS[@]} + 1 ))
[ "$n" -eq "$want" ] || { echo "gpu_wheels.sh: $n wheels, expected $want" >&2; ls "$tmp" >&2; exit 1; }
bytes=$(cat "$tmp"/*.whl | wc -c)
if [ "$bytes" -gt $(( LIMIT_MIB * 1024 * 1024 )) ]; then
  echo "gpu_wheels.sh: $bytes bytes of wheels, over $LIMIT_MIB MiB" >&2; exit 1
fi
rm -rf "$DEST"
mkdir -p "$DEST"
mv "$tmp"/*.whl "$DEST"/
ls -l "$DEST" | awk 'NR > 1 {printf "%10d  %s\n", $5, $9}'
echo "gpu_wheels.sh: $n wheels, $(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}') MiB in $DEST ($(( $(date +%s) - start )) s)"
