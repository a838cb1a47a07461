"""The manifest written beside the adapters: what produced them, so a run can be traced and reproduced.

Resolved recipe, package versions, the project's git commit, hashes of the data files and the chat template,
seed and hardware. Never the environment: secrets live there. Recipe values under secret-looking keys (a
`training.hub_token` expanded from `${HF_TOKEN}`) are replaced by "<redacted>".
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .config import RECIPE_FILE, Recipe
from .fingerprint import data_sha256, recipe_sha256
from .keys import is_secret_name

MANIFEST_FILE = "manifest.json"
PACKAGES = ("sft_lora", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
            "tokenizers", "safetensors")


def build_manifest(recipe: Recipe, tokenizer) -> dict[str, Any]:
    """The manifest as a JSON-ready dict."""
    template = tokenizer.chat_template or ""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": redact(yaml.safe_load(recipe.to_yaml())),
        "recipe_sha256": recipe_sha256(recipe),
        "data_sha256": data_sha256(recipe),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "seed": recipe.training.seed,
        "base_model": recipe.model.name_or_path,
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "git": git_state(Path(__file__).resolve().parents[1]),
        "hardware": hardware(),
    }


def save_adapters(trainer, recipe: Recipe, tokenizer) -> None:
    """Adapters, tokenizer (with its chat template) and the resolved recipe, written atomically.

    `save_model` runs on every rank: under ZeRO-3 the weights are gathered collectively."""
    from .atomic import atomic_dir

    if not trainer.accelerator.is_main_process:
        trainer.save_model(str(recipe.adapters_dir) + ".unused")  # collective gather; rank 0 writes
        trainer.accelerator.wait_for_everyone()
        return
    with atomic_dir(recipe.adapters_dir, overwrite=True) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the recipe beside it says the same
        tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(json.dumps(build_manifest(recipe, tokenizer), indent=2) + "\n",
                                         encoding="utf-8")
    trainer.accelerator.wait_for_everyone()


def redact(value: Any, key: str = "") -> Any:
    """`value` with every string under a secret-looking key replaced."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str) and value and is_secret_name(key):
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


def peak_memory_gib() -> float:
    """Peak GPU memory of this process (or peak RSS on CPU), GiB."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def replicas_agree(trainer) -> bool | None:
    """Data-parallel replicas must end with identical adapter weights; a mismatch means a broken multi-process or
    multi-node setup. None where there is one process or the weights are sharded (ZeRO-3, FSDP)."""
    import hashlib

    from accelerate.utils import DistributedType, gather_object

    accelerator = trainer.accelerator
    plugin = accelerator.state.deepspeed_plugin
    sharded = accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)
    if accelerator.num_processes == 1 or sharded:
        return None
    digest = hashlib.sha256()
    for _, param in sorted(trainer.model.named_parameters()):
        if param.requires_grad:
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return len(set(gather_object([digest.hexdigest()]))) == 1
