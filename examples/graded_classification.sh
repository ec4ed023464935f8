#!/usr/bin/env bash
# The comparison table on a task that is not solved: baseline (LoRA r 8), baseline_R (LoRA r 32), ours
# (Shake-to-Align), grit and full fine-tuning on MiniLM + synthetic/sentiment-2 at the quickstart's budget
# (2 epochs of 2,000 passages, batch 32, lr 1e-3, 64 tokens), 3 seeds each, then the table (mean ± std).
#
#   bash examples/graded_classification.sh                       # every method, seeds 1,2,3
#   METHODS=baseline SEEDS=1,2,3 bash examples/graded_classification.sh   # the LoRA baseline alone
# Re-running it trains nothing that has finished (io.overwrite=skip); runs land under $ROOT.
set -euo pipefail

ROOT=${ROOT:-runs/graded}
TASK=${TASK:-synthetic/sentiment-2}
METHODS=${METHODS:-baseline,ours,grit,full,baseline_R}
SEEDS=${SEEDS:-1,2,3}
JOBS=${JOBS:-2}   # one process per run, one thread each: two runs at a time on two cores

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
loralab sweep --config src/loralab/configs/experiments/quickstart.yaml --set task.name="$TASK" \
  --set io.root="$ROOT" --grid method.name="$METHODS" --seeds "$SEEDS" --jobs "$JOBS"
loralab report "$ROOT/${TASK//\//-}"
