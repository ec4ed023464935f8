#!/usr/bin/env bash
# One prepared GPU check (docs/gpu.md): prerequisites first, then the GPU tests, the loop's syncs on CUDA and loralab
# vs HF Trainer + PEFT on a ~1B Llama; writes gpu_check.json and gpu_check.md (default runs/gpu_check/).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# --dry-run plans and prints every step, skips those that need CUDA (saying so), and writes the report: seconds, on
# a CPU. PYTHON names the interpreter (default: the repository's .venv, else python3); GPU_CHECK_WHEELS a folder of
# wheels (bitsandbytes, liger-kernel) to install offline first.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "gpu_check: missing: a Python interpreter ($PYTHON; set PYTHON=...)" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "gpu_check: missing: Python >= 3.10 ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
  exit 2
fi
# a checkout where loralab is not installed (a lent machine with torch and transformers): import it from src/
if ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("loralab") is None)'; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" benchmarks/gpu_check.py run "$@"
