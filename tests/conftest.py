"""Shared fixtures: one tiny model per test session, and a helper that writes a recipe for a test."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.jsonl"

FUZZ_SUMMARY = pytest.StashKey[str]()  # tests/test_fuzz.py's case count, printed at the end of every run

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SFT_LORA_CACHE", tempfile.mkdtemp(prefix="sft_lora_cache_"))  # prepared datasets
os.environ.setdefault("SFT_DATA", str(SAMPLE))  # the hub recipes read data.path from it and refuse to start without


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The default job's tiny Llama, built once for the whole session."""
    from sft_lora.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", SAMPLE)


def to_examples(records: list, args, origin: str) -> dict[str, list]:
    """(number, record) pairs as sft_lora.data turns them into prompt/completion/source/entry/number columns."""
    from sft_lora.data import Entry, examples

    return examples(records, args, Entry(origin))[0]


def write_recipe(directory: Path, model_dir: Path, **sections) -> Path:
    """Write a recipe (the tiny job, shortened, outputs under `directory`) updated by `sections`; return its path.

    A section given as None is removed; so is a key given as None inside a section."""
    recipe = {
        "use_qlora": False,
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"path": str(SAMPLE), "eval_split": 0.15},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "training": {"num_train_epochs": 1, "max_steps": 6, "learning_rate": 3.0e-3,
                     "per_device_train_batch_size": 4, "activation_checkpointing": False,
                     "max_length": 256, "logging_steps": 1, "save_steps": 3, "report_to": "none",
                     "dataloader_pin_memory": False},
        "output": {"dir": str(directory / "final_model"), "checkpoint_dir": str(directory / "checkpoints"),
                   "merge": False},
    }
    for name, values in sections.items():
        if values is None:
            recipe.pop(name, None)
        elif isinstance(values, dict):
            section = recipe.setdefault(name, {})
            section.update(values)
            for key in [k for k, v in values.items() if v is None]:
                del section[key]
        else:
            recipe[name] = values
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def make_recipe(tmp_path, tiny_model):
    """`write_recipe` into this test's tmp_path."""
    return lambda **sections: write_recipe(tmp_path, tiny_model, **sections)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if FUZZ_SUMMARY in config.stash:
        terminalreporter.write_line(config.stash[FUZZ_SUMMARY])
