# The user's vocabulary: install, train, resume, merge, test, lint.
# Variables: RECIPE (default recipes/tiny.yaml), ARGS (extra `section.key=value` overrides or flags),
# ACCEL (an accelerate config file; default: plain python, one process), ADAPTER (for merge; add
# ARGS=--overwrite to replace an existing merged model).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/tiny.yaml
ARGS ?=
ADAPTER ?= final_model/tiny-llama/3/lora_adapters
ACCEL ?=
# A missing ACCEL file stops make with one line (accelerate itself would fall back or print a traceback).
LAUNCH = $(if $(ACCEL),$(if $(wildcard $(ACCEL)),$(BIN)/accelerate launch --config_file $(ACCEL) -m sft_lora.run,$(error \
  ACCEL=$(ACCEL): accelerate config not found; pass an existing file such as accelerate_configs/single_gpu.yaml)),$\
  $(BIN)/python -m sft_lora.run)

.PHONY: install train resume merge print-config test lint clean

install: $(VENV)/.installed

# torch is installed first and pinned: the CPU wheel on disk; a bare `torch` would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

train: install
	$(LAUNCH) $(RECIPE) $(ARGS)

resume: install
	$(LAUNCH) $(RECIPE) --resume $(ARGS)

merge: install
	$(BIN)/python -m sft_lora.merge --adapter_model $(ADAPTER) $(ARGS)

print-config: install
	$(BIN)/python -m sft_lora.run $(RECIPE) --print-config $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check sft_lora tests

clean:
	rm -rf final_model checkpoints .cache
