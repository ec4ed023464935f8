#!/usr/bin/env bash
# LoRA Spectral Edit end to end: a LoRA adapter, edited with each mode (calibrated on the task it learned),
# each edit evaluated before and after on GSM8K-style questions.
#
# Offline (the defaults): trains a LoRA on tiny-llama with synthetic/arithmetic first, in a minute on a CPU.
#   bash examples/spectral_edit.sh
# The published setting (GPU; hub access): the same commands with
#   BASE=meta-llama/Llama-2-7b-hf ADAPTER=LoRA-TMLR-2024/metamath-lora-rank-64-alpha-128 TASK=gsm8k \
#   EVAL_SAMPLES=-1 FEWSHOT=5 BACKEND=vllm bash examples/spectral_edit.sh
# (tiny-llama has 1,024 positions, so the offline default is zero-shot with a 64-token budget.)
# The random tiny-llama cannot do arithmetic (every accuracy here is 0): examples/arithmetic_spectral.sh edits
# adapters on an arithmetic base where accuracy can move.
set -euo pipefail

BASE=${BASE:-tiny-llama}
TASK=${TASK:-synthetic/arithmetic}
ADAPTER=${ADAPTER:-}
OUT=${OUT:-spectral_edit_example}
EVAL_SAMPLES=${EVAL_SAMPLES:-32}
FEWSHOT=${FEWSHOT:-0}
BACKEND=${BACKEND:-hf}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS-64}   # set it empty for the profile's (lm-eval: 256)
TRAIN_STEPS=${TRAIN_STEPS:-300}

if [[ -z "$ADAPTER" ]]; then
  loralab train model.name="$BASE" task.name="$TASK" task.max_length=128 \
    method.adapter.target_modules=all-linear method.adapter.r=16 method.adapter.alpha=32 \
    train.max_steps="$TRAIN_STEPS" train.batch_size=16 train.lr=3e-3 eval.max_samples=16 eval.max_new_tokens=48 \
    io.root="$OUT/runs" io.overwrite=skip
  ADAPTER=$(find "$OUT/runs" -type d -name adapter | head -n 1)
fi

limit=()
[[ "$EVAL_SAMPLES" != "-1" ]] && limit=(--eval_max_samples "$EVAL_SAMPLES")
[[ -n "$MAX_NEW_TOKENS" ]] && limit+=(--eval_max_new_tokens "$MAX_NEW_TOKENS")
for mode in abs_select random_index gd; do
  loralab edit spectral --base_model "$BASE" --lora_path "$ADAPTER" --out_dir "$OUT/$mode" --overwrite \
    --mode "$mode" --calib_task "$TASK" --calib_samples 32 \
    --eval gsm8k --eval_task "$TASK" --eval_fewshot "$FEWSHOT" --eval_backend "$BACKEND" "${limit[@]}"
done
