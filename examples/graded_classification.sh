#!/usr/bin/env bash
# The comparison table on a task that is not solved: baseline (LoRA r 8), baseline_R (LoRA r 32), ours
# (Shake-to-Align), grit and full fine-tuning on MiniLM + synthetic/sentiment-words at the quickstart's budget
# (2 epochs of 2,000 passages, batch 32, 64 tokens), 3 seeds each, then the table (mean ± std). The LoRA family
# trains at the quickstart's lr 1e-3; full fine-tuning at 1e-4 (FULL_LR), the usual order for a BERT-sized model
# (at 1e-3 it falls to one class).
#
#   bash examples/graded_classification.sh                                # every method, seeds 1,2,3
#   METHODS=baseline FULL= bash examples/graded_classification.sh        # the LoRA baseline alone
#   TASK=synthetic/sentiment-2 bash examples/graded_classification.sh    # another graded task
# Re-running it trains nothing that has finished (io.overwrite=skip); runs land under $ROOT.
set -euo pipefail

ROOT=${ROOT:-runs/graded}
TASK=${TASK:-synthetic/sentiment-words}
METHODS=${METHODS:-baseline,baseline_R,ours,grit}
FULL=${FULL-full}  # empty: no full fine-tuning
FULL_LR=${FULL_LR:-1e-4}
SEEDS=${SEEDS:-1,2,3}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per run: two runs at a time keep two cores busy
sweep=(loralab sweep --config src/loralab/configs/experiments/quickstart.yaml --set task.name="$TASK"
  --set io.root="$ROOT" --seeds "$SEEDS")
# full fine-tuning runs one at a time beside the LoRA sweep's two: three processes share the two cores, and
# both sweeps end at about the same time
mkdir -p "$(dirname "$ROOT")"  # for the full sweep's log beside $ROOT
if [ -n "$FULL" ]; then
  "${sweep[@]}" --set method.name="$FULL" --set train.lr="$FULL_LR" --jobs 1 > "$ROOT.full.log" 2>&1 &
  full_sweep=$!
  trap 'kill "$full_sweep" 2>/dev/null || true' EXIT  # a failed or interrupted LoRA sweep stops it too
fi
"${sweep[@]}" --grid method.name="$METHODS" --jobs 2
if [ -n "$FULL" ]; then
  wait "$full_sweep" || { cat "$ROOT.full.log"; exit 1; }
fi
loralab report "$ROOT/${TASK//\//-}"
