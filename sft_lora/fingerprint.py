"""What identifies a run's weights, by content: the values of the resolved configuration that shape the trained
weights, and the bytes of every file the recipe points at (training data, eval data, chat template).

A checkpoint records both (`checkpoints.CheckpointRecord`); resume refuses one made from different ones. The values
are read from the resolved objects — every field of the SFTConfig, LoraConfig and BitsAndBytesConfig, defaults
included, so a changed upstream default is noticed too — less the fields that cannot change what a step computes:
where and how often things are written, logged or evaluated, the run's length (extending a run is the point of
resuming), worker plumbing, and activation checkpointing (it recomputes the same values). The upstream fields are
told apart by the family their name belongs to (`NEUTRAL`), so a new field of one of these families needs no change
here. Of the project's own sections, `model` and `data` shape the weights (less the paths, compared by content);
`output`, `wandb`, `check` and `report` do not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .config import Recipe
from .data import entries, paths

NEUTRAL = re.compile(
    r"output_dir|run_name|project|report_to|disable_tqdm|push_to_hub|resume_from_checkpoint|peft_version"
    r"|(save|hub|logging|log|trackio)_\w+"  # writing, logging
    r"|(eval|do|per_device_eval|batch_eval|prediction|metric_for|greater_is|load_best|include)_\w+|\w+_full_eval"
    r"|max_steps|num_train_epochs"  # the run's length
    r"|dataloader_(num_workers|pin_memory|persistent_workers|prefetch_factor)|local_rank|ddp_timeout"
    r"|(activation|gradient)_checkpointing\w*|skip_memory_metrics")
COMPARED_BY_CONTENT = {"data": ("path", "eval_path", "chat_template")}
NOT_WEIGHTS = {"model": ("name",)}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of every file under a directory (sorted by relative path)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _sha256(str(path), stats)


@functools.lru_cache(maxsize=16)
def _sha256(root: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    """Hashed once per process for unchanged files (size and mtime): a run reads its data's hash three times."""
    digest = hashlib.sha256()
    for name, _, _ in stats:
        if Path(root).is_dir():
            digest.update(str(Path(name).relative_to(root)).encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _named_or_hashed(path: str) -> str:
    return file_sha256(path) if Path(path).exists() else f"hub:{path}"  # a hub id is named, not hashed


def data_sha256(recipe: Recipe) -> dict[str, str]:
    """{path: sha256} of the data files a recipe trains and evaluates on."""
    return {p: _named_or_hashed(p) for p in paths(recipe.data.path) + paths(recipe.data.eval_path)}


def files_sha256(recipe: Recipe) -> dict[str, str]:
    """{recipe key: sha256} of every file the recipe points at: training data, eval data, chat template; a list of
    data entries hashes as its entries' hashes joined, with any weight or source beside them."""
    out = {}
    for key in COMPARED_BY_CONTENT["data"]:
        value = getattr(recipe.data, key)
        if value and key == "chat_template":
            out[f"data.{key}"] = _named_or_hashed(value)
        elif value:
            out[f"data.{key}"] = "+".join(_named_or_hashed(e.path) + ("" if (e.weight, e.source) == (1, None) else
                                                                       f"*{e.weight:g}@{e.source}")
                                          for e in entries(value))
    return out


def weights_view(recipe: Recipe) -> dict[str, Any]:
    """Flat `section.key` → value of everything in the resolved recipe that shapes the trained weights."""
    sections = {"model": dataclasses.asdict(recipe.model), "data": dataclasses.asdict(recipe.data),
                "lora": recipe.lora.to_dict(), "training": recipe.training.to_dict(),
                "quantization": recipe.quantization.to_dict() if recipe.quantization is not None else {}}
    flat: dict[str, Any] = {"use_qlora": recipe.use_qlora}
    for section, values in sections.items():
        skip = COMPARED_BY_CONTENT.get(section, ()) + NOT_WEIGHTS.get(section, ())
        flat.update({f"{section}.{key}": value for key, value in values.items()
                     if key not in skip and not (section in ("training", "lora") and NEUTRAL.fullmatch(key))})
    return json.loads(json.dumps(flat, sort_keys=True, default=_plain))  # as it reads back from a record


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value).removeprefix("torch.")


def weights_sha256(view: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()


def recipe_sha256(recipe: Recipe) -> str:
    """sha256 of the fully resolved recipe (what `--print-config` prints)."""
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()
