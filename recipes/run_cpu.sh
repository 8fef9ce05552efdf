#!/usr/bin/env bash
# The end-to-end flow on the CPU, shared by recipes/run_tiny.sh (`make demo`) and recipes/run_small.sh:
#   prepare models -> synthesize corpus -> cache encoder features -> train the CTC aligner -> align
#   -> stage 1 (distill) -> token error analysis -> stage 2 (next-token) -> evaluate -> $RUN/summary.json + a table.
# Models: Whisper base (encoder) + SmolLM2-135M (frozen LLM), converted from registry packages.
# The training stages run with 2 CPU ranks through the deepspeed launcher, one torch thread each.
# PRESET=tiny|small picks recipes/configs/{aligner,stage1,stage2}_$PRESET.yaml; the wrappers set the
# rest. Knobs (environment): RUN HOURS ALIGNER_STEPS STAGE1_STEPS STAGE2_STEPS (empty = the config's)
#   RANKS=2 (1 = plain python, no launcher) EXTRA1="key=value ..." EXTRA2="key=value ..." (stage 1 / 2 overrides)
#   EXTRA_ALIGNER="key=value ..." (aligner overrides, e.g. max_minutes=0)
#   FROM=stage1 (start at this step, reusing the outputs of the earlier ones) UNTIL=stage1 (stop after this
#   step: no later steps, no summary; unset = every step, then the summary) FORCE=1 (new corpus)
#   DRY_RUN=1 (print each step's command and the summary command, run nothing)
#   STORIES QUESTIONS_PER_SUBJECT ASR_UTTS (evaluation subset sizes; 0 = all) WRONG_STYLES CASCADE LIBRIVOX VOICES
#   HARD_EVAL MID=1 (supervised mid-training between stage 1 and stage 2, recipes/stage_mid_supervised.py with
#   recipes/configs/stage_mid_$PRESET.yaml; stage 2 then starts from its connector, and its LoRA when it has one)
#   MID_STEPS EXTRA_MID="key=value ..."
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export PATH="$(cd "$VENV/bin" && pwd):$PATH" TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
PRESET=${PRESET:-tiny}
RUN=${RUN:-runs/$PRESET}
HOURS=${HOURS:-2.0}
RANKS=${RANKS:-2}
ALIGNER_STEPS=${ALIGNER_STEPS:-}
# Evaluation subset sizes (0 = whole embedded sets: 310 stories, 8 x 40 questions); they bound the
# run's time on 2 CPU cores, and every report states its item counts and 95% intervals.
STORIES=${STORIES:-60}
QUESTIONS_PER_SUBJECT=${QUESTIONS_PER_SUBJECT:-8}
ASR_UTTS=${ASR_UTTS:-40}
WRONG_STYLES=${WRONG_STYLES:-[adversarial,random]}  # StoryCloze wrong endings (the first is the headline)
MMLU_SHOTS=${MMLU_SHOTS:-[0,5]}  # Speech-MMLU: 0-shot (the headline) and 5-shot (5 spoken examples before each question)
CASCADE=${CASCADE:-true}  # also evaluate the Whisper-base cascade (Whisper transcribes, the LLM reads)
LIBRIVOX=${LIBRIVOX:-true}  # zero-shot ASR also on the 5 LibriVox clips of Debian's pocketsphinx-testdata
VOICES=${VOICES:-natural}  # StoryCloze / Speech-MMLU voices: natural (held-out Festival ked + Piper joe) | hard
HARD_EVAL=${HARD_EVAL:-false}  # also StoryCloze in the hard condition (held-out eSpeak voices): summary key storycloze_hard
STAGE1_STEPS=${STAGE1_STEPS:-}
STAGE2_STEPS=${STAGE2_STEPS:-}
MID=${MID:-0}
MID_STEPS=${MID_STEPS:-}
CONFIGS=recipes/configs
for c in aligner stage1 stage2; do
  [ -f "$CONFIGS/${c}_$PRESET.yaml" ] || { echo "no $CONFIGS/${c}_$PRESET.yaml for PRESET=$PRESET" >&2; exit 2; }
done
if [ "$MID" = 1 ] && [ ! -f "$CONFIGS/stage_mid_$PRESET.yaml" ]; then
  echo "MID=1: no $CONFIGS/stage_mid_$PRESET.yaml for PRESET=$PRESET" >&2; exit 2
fi
CACHE=$("$PY" -c "from speechlm.paths import cache_dir; print(cache_dir())")
MODELS=$("$PY" -c "from speechlm.paths import models_dir; print(models_dir())")
CORPUS=${CORPUS:-$CACHE/corpus/$PRESET-${HOURS}h}
FEATURES=$CACHE/features/$PRESET-${HOURS}h
WHISPER=$MODELS/whisper-base
LLM=$MODELS/smollm2-135m
STEPS=(prepare_models synthesize_corpus cache_features train_aligner eval_aligner align stage1 analyze_tokens
       mid stage2 eval_storycloze eval_storycloze_hard eval_speech_mmlu eval_asr)
FROM=${FROM:-prepare_models}
UNTIL=${UNTIL:-}  # empty: run every step, then write the summary and print its table
DRY_RUN=${DRY_RUN:-0}
[[ " ${STEPS[*]} " == *" $FROM "* ]] || { echo "FROM must be one of: ${STEPS[*]}" >&2; exit 2; }
index() { local i; for i in "${!STEPS[@]}"; do [ "${STEPS[$i]}" = "$1" ] && echo "$i"; done; }
if [ -n "$UNTIL" ]; then
  [[ " ${STEPS[*]} " == *" $UNTIL "* ]] || { echo "UNTIL must be one of: ${STEPS[*]}" >&2; exit 2; }
  [ "$(index "$UNTIL")" -ge "$(index "$FROM")" ] || { echo "UNTIL=$UNTIL comes before FROM=$FROM" >&2; exit 2; }
fi
if [ "$DRY_RUN" != 1 ]; then
  mkdir -p "$RUN"
  # the summary describes this run's models: started before the evaluations, it is written anew; started at a
  # later evaluation (FROM=eval_speech_mmlu) it keeps the figures of the evaluations before it
  [ "$(index "$FROM")" -le "$(index eval_storycloze)" ] && rm -f "$RUN/summary.json"
  [ "$FROM" = prepare_models ] && rm -f "$RUN/times.json"
fi
skipping=1

# step NAME CMD...: run a step, record its wall time in $RUN/times.json.
step() {
  local name=$1; shift
  [ "$name" = "$FROM" ] && skipping=0
  if [ "$skipping" = 1 ]; then echo "=== [$name] skipped (FROM=$FROM)"; return 0; fi
  echo; echo "=== [$name] $*"
  if [ "$DRY_RUN" = 1 ]; then
    echo "=== [$name] not run (DRY_RUN=1)"
  else
    local t0=$(date +%s.%N)
    "$@"
    record_time "$name" "$t0"
  fi
  if [ "$name" = "$UNTIL" ]; then echo "=== stopping after [$name] (UNTIL=$UNTIL)"; exit 0; fi
}

record_time() {
  "$PY" - "$RUN/times.json" "$1" "$2" <<'PYEOF'
import json, sys, time
from pathlib import Path
from speechlm.atomic import atomic_write_text
path, name, t0 = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
times = json.loads(path.read_text()) if path.is_file() else {}
times[name] = round(time.time() - t0, 1)
atomic_write_text(path, json.dumps(times, indent=1))
print(f"=== [{name}] done in {times[name]:.0f} s")
PYEOF
}

# fresh DIR: before a training stage, drop its old checkpoints when an earlier step ran in this invocation
# (its data may have changed); FROM=<that stage> keeps them, so an interrupted stage resumes.
fresh() {
  if [ "$DRY_RUN" != 1 ] && [ "$skipping" = 0 ] && [ -d "$1" ]; then echo "=== removing $1 (earlier steps ran: a fresh start)"; rm -rf "$1"; fi
}

# Preemption: SIGTERM / SIGUSR1 (and Ctrl-C) are passed on to the training ranks, which finish their step,
# checkpoint and exit 75; this script then exits 75 too (FROM=<that stage> resumes it). Only the ranks are
# signalled: the single-node `deepspeed` command dies on SIGTERM without passing it on, and DeepSpeed's
# launch.py would kill the ranks 30 s later. The launcher runs in its own process group, so a terminal's
# Ctrl-C reaches only this script, which turns it into SIGTERM for the ranks.
child=
forward() {  # forward SIGNAL: to the ranks of the running stage, else die of it
  local sig=$1 p
  if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
    echo "=== SIG$sig: passing it on to the training ranks (they checkpoint and exit 75)" >&2
    if [ "$RANKS" -gt 1 ]; then  # deepspeed (runner) -> launch.py -> the ranks
      for p in $(pgrep -P "$child"); do pkill "-$sig" -P "$p" || true; done
    else
      kill "-$sig" "$child" || true
    fi
  else
    trap - "$sig"; kill "-$sig" $$
  fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward TERM' INT

# launch SCRIPT ARGS...: a training stage with $RANKS CPU ranks (deepspeed launcher) or one process,
# in the background (own process group) so that the traps above run while it trains.
launch() {
  local rc=0
  set -m
  if [ "$RANKS" -gt 1 ]; then
    deepspeed --num_gpus "$RANKS" --master_port "${MASTER_PORT:-29511}" "$@" &
  else
    "$PY" "$@" &
  fi
  child=$!
  set +m
  while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break  # a trapped signal only interrupted the wait: the stage still runs
  done
  child=
  [ "$rc" = 75 ] && echo "=== preempted: the checkpoint is saved; FROM=<this stage> resumes it" >&2
  return "$rc"
}

step prepare_models "$PY" tools/prepare_models.py --threads 2
# The corpus is deterministic for its arguments: a complete one from the same plan is kept as it is
# (so its cached features stay fresh); FORCE=1 synthesizes it again.
force=(); [ "${FORCE:-0}" = 1 ] && force=(--force)
step synthesize_corpus "$PY" tools/synthesize_corpus.py --out "$CORPUS" --hours "$HOURS" --workers 2 "${force[@]}"
step cache_features bash -c "for s in train valid test; do \
  '$PY' tools/cache_features.py --manifest '$CORPUS/'\$s.jsonl --encoder '$WHISPER' --out '$FEATURES/'\$s \
    --batch-size 8 --threads 2 || exit 1; done"
step train_aligner "$PY" recipes/train_aligner.py --config "$CONFIGS/aligner_$PRESET.yaml" \
  train_manifest="$CORPUS/train.jsonl" valid_manifest="$CORPUS/valid.jsonl" \
  feature_cache_train="$FEATURES/train" feature_cache_valid="$FEATURES/valid" \
  out_dir="$RUN/aligner" ${ALIGNER_STEPS:+steps=$ALIGNER_STEPS} ${EXTRA_ALIGNER:-}
step eval_aligner "$PY" tools/eval_alignment.py --manifest "$CORPUS/test.jsonl" --aligner "$RUN/aligner" \
  --feature-cache "$FEATURES/test" --out "$RUN/aligner_eval.json" --modes forced free
step align bash -c "for s in train valid; do \
  '$PY' tools/align.py --manifest '$CORPUS/'\$s.jsonl --aligner '$RUN/aligner' --tokenizer '$LLM' \
    --feature-cache '$FEATURES/'\$s --out '$RUN/aligned/'\$s.jsonl --skip-bad || exit 1; done"

common=(data.train_manifest="$RUN/aligned/train.jsonl" data.valid_manifest="$RUN/aligned/valid.jsonl"
        data.feature_cache="$FEATURES/train" data.valid_feature_cache="$FEATURES/valid"
        model.llm="$LLM" model.encoder="$WHISPER")
fresh "$RUN/stage1"
# shellcheck disable=SC2086
step stage1 launch recipes/stage1_distill.py --config "$CONFIGS/stage1_$PRESET.yaml" "${common[@]}" \
  out_dir="$RUN/stage1" ${STAGE1_STEPS:+loop.max_steps=$STAGE1_STEPS} ${EXTRA1:-}
# Stage-1 error analysis: token accuracy and cosine by token class and by engine (valid split).
step analyze_tokens "$PY" tools/analyze_tokens.py --connector "$RUN/stage1/connector" --llm "$LLM" \
  --manifest "$RUN/aligned/valid.jsonl" --feature-cache "$FEATURES/valid" \
  --train-manifest "$RUN/aligned/train.jsonl" --out "$RUN/token_analysis.json" --threads 2 --no-progress
# Optional supervised mid-training (MID=1): task prompts -> transcripts through the frozen LLM, from stage 1's
# connector; stage 2 then starts from the mid stage's connector (and LoRA, when its variant trained one).
init2=(model.init_connector="$RUN/stage1/connector")
mid() {
  if [ "$MID" != 1 ]; then  # an earlier MID=1 run's outputs would be summarized as this run's
    echo "MID=$MID: no supervised mid-training stage"; rm -rf "$RUN/mid"; return 0
  fi
  # shellcheck disable=SC2086
  launch recipes/stage_mid_supervised.py --config "$CONFIGS/stage_mid_$PRESET.yaml" "${common[@]}" \
    out_dir="$RUN/mid" model.init_connector="$RUN/stage1/connector" \
    ${MID_STEPS:+loop.max_steps=$MID_STEPS} ${EXTRA_MID:-}
}
[ "$MID" = 1 ] && fresh "$RUN/mid"
step mid mid
if [ "$MID" = 1 ]; then
  init2=(model.init_connector="$RUN/mid/connector")
  [ -d "$RUN/mid/lora" ] && init2+=(model.init_lora="$RUN/mid/lora")
fi
fresh "$RUN/stage2"
# shellcheck disable=SC2086
step stage2 launch recipes/stage2_finetune.py --config "$CONFIGS/stage2_$PRESET.yaml" "${common[@]}" \
  out_dir="$RUN/stage2" "${init2[@]}" \
  ${STAGE2_STEPS:+loop.max_steps=$STAGE2_STEPS} ${EXTRA2:-}

# Evaluation: held-out voices, boundaries from the aligner in free mode (no transcript given);
# the Whisper-base cascade (Whisper transcribes, the LLM reads) is reported beside SSR (CASCADE=true).
# Zero-shot ASR always runs Whisper base too: its WER on the test rows is corpus.whisper_wer_test.
evals=(llm="$LLM" aligner="$RUN/aligner" out_dir="$RUN/eval" summary="$RUN/summary.json" threads=2)
# LibriVox needs Debian's pocketsphinx-testdata (tools/install_tts.sh installs it where apt-get works).
[ -d /usr/share/pocketsphinx/test/data/librivox ] || LIBRIVOX=false
step eval_storycloze "$PY" recipes/eval_storycloze.py "${evals[@]}" connectors="[$RUN/stage2/connector]" \
  cascade="$CASCADE" limit="$STORIES" wrong_styles="$WRONG_STYLES" voices="[$VOICES]"
storycloze_hard() {
  if [ "$HARD_EVAL" != true ]; then echo "HARD_EVAL=$HARD_EVAL: the hard condition is not evaluated"; return 0; fi
  "$PY" recipes/eval_storycloze.py "${evals[@]}" connectors="[$RUN/stage2/connector]" cascade="$CASCADE" \
    limit="$STORIES" wrong_styles="[adversarial]" voices="[hard]" name=storycloze_hard
}
step eval_storycloze_hard storycloze_hard
step eval_speech_mmlu "$PY" recipes/eval_speech_mmlu.py "${evals[@]}" connectors="[$RUN/stage2/connector]" \
  methods="[cloze]" shots="$MMLU_SHOTS" cascade="$CASCADE" limit="$QUESTIONS_PER_SUBJECT" voices="[$VOICES]"
step eval_asr "$PY" recipes/eval_asr.py "${evals[@]}" manifest="$CORPUS/test.jsonl" \
  connectors="[$RUN/stage1/connector]" whisper_baseline=true limit="$ASR_UTTS" librivox="$LIBRIVOX"

summary=("$PY" tools/summarize_run.py --run "$RUN" --corpus "$CORPUS")
echo; echo "=== [summary] ${summary[*]}"
if [ "$DRY_RUN" = 1 ]; then echo "=== [summary] not run (DRY_RUN=1)"; exit 0; fi
"${summary[@]}"
