"""Checks run before training touches anything: outputs are writable and hold no input.

Each failure is a `RecipeError` (one line, exit 2) raised before any model, data or checkpoint is written, so an
unwritable output directory fails in the first second rather than at the first checkpoint, hours in.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Recipe, RecipeError
from .data import paths


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

