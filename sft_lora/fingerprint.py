"""Content hashes that identify a run: the resolved recipe and the data files it reads."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .config import Recipe


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of every file under a directory (sorted by relative path)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def data_sha256(recipe: Recipe) -> dict[str, str]:
    """{path: sha256} of the local data files a recipe trains and evaluates on (hub ids are named, not hashed)."""
    paths = [p for p in (recipe.data.path, recipe.data.eval_path) if p]
    return {p: file_sha256(p) if Path(p).exists() else f"hub:{p}" for p in paths}


def recipe_sha256(recipe: Recipe) -> str:
    """sha256 of the fully resolved recipe (what `--print-config` prints)."""
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()
