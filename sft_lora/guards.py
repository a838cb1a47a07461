"""Checks run before training touches anything: outputs are writable, QLoRA's backend can run.

Each failure is a `RecipeError` (one line, exit 2) raised before any model, data or checkpoint is written, so an
unwritable output directory fails in the first second rather than at the first checkpoint, hours in.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Recipe, RecipeError, first_line
from .mix import paths


def check_outputs(recipe: Recipe) -> None:
    """Every output directory can be created and written; none of them, nor a parent, is a file; none of them is
    or holds an input (a run replaces its output directories whole)."""
    outputs = {recipe.adapters_dir: "output.dir", recipe.checkpoint_dir: "output.checkpoint_dir"}
    if recipe.output.merge:
        outputs[recipe.merged_dir] = "output.dir"
    model, data = recipe.model, recipe.data
    inputs = {"the recipe": recipe.source, "model.name_or_path": model.name_or_path,
              "data.chat_template": data.chat_template}
    for key in ("path", "eval_path"):
        for n, path in enumerate(paths(getattr(data, key))):
            inputs[f"data.{key}[{n}]" if n else f"data.{key}"] = path
    for path, key in outputs.items():
        check_not_inputs(path, inputs, f"set {key} elsewhere")
        check_writable(path, key)


def check_not_inputs(target: Path, inputs: dict[str, str | Path | None], fix: str) -> None:
    """Raise RecipeError when `target`, a directory about to be replaced, is or contains an existing input."""
    out = Path(target).resolve()
    for name, value in inputs.items():
        path = Path(value).resolve() if value else None
        if path is not None and path.exists() and (path == out or out in path.parents):
            raise RecipeError(f"{target}: is or holds {name} ({value}), which writing there would delete; {fix}")


def check_writable(path: Path, key: str) -> None:
    """Raise RecipeError when `path` could not be created as a directory and written to.

    Writes and removes a probe file in the deepest existing ancestor, and creates nothing else (as root,
    permission bits allow everything, so only a real write tells)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RecipeError(f"{existing}: is a file, so {path} cannot be created; set {key} to a directory")
    probe = existing / f".sft_lora_probe-{os.getpid()}"
    try:
        with probe.open("wb") as handle:
            handle.write(b"probe")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        raise RecipeError(f"{existing}: cannot write here ({exc.strerror}), needed for {path}; set {key} to a "
                          "writable directory") from None


def check_model_weights(recipe: Recipe) -> None:
    """A local base model must have safetensors weights: a .bin/.pt checkpoint is a pickle, which can run code
    when loaded. (Hub models are held to the same rule by `use_safetensors=True` when loading.)"""
    path = Path(recipe.model.name_or_path)
    if not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise RecipeError(f"{path}: weights only as a pickle ({pickles[0]}), which can run code when loaded; "
                          "convert them to safetensors (save_pretrained writes safetensors) and point "
                          "model.name_or_path there")


def check_qlora_backend(recipe: Recipe) -> None:
    """QLoRA needs bitsandbytes importable on this machine; say so in one line instead of a deep traceback."""
    if not recipe.use_qlora:
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a backend library that fails to load (OSError, RuntimeError)
        reason = first_line(exc)
        raise RecipeError(f"{recipe.source}: use_qlora is true but bitsandbytes cannot run here ({reason}); "
                          "install a bitsandbytes build for this machine or set use_qlora: false") from None
