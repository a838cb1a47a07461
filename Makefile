# The user's vocabulary: install, check, train, resume, merge, chat, test, lint.
# Variables: RECIPE (default recipes/tiny.yaml), ARGS (extra `section.key=value` overrides or flags),
# ACCEL (an accelerate config file; default: plain python, one process), ADAPTER (for merge),
# MODEL_DIR (for chat: a *_merged or *_adapters directory).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/tiny.yaml
ARGS ?=
ADAPTER ?= final_model/tiny-llama/3/lora_adapters
MODEL_DIR ?= final_model/tiny-llama/3/lora_merged
ACCEL ?=
LAUNCH := $(if $(ACCEL),$(BIN)/accelerate launch --config_file $(ACCEL) -m sft_lora.run,$(BIN)/python -m sft_lora.run)

.PHONY: install check train resume merge chat print-config test lint clean

install: $(VENV)/.installed

# torch is installed first and pinned: the CPU wheel on disk; a bare `torch` would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

check: install
	$(BIN)/python -m sft_lora.run $(RECIPE) --check $(ARGS)

train: install
	$(LAUNCH) $(RECIPE) $(ARGS)

resume: install
	$(LAUNCH) $(RECIPE) --resume $(ARGS)

merge: install
	$(BIN)/python -m sft_lora.merge --adapter_model $(ADAPTER) --overwrite $(ARGS)

chat: install
	$(BIN)/python -m sft_lora.chat $(MODEL_DIR) $(ARGS)

print-config: install
	$(BIN)/python -m sft_lora.run $(RECIPE) --print-config $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check sft_lora tests

clean:
	rm -rf final_model checkpoints .cache
