"""What a run writes (through `atomic.py`): the adapters with their manifest; the output directories checked before
training, and a merge its adapters no longer match removed."""

import hashlib
import json
import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_dir, fsync, read_json
from .config import RECIPE_FILE, Recipe, RecipeError
from .data import paths
from .fingerprint import named_or_hashed, recipe_sha256
from .launch import launched_processes
from .text import redact

MANIFEST_FILE = "manifest.json"


def check_outputs(recipe: Recipe) -> None:
    """Before anything is loaded or written, every output directory can be created and written, none is or is
    under a file, and none is or holds an input (a run replaces its output directories whole)."""
    outputs = {recipe.adapters_dir: "output.dir", recipe.checkpoint_dir: "output.checkpoint_dir",
               recipe.final_dir: "output.dir"}  # final_dir: the merged model's, or the adapters' again
    inputs = {"the recipe": recipe.source, "model.name_or_path": recipe.model.name_or_path,
              "data.chat_template": recipe.data.chat_template}
    inputs |= {f"data.{key}[{n}]" if n else f"data.{key}": path
               for key in ("path", "eval_path") for n, path in enumerate(paths(getattr(recipe.data, key)))}
    # the merge of the adapters a run replaces is removed (remove_stale_merge): never the base model, merge or not
    check_not_inputs(recipe.merged_dir, inputs, "set output.dir elsewhere (or model.name)")
    for path, key in outputs.items():
        check_not_inputs(path, inputs, f"set {key} elsewhere")
        if path != recipe.checkpoint_dir and path.is_dir() and any(path.iterdir()) and not any(
                (path / mark).is_file() for mark in (RECIPE_FILE, "merge_info.json")):  # not what a run left there
            raise RecipeError(f"{path}: exists and is no sft_lora output (no {RECIPE_FILE}), which this run would "
                              f"replace; move it or set {key} elsewhere")
        # a probe written and removed in the deepest existing ancestor, creating nothing else (as root, permission
        # bits allow everything: only a real write tells); "/" or "." ends the search
        start = path if path == recipe.checkpoint_dir else path.parent  # atomic_dir writes a sibling, then renames
        existing = next(p for p in (start, *start.parents) if p.exists())
        if not existing.is_dir():
            raise RecipeError(f"{existing}: is a file, so {path} cannot be created; set {key} to a directory")
        probe = existing / f".sft_lora_probe-{os.getpid()}"
        try:
            probe.write_bytes(b"probe")
            fsync(probe)
            probe.unlink()
        except OSError as exc:
            raise RecipeError(f"{existing}: cannot write here ({exc.strerror}), needed for {path}; set {key} to a "
                              "writable directory") from None


def remove_stale_merge(recipe: Recipe) -> None:
    """Remove the merge an earlier run made of this run's adapters directory once its adapters no longer match it:
    chat would load it. With output.merge it is made again next, so a merge that fails leaves none, not a stale one."""
    from .merge import adapter_sha256

    info = read_json(recipe.merged_dir / "merge_info.json")  # {}: none, or not an sft_lora merge: left alone
    if not info or Path(str(info.get("adapter"))).resolve() != recipe.adapters_dir.resolve() or \
            (info.get("inputs") or {}).get("adapter_sha256") == adapter_sha256(recipe.adapters_dir):  # up to date
        return
    trust = " --trust_remote_code" * recipe.model.trust_remote_code
    again = f"python -m sft_lora.merge --adapter_model {recipe.adapters_dir} --overwrite{trust} makes it again"
    if recipe.merged_dir.is_symlink():  # what it points at is the user's: said, not deleted (a merge rewrites it)
        if not recipe.output.merge:
            print(f"notice: {recipe.merged_dir} links to the merge of the adapters this run replaced, which no longer "
                  f"matches them; {again}")
        return
    shutil.rmtree(recipe.merged_dir)
    if not recipe.output.merge:
        print(f"removed {recipe.merged_dir}: the merge of the adapters this run replaced (output.merge: false; "
              f"{again})")


def check_not_inputs(target: Path, inputs: dict[str, str | Path | None], fix: str) -> None:
    """Raise RecipeError when `target`, a directory about to be replaced, is or contains an existing input."""
    out = Path(target).resolve()
    for name, value in inputs.items():
        if value and (path := Path(value).resolve()).exists() and (path == out or out in path.parents):
            raise RecipeError(f"{target}: is or holds {name} ({value}), which writing there would delete; {fix}")
        # a dataset directory is hashed whole: outputs inside it change the run's data, and --resume refuses it
        if value and name.startswith("data.") and path.is_dir() and path in out.parents:
            raise RecipeError(f"{target}: is inside {name} ({value}), a dataset directory whose content writing "
                              f"there would change; {fix}")


def build_manifest(recipe: Recipe, tokenizer) -> dict[str, Any]:
    """What produced the adapters, to trace and reproduce them; never the environment (secrets), host or user."""
    import torch

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:  # {commit, dirty} of the git checkout holding the project, None outside one (a pip install)
        checkout = {"commit": git("rev-parse", "HEAD"),
                    "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        checkout = None
    cuda = torch.cuda.is_available()
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": redact(yaml.safe_load(recipe.to_yaml())),
        "recipe_sha256": recipe_sha256(recipe),
        "data_sha256": {p: named_or_hashed(p) for p in paths(recipe.data.path) + paths(recipe.data.eval_path)},
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
        "seed": recipe.training.seed, "base_model": recipe.model.name_or_path,
        "packages": {name: _version(name) for name in ("sft_lora", "torch", "transformers", "trl", "peft", "datasets",
                                                       "accelerate", "bitsandbytes", "tokenizers", "safetensors")},
        "python": platform.python_version(), "git": checkout,
        "hardware": {"system": f"{platform.system()} {platform.machine()}", "cpu_count": os.cpu_count(),
                     "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                     "cuda": torch.version.cuda if cuda else None, "world_size": launched_processes(),
                     "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []},
    }


def save_adapters(trainer, recipe: Recipe, tokenizer) -> None:
    """Adapters, tokenizer (with its chat template), resolved recipe and manifest, written atomically.
    `save_model` runs on every rank: under ZeRO-3 the weights are gathered collectively."""
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


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def peak_memory_gib() -> float:
    """Peak GPU memory of this process (or peak RSS on CPU), GiB."""
    import resource  # Unix only

    import torch

    return (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # Linux reports KiB


def replicas_agree(trainer) -> bool | None:
    """Data-parallel replicas must end with identical adapter weights; a mismatch means a broken multi-process or
    multi-node setup. None where there is one process or the weights are sharded (ZeRO-3, FSDP)."""
    from accelerate.utils import DistributedType, gather_object

    accelerator, plugin = trainer.accelerator, trainer.accelerator.state.deepspeed_plugin
    sharded = accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)
    if accelerator.num_processes == 1 or sharded:
        return None
    digest = hashlib.sha256()
    for _, param in sorted(trainer.model.named_parameters()):
        if param.requires_grad:
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return len(set(gather_object([digest.hexdigest()]))) == 1
