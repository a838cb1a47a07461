# The user's vocabulary: install, check, train, resume, merge, chat, test, lint.
# Variables: RECIPE (default recipes/tiny.yaml), ARGS (extra `section.key=value` overrides or flags),
# ACCEL (an accelerate config: zero3, fsdp, … from accelerate_configs/, or a path; default: the recipe's
# accelerate_config, else one process), ADAPTER (for merge; add ARGS=--overwrite to replace an existing merged
# model), MODEL_DIR (for chat: a *_merged or *_adapters dir).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/tiny.yaml
ARGS ?=
ADAPTER ?= final_model/tiny-llama/3/lora_adapters
MODEL_DIR ?= final_model/tiny-llama/3/lora_merged
ACCEL ?=
LAUNCH := $(BIN)/python -m sft_lora.run
ACCEL_ARG := $(if $(ACCEL),"accelerate_config=$(ACCEL)")

.PHONY: install check train resume merge chat print-config test fuzz lint bench clean

install: $(VENV)/.installed

# torch is installed first and pinned: the CPU wheel on disk; a bare `torch` would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# DeepSpeed ships as source only; building it in pip's isolated environment would fetch a CUDA torch.
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	touch $@

check: install
	$(BIN)/python -m sft_lora.run "$(RECIPE)" --check $(ACCEL_ARG) $(ARGS)

train: install
	$(LAUNCH) "$(RECIPE)" $(ACCEL_ARG) $(ARGS)

# --resume last, and only when ARGS names no checkpoint (`--resume DIR`): before them it took the next word as its
# value, and a second --resume in ARGS then dropped that word (an override, or ACCEL) silently.
resume: install
	$(LAUNCH) "$(RECIPE)" $(ACCEL_ARG) $(ARGS) $(if $(filter --resume%,$(ARGS)),,--resume)

merge: install
	$(BIN)/python -m sft_lora.merge --adapter_model "$(ADAPTER)" $(ARGS)

chat: install
	$(BIN)/python -m sft_lora.chat "$(MODEL_DIR)" $(ARGS)

print-config: install
	$(BIN)/python -m sft_lora.run "$(RECIPE)" --print-config $(ACCEL_ARG) $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests

# The hostile-input fuzzer of `make test`, longer (FUZZ_CASES cases; FUZZ_SEED picks another sequence).
FUZZ_CASES ?= 20000
fuzz: install
	FUZZ_CASES=$(FUZZ_CASES) $(BIN)/python -m pytest -q tests/test_fuzz.py

lint: install
	$(BIN)/ruff check sft_lora tests bench data

# Plain TRL vs this project's recipe path on the same model and data, side by side, plus data preparation
# (README, Performance). Both paths run with jemalloc preloaded when libjemalloc2 is installed; BENCH_ARGS adds
# flags (--repeats, --threads, --prep-records, --shape llama-1b llama-8b --qlora on a GPU).
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf final_model checkpoints .cache
