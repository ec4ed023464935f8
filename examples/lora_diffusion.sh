#!/usr/bin/env bash
# LoRA-Diffusion against its five baselines on one masked diffusion LM, over seeds, then one comparison table
# (task metrics as mean ± std, trainable %, step time, peak memory) from `loralab report`.
# `lora_diffusion@every_layer` is trajectory LoRA with method.adapter.apply_to=every_layer (a bank per encoder
# layer) instead of the final hidden state; `report` shows it as its own row (its own config hash).
#
# Offline (the defaults): the bundled MiniLM on synthetic/sentiment, about 40 minutes per seed on a 2-core CPU.
#   bash examples/lora_diffusion.sh
# The README's trajectory-LoRA rows (three seeds each):
#   SEEDS="1 2 3" METHODS="lora_diffusion lora_diffusion@every_layer" bash examples/lora_diffusion.sh
# Shorter, or on another task / base (GPU; hub access), e.g.:
#   SEEDS="1" EXTRA="train.max_steps=50" bash examples/lora_diffusion.sh
#   EXTRA="task.name=glue/sst2 model.name=bert-base-uncased train.max_steps=2000" bash examples/lora_diffusion.sh
set -euo pipefail

CONFIG=${CONFIG:-$(python -c "from loralab.config.load import packaged_experiment; print(packaged_experiment('lora_diffusion'))")}
OUT=${OUT:-lora_diffusion_example}
SEEDS=${SEEDS:-"1 2"}
METHODS=${METHODS:-"lora_diffusion lora_diffusion@every_layer weight_lora adapters prefix bitfit full_ft"}
EXTRA=${EXTRA:-}

for entry in $METHODS; do
  method=${entry%@*}
  extra=()
  [[ "$entry" == *@* ]] && extra=(method.adapter.apply_to="${entry#*@}")   # lora_diffusion@<site>
  [[ "$method" == full_ft ]] && extra=(train.lr=1e-4)   # every parameter trains: the usual full fine-tuning rate
  for seed in $SEEDS; do
    # shellcheck disable=SC2086  # EXTRA holds several overrides
    loralab train --config "$CONFIG" method.name="$method" seed="$seed" "${extra[@]}" $EXTRA \
      io.root="$OUT/runs" io.overwrite=skip
  done
done
loralab report "$OUT/runs" --out "$OUT/table.md"
