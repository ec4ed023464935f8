#!/usr/bin/env bash
# LoRA Spectral Edit where accuracy can move, offline on a CPU: an arithmetic base (tiny-llama trained from its
# random init on one-step GSM8K-format addition/subtraction, arithmetic_base.yaml), a LoRA per seed on a shifted
# variant (new phrasing, numbers 5-25; arithmetic_shifted.yaml), each adapter edited with abs_select, the
# random_index control and gd (calibrated on the shifted train split), evaluated before and after on the same
# held-out prompts; then the table (mean ± std over the seeds).
#   bash examples/arithmetic_spectral.sh            # SEEDS="0 1 2" OUT=arithmetic_spectral_example
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a tiny model: one thread is faster than contended ones

OUT=${OUT:-arithmetic_spectral_example}
SEEDS=${SEEDS:-0 1 2}
EVAL_SAMPLES=${EVAL_SAMPLES:-200}
TASK=synthetic/arithmetic_shifted
evaluation=(--eval gsm8k --eval_task "$TASK" --eval_fewshot 0 --eval_max_samples "$EVAL_SAMPLES"
  --eval_max_new_tokens 24)

run_dir() { python -c "import json, sys; print(json.load(sys.stdin)['directory'])"; }
base_run=$(loralab train --config arithmetic_base io.root="$OUT/runs" io.overwrite=skip --json | run_dir)
BASE="$base_run/model"
# the base without an adapter on the shifted task: the accuracy a LoRA starts from
loralab eval --run "$base_run" --set task.name="$TASK" --fewshot 0 --max-samples "$EVAL_SAMPLES" --max-new-tokens 24 \
  --out "$OUT/base_on_shifted"

for seed in $SEEDS; do
  run=$(loralab train --config arithmetic_shifted model.name="$BASE" seed="$seed" io.root="$OUT/runs" \
    io.overwrite=skip --json | run_dir)
  for mode in abs_select random_index gd; do
    loralab edit spectral --base_model "$BASE" --lora_path "$run/adapter" --out_dir "$OUT/edits/seed$seed/$mode" \
      --overwrite --mode "$mode" --calib_task "$TASK" --calib_samples 32 "${evaluation[@]}"
  done
done

python - "$OUT" <<'EOF'
"""The table: the base's and the adapters' held-out strict_match, and each edit's before/after, mean ± std."""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
def cell(values):
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"
base = json.loads((out / "base_on_shifted" / "eval.json").read_text())["metrics"]["strict_match"]
print(f"base model on the shifted task (no adapter): strict_match {base:.3f}")
print("| mode | before (adapter) | after (edited) | after − before | seeds |\n|---|---|---|---|---|")
for mode in ["abs_select", "random_index", "gd"]:
    files = sorted((out / "edits").glob(f"seed*/{mode}/metrics_gsm8k.json"))
    results = [json.loads(f.read_text())["results"] for f in files]
    before = [r["baseline"]["strict_match"] for r in results]
    after = [r["edited"]["strict_match"] for r in results]
    delta = [a - b for a, b in zip(after, before)]
    seeds = " ".join(f.parent.parent.name.removeprefix("seed") for f in files)
    print(f"| {mode} | {cell(before)} | {cell(after)} | {cell(delta)} | {seeds} |")
EOF
