#!/usr/bin/env bash
# The real-scale recipe (the same flow as run_tiny.sh, on GPUs): LibriSpeech 960 h (or MLS English) ->
# sharded manifests -> cached features of a frozen w2v-BERT 2.0 / Whisper large-v3 encoder -> charCTC
# aligner -> forced alignment onto Llama-3 tokens -> stage 1 (distill) -> stage 2 (next-token through the
# frozen Meta-Llama-3-8B) with DeepSpeed ZeRO-2/3 on 8 GPUs a node (multi-node: HOSTFILE) -> evaluation.
# It cannot run on the CPU development machine; tests/test_real_scale_configs.py builds its configs with tiny
# stand-ins of the same architectures.
#
# Expected resources (one node of 8 GPUs; disk and host memory are estimates from model sizes; GPU memory and
# step times measured on one H200 by tools/gpu_check.sh, docs/PERFORMANCE.md "GPU check"):
#   disk, feature cache: 960 h x 3600 s x 50 frames/s x 1024 dims x 2 bytes (fp16) = 354 GB (330 GiB) for
#     w2v-BERT 2.0 (one layer; each extra layer in ENCODER_LAYERS adds as much); Whisper large-v3 (1280
#     dims): 442 GB. dev/test-clean: ~2 GB each. LibriSpeech audio: ~60 GB. The merged cache hard-links the
#     per-GPU parts (no second copy). MLS English (44.5k h) would need ~16 TB: run it on the fly instead.
#   disk, models/runs: Llama-3-8B 16 GB (bf16 safetensors), w2v-BERT 2.0 2.3 GB / Whisper large-v3 3 GB;
#     checkpoints: only trainable weights + Adam state (~0.7 GB for the ~55M-parameter connector).
#   host memory per node: stage 2 reads the LLM straight into the training precision (bf16: 8 ranks x 16 GB);
#     stage 1 reads only its embedding table; the aligner holds its training frames in RAM
#     (ALIGNER_UTTS=15000 rows ~ 52 h ~ 19 GB); DataLoader workers ~2 GB/rank.
#   GPU memory (measured, one H200, batch 12 x 12 s x 40 tokens): stage 1 3.7 GiB peak (9.9 reserved);
#     stage 2 with ZeRO-2 19.6 GiB peak (23.7 reserved; 15 GiB of it the frozen bf16 weights), so ZeRO-2 fits
#     40 GB and 80 GB GPUs; ZeRO-3 (STAGE2_ZERO=3) partitions the frozen weights for smaller GPUs, at the cost
#     of gathering them every step (4.5x the step time on one GPU). docs/SCALING.md has the per-GPU projection.
#   GPU hours (8 GPUs): feature cache ~1-2 h wall (w2v-BERT 217 audio s/s a GPU end to end, half of it the
#     host fbank: 960 h / 8 GPUs ~ 0.6 h; Whisper large-v3 473), aligner ~1 GPU-h, alignment ~30 min of CPU
#     (ALIGN_JOBS processes), stage 1 50k steps at 0.033 s a step (measured, ZeRO-2, one GPU's compute; data
#     loading and the all-reduce come on top) ~0.5-1 h wall, stage 2 20k steps at 0.12 s (ZeRO-2) ~1 h wall,
#     evaluation ~1 GPU-h. Total: ~30 GPU-h, ~4-5 h wall on one node (the step times are measured, the rest
#     estimated).
#
# Knobs (environment; the defaults below): DATA WORK RUN CORPUS ENCODER_NAME ENCODER LLM ENCODER_LAYERS
#   HOSTFILE NUM_NODES GPUS_PER_NODE SHARDS ALIGN_JOBS ALIGNER_UTTS STAGE2_ZERO DEVICE STEPS="..." (a subset
#   of the step names, to resume or redo part of the flow) EXTRA1/EXTRA2/ALIGNER_EXTRA ("key=value ..."
#   appended to stage 1/2/the aligner). Multi-node: every path below must be on a filesystem all
#   nodes share, the venv at the same path on each node (see docs/SCALING.md: hostfile example).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export PATH="$(cd "$VENV/bin" && pwd):$PATH" TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore

# ---------------------------------------------------------------------------------------- paths
DATA=${DATA:-/data}                        # holds LibriSpeech/{train-clean-100,...} or mls_english/{train,dev,test}
CORPUS=${CORPUS:-librispeech}              # librispeech | mls
WORK=${WORK:-/data/speechlm}               # manifests, features, aligned shards, models (shared filesystem)
RUN=${RUN:-runs/librispeech_llama3}        # checkpoints, connectors, metrics, evaluation
MODELS=${MODELS:-$WORK/models}
LLM=${LLM:-$MODELS/Meta-Llama-3-8B}        # local folder; downloaded from meta-llama/Meta-Llama-3-8B if missing
ENCODER_NAME=${ENCODER_NAME:-facebook/w2v-bert-2.0}   # or openai/whisper-large-v3
ENCODER=${ENCODER:-$MODELS/$(basename "$ENCODER_NAME")}
ENCODER_LAYERS=${ENCODER_LAYERS:--1}       # hidden_states indices cached and fed to the connector (space separated)
ENC_TAG=$(basename "$ENCODER")
MANIFESTS=$WORK/manifests/$CORPUS
FEATURES=$WORK/features/$CORPUS-$ENC_TAG
ALIGNED=$WORK/aligned/$CORPUS-$ENC_TAG
ALIGNER=$RUN/aligner

# ---------------------------------------------------------------------------------------- cluster
HOSTFILE=${HOSTFILE:-}                     # empty: this node only
NUM_NODES=${NUM_NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
SHARDS=${SHARDS:-64}                       # train manifest shards: a multiple of NUM_NODES x GPUS_PER_NODE
ALIGN_JOBS=${ALIGN_JOBS:-32}               # parallel CPU alignment processes (ctc-segmentation is CPU-only)
ALIGNER_UTTS=${ALIGNER_UTTS:-15000}        # train-clean-100 rows the aligner trains on
STAGE2_ZERO=${STAGE2_ZERO:-2}              # 2 (fits 40 and 80 GB GPUs) or 3 (smaller GPUs: frozen LLM partitioned too)
DEVICE=${DEVICE:-cuda}                     # aligner training and evaluation
ALIGNER_EXTRA=${ALIGNER_EXTRA:-}           # "key=value ..." appended to the aligner's config
MASTER_PORT=${MASTER_PORT:-29531}
STEPS=${STEPS:-"models import cache_features train_aligner align stage1 stage2 eval"}
LAYER_LIST="[$(echo "$ENCODER_LAYERS" | tr ' ' ',')]"
mkdir -p "$RUN" "$MANIFESTS" "$FEATURES" "$ALIGNED"

want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo; echo "=== [$1] $(date -u +%H:%M:%S)"; }

# launch SCRIPT ARGS...: a training stage on NUM_NODES x GPUS_PER_NODE GPUs through the deepspeed launcher.
launch() {
  local hosts=()
  [ -n "$HOSTFILE" ] && hosts=(--hostfile "$HOSTFILE")
  deepspeed "${hosts[@]}" --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT" "$@"
}

# ---------------------------------------------------------------------------------------- 0. models
if want models; then
  step models
  # Meta-Llama-3-8B is gated: accept its licence on the hub and `hf auth login` (or HF_TOKEN) first.
  [ -f "$LLM/config.json" ] || hf download meta-llama/Meta-Llama-3-8B --local-dir "$LLM" --exclude "original/*"
  [ -f "$ENCODER/config.json" ] || hf download "$ENCODER_NAME" --local-dir "$ENCODER" \
    --include "*.json" "*.safetensors" "*.txt"
fi

# ---------------------------------------------------------------------------------------- 1. manifests
if want import; then
  step import
  if [ "$CORPUS" = librispeech ]; then
    train_parts=(train-clean-100 train-clean-360 train-other-500); valid_part=dev-clean; test_part=test-clean
    layout=librispeech; root=$DATA/LibriSpeech
  else
    train_parts=(train); valid_part=dev; test_part=test; layout=mls; root=$DATA/mls_english
  fi
  for p in "${train_parts[@]}"; do
    "$PY" tools/import_corpus.py --layout "$layout" --root "$root/$p" --split train --out "$MANIFESTS/raw/$p.jsonl" --skip-bad
  done
  "$PY" tools/import_corpus.py --layout "$layout" --root "$root/$valid_part" --split valid --out "$MANIFESTS/raw/valid.jsonl" --skip-bad
  "$PY" tools/import_corpus.py --layout "$layout" --root "$root/$test_part" --split test --out "$MANIFESTS/raw/test.jsonl" --skip-bad
  # LibriSpeech transcripts are UPPER CASE: lower-case them for Llama-3's cased tokenizer (MLS is lower case).
  raw_train=("${train_parts[@]/#/$MANIFESTS/raw/}"); raw_train=("${raw_train[@]/%/.jsonl}")
  "$PY" tools/shard_manifest.py --in "${raw_train[@]}" --out-dir "$MANIFESTS/shards" --name train --shards "$SHARDS" --lowercase
  "$PY" tools/shard_manifest.py --in "$MANIFESTS/raw/valid.jsonl" --out-dir "$MANIFESTS" --name valid --lowercase
  "$PY" tools/shard_manifest.py --in "$MANIFESTS/raw/test.jsonl" --out-dir "$MANIFESTS" --name test --lowercase
  "$PY" tools/shard_manifest.py --in "${raw_train[0]}" --out-dir "$MANIFESTS" --name aligner_train --lowercase \
    --limit "$ALIGNER_UTTS"
fi

# ---------------------------------------------------------------------------------------- 2. features
if want cache_features; then
  step cache_features
  # One caching process per GPU of this node, each over every GPUS_PER_NODE-th shard; then one merged cache.
  pids=()
  for g in $(seq 0 $((GPUS_PER_NODE - 1))); do
    (
      shards=$(ls "$MANIFESTS"/shards/train-*.jsonl | awk -v n="$GPUS_PER_NODE" -v g="$g" '(NR - 1) % n == g')
      [ -n "$shards" ] || exit 0
      "$PY" tools/shard_manifest.py --in $shards --out-dir "$FEATURES/parts" --name "train-part-$g"
      CUDA_VISIBLE_DEVICES=$g "$PY" tools/cache_features.py --manifest "$FEATURES/parts/train-part-$g.jsonl" \
        --encoder "$ENCODER" --layers $ENCODER_LAYERS --out "$FEATURES/parts/train-part-$g" --batch-size 32 --skip-bad
    ) & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  parts=$(ls -d "$FEATURES"/parts/train-part-* | grep -v '\.jsonl$')
  "$PY" tools/merge_feature_caches.py --in $parts --out "$FEATURES/train"
  for s in valid test; do
    "$PY" tools/cache_features.py --manifest "$MANIFESTS/$s.jsonl" --encoder "$ENCODER" --layers $ENCODER_LAYERS \
      --out "$FEATURES/$s" --batch-size 32 --skip-bad
  done
fi

# ---------------------------------------------------------------------------------------- 3. aligner
if want train_aligner; then
  step train_aligner
  # shellcheck disable=SC2086
  "$PY" recipes/train_aligner.py --config recipes/configs/aligner_librispeech.yaml \
    train_manifest="$MANIFESTS/aligner_train.jsonl" valid_manifest="$MANIFESTS/valid.jsonl" \
    feature_cache_train="$FEATURES/train" feature_cache_valid="$FEATURES/valid" \
    encoder="$ENCODER" encoder_layers="$LAYER_LIST" out_dir="$ALIGNER" device="$DEVICE" ${ALIGNER_EXTRA:-}
fi

# ---------------------------------------------------------------------------------------- 4. align
if want align; then
  step align
  mkdir -p "$ALIGNED/shards"
  ls "$MANIFESTS"/shards/train-*.jsonl | xargs -P "$ALIGN_JOBS" -I{} sh -c \
    'CUDA_VISIBLE_DEVICES= "$0" tools/align.py --manifest "$1" --aligner "$2" --tokenizer "$3" --feature-cache "$4" \
       --out "$5/shards/$(basename "$1")" --skip-bad --threads 1 > "$5/shards/$(basename "$1").log" 2>&1 \
       || { echo "align failed: $1 (see $5/shards/$(basename "$1").log)"; exit 255; }' \
    "$PY" {} "$ALIGNER" "$LLM" "$FEATURES/train" "$ALIGNED"
  "$PY" tools/align.py --manifest "$MANIFESTS/valid.jsonl" --aligner "$ALIGNER" --tokenizer "$LLM" \
    --feature-cache "$FEATURES/valid" --out "$ALIGNED/valid.jsonl" --skip-bad
fi

common=(data.train_shards="$ALIGNED/shards/train-*.jsonl" data.valid_manifest="$ALIGNED/valid.jsonl"
        data.feature_cache="$FEATURES/train" data.valid_feature_cache="$FEATURES/valid"
        model.llm="$LLM" model.encoder="$ENCODER" model.encoder_layers="$LAYER_LIST")

# ---------------------------------------------------------------------------------------- 5. stage 1
if want stage1; then
  step stage1
  # shellcheck disable=SC2086
  launch recipes/stage1_distill.py --config recipes/configs/librispeech_llama3_stage1.yaml "${common[@]}" \
    out_dir="$RUN/stage1" ${EXTRA1:-}
fi

# ---------------------------------------------------------------------------------------- 6. stage 2
if want stage2; then
  step stage2
  zero=(engine.zero_stage="$STAGE2_ZERO" engine.ds_config="recipes/ds/zero${STAGE2_ZERO}_gpu.json")
  # shellcheck disable=SC2086
  launch recipes/stage2_finetune.py --config recipes/configs/librispeech_llama3_stage2.yaml "${common[@]}" \
    "${zero[@]}" out_dir="$RUN/stage2" model.init_connector="$RUN/stage1/connector" ${EXTRA2:-}
fi

# ---------------------------------------------------------------------------------------- 7. evaluate
if want eval; then
  step eval
  ev=(llm="$LLM" encoder="$ENCODER" aligner="$ALIGNER" device="$DEVICE" out_dir="$RUN/eval" summary="$RUN/summary.json")
  "$PY" recipes/eval_asr.py "${ev[@]}" manifest="$MANIFESTS/test.jsonl" \
    connectors="[$RUN/stage1/connector,$RUN/stage2/connector]"
  # The embedded mini sets unless STORYCLOZE_DATA / MMLU_DATA name the full ones (see the eval recipes).
  "$PY" recipes/eval_storycloze.py "${ev[@]}" connectors="[$RUN/stage2/connector]" data="${STORYCLOZE_DATA:-}"
  "$PY" recipes/eval_speech_mmlu.py "${ev[@]}" connectors="[$RUN/stage2/connector]" data="${MMLU_DATA:-}"
  "$PY" tools/summarize_run.py --run "$RUN"
fi
