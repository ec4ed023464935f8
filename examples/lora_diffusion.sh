#!/usr/bin/env bash
# LoRA-Diffusion against its five baselines on one masked diffusion LM, over seeds, then one comparison table
# (task metrics as mean ± std, trainable %, step time, peak memory) from `loralab report`.
#
# Offline (the defaults): the bundled MiniLM on synthetic/sentiment, about 40 minutes per seed on a 2-core CPU.
#   bash examples/lora_diffusion.sh
# Shorter, or on another task / base (GPU; hub access), e.g.:
#   SEEDS="1" EXTRA="train.max_steps=50" bash examples/lora_diffusion.sh
#   EXTRA="task.name=glue/sst2 model.name=bert-base-uncased train.max_steps=2000" bash examples/lora_diffusion.sh
set -euo pipefail

CONFIG=${CONFIG:-$(python -c "from loralab.config.load import packaged_experiment; print(packaged_experiment('lora_diffusion'))")}
OUT=${OUT:-lora_diffusion_example}
SEEDS=${SEEDS:-"1 2"}
METHODS=${METHODS:-"lora_diffusion weight_lora adapters prefix bitfit full_ft"}
EXTRA=${EXTRA:-}

for method in $METHODS; do
  lr=()
  [[ "$method" == full_ft ]] && lr=(train.lr=1e-4)   # every parameter trains: the usual full fine-tuning rate
  for seed in $SEEDS; do
    # shellcheck disable=SC2086  # EXTRA holds several overrides
    loralab train --config "$CONFIG" method.name="$method" seed="$seed" "${lr[@]}" $EXTRA \
      io.root="$OUT/runs" io.overwrite=skip
  done
done
loralab report "$OUT/runs" --out "$OUT/table.md"
