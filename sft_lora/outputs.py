"""What a run writes: every file and directory all at once (built in a temporary sibling, then renamed, so a crash
leaves only `<name>.tmp-*`), the adapters with their manifest, and the output directories checked before training."""

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .config import RECIPE_FILE, Recipe, RecipeError
from .data import paths
from .fingerprint import named_or_hashed, recipe_sha256
from .text import first_line, redact

MANIFEST_FILE = "manifest.json"


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `final` (only if `overwrite`), or what `final`
    links to: a link (to a bigger disk) is written through and kept."""
    final = Path(os.path.realpath(final)) if Path(final).is_symlink() else Path(final)
    check_target(final, overwrite=overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecipeError(f"{final.parent}: cannot create the output directory ({exc.strerror})") from None
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        for path in filter(Path.is_file, tmp.rglob("*")):
            readable(path)
        old = final.rename(final.with_name(f"{final.name}.old-{os.getpid()}")) if final.exists() else None
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception) or (reason := write_error(exc)) is None:
            raise
        raise RecipeError(f"{final}: could not write ({reason}); check free space and permissions") from None


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is flushed to disk and replaces `final`."""
    final = Path(final)
    tmp = final.with_name(f"{final.stem}.tmp-{os.getpid()}{final.suffix}")  # same suffix: writers pick the format
    try:
        yield tmp
        readable(tmp)
        fsync(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(final: str | Path, text: str) -> None:
    with atomic_file(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def readable(path: str | Path) -> None:
    """The mode the user's umask asks for (0644 under 022): safetensors writes 0600, unreadable to teammates."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def fsync(path: str | Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target(final: str | Path, *, overwrite: bool) -> None:
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise RecipeError(f"{final}: exists and is a file, not a directory; remove it or choose another output")
    if final.exists() and not overwrite:
        raise RecipeError(f"{final}: already exists; pass --overwrite to replace it or choose another output")


def write_error(exc: BaseException) -> str | None:
    """The reason when `exc` is a failed write (disk full, read-only), else None. Python raises OSError, safetensors
    SafetensorError("... os error 28"), torch.save a RuntimeError from its zip writer."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if match := re.search(r"I/O error: (.*?) \(os error \d+\)", text := first_line(exc)):
        return match.group(1)
    return "torch.save could not write the file" if "inline_container" in text or "write failed" in text else None


def check_outputs(recipe: Recipe) -> None:
    """Before anything is loaded or written, every output directory can be created and written, none is or is
    under a file, and none is or holds an input (a run replaces its output directories whole)."""
    outputs = {recipe.adapters_dir: "output.dir", recipe.checkpoint_dir: "output.checkpoint_dir",
               recipe.final_dir: "output.dir"}  # final_dir: the merged model's, or the adapters' again
    inputs = {"the recipe": recipe.source, "model.name_or_path": recipe.model.name_or_path,
              "data.chat_template": recipe.data.chat_template}
    inputs |= {f"data.{key}[{n}]" if n else f"data.{key}": path
               for key in ("path", "eval_path") for n, path in enumerate(paths(getattr(recipe.data, key)))}
    for path, key in outputs.items():
        check_not_inputs(path, inputs, f"set {key} elsewhere")
        if path != recipe.checkpoint_dir and path.is_dir() and any(path.iterdir()) and not any(
                (path / mark).is_file() for mark in (RECIPE_FILE, "merge_info.json")):  # not what a run left there
            raise RecipeError(f"{path}: exists and is no sft_lora output (no {RECIPE_FILE}), which this run would "
                              f"replace; move it or set {key} elsewhere")
        # a probe written and removed in the deepest existing ancestor, creating nothing else (as root, permission
        # bits allow everything: only a real write tells); "/" or "." ends the search
        existing = next(p for p in (path, *path.parents) if p.exists())
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

    try:
        info = json.loads((recipe.merged_dir / "merge_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # none, or not an sft_lora merge: left alone
    if not isinstance(info, dict) or Path(str(info.get("adapter"))).resolve() != recipe.adapters_dir.resolve() or \
            (info.get("inputs") or {}).get("adapter_sha256") == adapter_sha256(recipe.adapters_dir):  # up to date
        return
    again = f"python -m sft_lora.merge --adapter_model {recipe.adapters_dir} --overwrite makes it again"
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
                     "cuda": torch.version.cuda if cuda else None, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
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
