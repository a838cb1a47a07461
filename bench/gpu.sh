#!/bin/bash
# The benchmark on the GPU test machine (../shared/gpu/README.md): Llama-3.2-1B and Llama-3.1-8B shapes with random
# weights, LoRA and 8B QLoRA, plain TRL vs the recipe path, side by side. Not run on a GPU yet: figures pending.
#
# Here, from the project root (fills .whl/, git-ignored; trl, datasets, bitsandbytes, transformers 5.24 ≈ 62 MB):
#     ../shared/gpu/fetch-wheels.sh --bnb --transformers
# Then on the GPU machine (the device `run` tool, carrying .whl):
#     bash bench/gpu.sh            # writes $OUT/bench.json and $OUT/bench.log, prints the tables last
# The same script on CPU, tiny shape (what was checked before sending it):
#     PYTHON=.venv/bin/python bash bench/gpu.sh --shape tiny --steps 4 --warmup 1 --records 200 --repeats 1
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then  # the GPU machine lacks trl, datasets, bitsandbytes: bring them
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
# one repeat per path (device time is scarce); 5 warm-up + 20 timed steps each; later arguments win
"$PYTHON" -m bench.run --shape llama-1b llama-8b --qlora --repeats 1 --steps 25 --warmup 5 --prep-records 0 \
  --out /tmp/bench --json "$OUT/bench.json" "$@" 2>&1 | grep -v "it/s]" | tee "$OUT/bench.log"
