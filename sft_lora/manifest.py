"""The manifest written beside the adapters: what produced them, so a run can be traced and reproduced.

Resolved recipe, package versions, the project's git commit, hashes of the data files and the chat template,
seed and hardware. Never the environment: secrets live there. Recipe values under secret-looking keys (a
`training.hub_token` expanded from `${HF_TOKEN}`) are replaced by "<redacted>".
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .config import Recipe
from .fingerprint import data_sha256, recipe_sha256

MANIFEST_FILE = "manifest.json"
PACKAGES = ("sft_lora", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
            "tokenizers", "safetensors")
SECRET_KEY = re.compile(r"(secret|password|passwd|api_?key|credential|auth)|(^|_)token$", re.I)
TOKEN_NAMES = {"eos_token", "pad_token", "bos_token", "unk_token"}  # vocabulary tokens, not credentials


def build_manifest(recipe: Recipe, tokenizer) -> dict[str, Any]:
    """The manifest as a JSON-ready dict."""
    template = tokenizer.chat_template or ""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": redact(yaml.safe_load(recipe.to_yaml())),
        "recipe_sha256": recipe_sha256(recipe),
        "data_sha256": data_sha256(recipe),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "seed": recipe.training.get("seed", 42),
        "base_model": recipe.model.name_or_path,
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "git": git_state(Path(__file__).resolve().parents[1]),
        "hardware": hardware(),
    }


def redact(value: Any, key: str = "") -> Any:
    """`value` with every string under a secret-looking key replaced."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str) and value and key not in TOKEN_NAMES and SECRET_KEY.search(key):
        return "<redacted>"
    return value


def git_state(root: Path) -> dict[str, Any] | None:
    """{commit, dirty} of the git checkout holding the project, or None outside one (a pip install)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def hardware() -> dict[str, Any]:
    """CPU, memory, accelerators and world size; no host name, no user."""
    import torch

    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory = None
    cuda = torch.cuda.is_available()
    return {
        "system": f"{platform.system()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
        "memory_gib": memory,
        "cuda": torch.version.cuda if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
