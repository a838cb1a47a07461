#!/bin/bash
# Everything README's GPU table holds, in one command on one GPU (../shared/gpu/README.md): the padding-free attention
# side by side, plain TRL (defaults, and its best honest configuration) vs the recipe path for Llama-3.2-1B,
# Llama-3.1-8B and 8B QLoRA shapes with random weights, then the shipped accelerate configs (bench/distributed_check.py).
#
# Here, from the project root (fills .whl/, git-ignored; ~62 MB):
#     ../shared/gpu/fetch-wheels.sh --bnb --deepspeed --transformers
# Then on the GPU machine (the device `run` tool, carrying .whl):
#     BUDGET=480 bash bench/gpu.sh     # writes $OUT/gpu.log and one JSON per stage, prints the tables as it goes
# Each stage gets what is left of BUDGET seconds (default 1800) and is skipped when too little is left, so a run cut
# short keeps every finished stage's JSON. The same script on CPU, tiny shapes (what was checked before sending it):
#     PYTHON=.venv/bin/python SHAPE=tiny bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${BUDGET:-1800}
PYTHON=${PYTHON:-python3}
SHAPE=${SHAPE:-gpu}   # gpu: llama-1b / llama-8b; tiny: the CPU check of this script
STAGES=${STAGES:-attention,1b,8b,distributed}
if command -v nvidia-smi > /dev/null && compgen -G ".whl/*.whl" > /dev/null; then  # the GPU machine lacks trl, datasets, bitsandbytes, deepspeed
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
LOG=$OUT/gpu.log  # one log and one JSON per stage: what comes back from the GPU machine is at most 8 files
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$LOG"
"$PYTHON" -c "import torch, transformers, trl, peft, accelerate; print('torch', torch.__version__, torch.version.cuda, \
'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', \
accelerate.__version__)" | tee -a "$LOG"

# stage NAME MIN_SECONDS COMMAND...: run COMMAND with the time left (minus 10 s to write results), log to $LOG
stage() {
  local name=$1 need=$2; shift 2
  [[ ",$STAGES," == *",$name,"* ]] || return 0
  local left=$((BUDGET - (SECONDS - START) - 10))
  if ((left < need)); then echo "== $name: skipped, ${left}s left (needs ${need}s)" | tee -a "$LOG"; return 0; fi
  echo "== $name (up to ${left}s, at $((SECONDS - START))s)" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=5 "$left" "$@" 2>&1 | grep --line-buffered -v "it/s]\|s/it]" | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - START))s" | tee -a "$LOG"
}

if [[ $SHAPE == tiny ]]; then
  small=(--shape tiny); one=(--shape tiny); eight=(--shape tiny --qlora); dist=(--shape tiny --steps 3)
  steps=(--steps 6 --warmup 2 --records 300)
else
  small=(--shape llama-1b); one=(--shape llama-1b); eight=(--shape llama-8b --qlora); dist=(--shape llama-1b --steps 4)
  steps=(--steps 11 --warmup 3 --records 1000)
fi
bench=(-m bench.run --repeats 1 --prep-records 0 --out /tmp/bench "${steps[@]}")
stage attention 60 "$PYTHON" -m bench.attention "${small[@]}" --json "$OUT/attention.json"
stage 1b 60 "$PYTHON" "${bench[@]}" "${one[@]}" --paths "${PATHS_1B:-plain,plain-best,recipe,recipe-sdpa,recipe-flex}" \
  --json "$OUT/bench-1b.json"
stage 8b 60 "$PYTHON" "${bench[@]}" "${eight[@]}" --paths plain,plain-best,recipe --json "$OUT/bench-8b.json"
stage distributed 60 "$PYTHON" bench/distributed_check.py "${dist[@]}" --out /tmp/dist
cp /tmp/dist/distributed.json "$OUT/" 2>/dev/null
for f in /tmp/dist/*/log.txt; do [ -f "$f" ] && tail -n 5 "$f" | sed "s|^|$(basename "$(dirname "$f")"): |" >> "$LOG"; done
echo "done in $((SECONDS - START))s" | tee -a "$LOG"
