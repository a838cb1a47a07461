"""Resume: the fingerprint of what shapes a run's weights, the checkpoints whose completion record vouches for them,
which one a run resumes from (also a shorter run's), whether anything is left to train (README, Reliability)."""

import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .config import Recipe, RecipeError
from .data import entries

RECORD = "sft_lora_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
# The SFTConfig/LoraConfig fields that cannot change what a step computes, told apart by their family's name (so a
# new field of a family needs no change here): writing, logging, evaluating, the run's length (extending a run is
# the point of resuming), worker plumbing, activation checkpointing (it recomputes the same values).
NEUTRAL = re.compile(
    r"output_dir|run_name|project|report_to|disable_tqdm|push_to_hub|resume_from_checkpoint|peft_version"
    r"|(save|hub|logging|log|trackio)_\w+"  # writing, logging
    r"|(eval|do|per_device_eval|batch_eval|prediction|metric_for|greater_is|load_best|include)_\w+|\w+_full_eval"
    r"|max_steps|num_train_epochs"  # the run's length
    r"|dataloader_(num_workers|pin_memory|persistent_workers|prefetch_factor)|local_rank|ddp_timeout"
    r"|(activation|gradient)_checkpointing\w*|skip_memory_metrics")
NOT_WEIGHTS = {"data": ("path", "eval_path", "chat_template"), "model": ("name",)}  # paths: compared by content


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of every file under a directory (sorted by relative path)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return _sha256(str(path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


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


def named_or_hashed(path: str) -> str:
    return file_sha256(path) if Path(path).exists() else f"hub:{path}"  # a hub id is named, not hashed


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()


def weights_view(recipe: Recipe) -> dict[str, Any]:
    """Flat `section.key` → value of everything in the resolved recipe that shapes the trained weights, upstream
    defaults included (a changed default is noticed too); `output`, `wandb`, `check` and `report` do not."""
    sections = {"model": dataclasses.asdict(recipe.model), "data": dataclasses.asdict(recipe.data),
                "lora": recipe.lora.to_dict(), "training": recipe.training.to_dict(),
                "quantization": recipe.quantization.to_dict() if recipe.quantization is not None else {}}
    # the processes: with the per-device batch they make the global batch, so a step's data and the steps an epoch
    flat: dict[str, Any] = {"use_qlora": recipe.use_qlora, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    for section, values in sections.items():
        flat.update({f"{section}.{key}": value for key, value in values.items() if key not in
                     NOT_WEIGHTS.get(section, ()) and not (section in ("training", "lora") and NEUTRAL.fullmatch(key))})
    return json.loads(json.dumps(flat, sort_keys=True, default=lambda value: sorted(value, key=str)  # as a record
                                 if isinstance(value, (set, frozenset)) else str(value).removeprefix("torch.")))


def fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What a checkpoint records about the run that made it: the weights' view, the sha256 of every file the recipe
    points at (a list of data entries: its entries' hashes joined, with any weight or source), and the length."""
    files = {f"data.{key}": "+".join(named_or_hashed(e.path) + ("" if (e.weight, e.source) == (1, None)
                                                                 else f"*{e.weight:g}@{e.source}")
                                     + (f"/{e.split}" if e.split else "") for e in entries(getattr(recipe.data, key)))
             for key in ("path", "eval_path") if getattr(recipe.data, key)}
    if recipe.data.chat_template:
        files["data.chat_template"] = named_or_hashed(recipe.data.chat_template)
    return {"recipe_sha256": recipe_sha256(recipe), "files_sha256": files, "weights_view": weights_view(recipe),
            "length": {"max_steps": recipe.training.max_steps, "num_train_epochs": recipe.training.num_train_epochs}}


def incomplete_reason(checkpoint: str | Path) -> str | None:
    """Why a checkpoint directory cannot be trusted, or None when its record and files agree."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / RECORD).is_file():
        return f"no {RECORD} (the run stopped while saving it, or it predates sft_lora's records)"
    try:
        files: dict[str, int] = json.loads((checkpoint / RECORD).read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return f"{RECORD} is unreadable"
    for name, size in files.items():
        if not (path := checkpoint / name).is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were saved"
    if TRAINER_STATE not in files or not any(w in files for w in WEIGHTS):
        return f"{RECORD} lists no {TRAINER_STATE} or weights"
    return None


def check_fingerprint(checkpoint: Path, recipe: Recipe, force: bool = False) -> None:
    """Refuse (RecipeError) a checkpoint whose recorded recipe or data differs from `recipe`'s, unless `force`."""
    if problems := fingerprint_problems(checkpoint, recipe):
        message = f"{checkpoint}: made from {' and '.join(problems)}"
        if not force:
            raise RecipeError(f"{message}; resume with the recipe and data it was made from, or pass --force-resume")
        print(f"notice: {message}; resuming anyway (--force-resume)")


def fingerprint_problems(checkpoint: Path, recipe: Recipe) -> list[str]:
    """How the recorded recipe and data differ from `recipe`'s ([] when they match or none is recorded)."""
    if not (checkpoint / RECORD).is_file():
        return []  # only reachable with force: nothing recorded to compare
    saved, now = json.loads((checkpoint / RECORD).read_text(encoding="utf-8")), fingerprint(recipe)
    problems = []
    old, new = {"world_size": 1, **saved.get("weights_view", {})}, now["weights_view"]  # records before world_size
    if keys := sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>")):
        shown = ", ".join(f"{k}: {_short(old.get(k, '<unset>'))} -> {_short(new.get(k, '<unset>'))}"
                          for k in keys[:3])
        problems.append(f"a different recipe ({shown}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''})")
    old_files, new_files = saved.get("files_sha256", {}), now["files_sha256"]
    for what, keys in (("different data", ("data.path", "data.eval_path")),
                       ("a different chat template", ("data.chat_template",))):
        then, now_ = [old_files[k] for k in keys if k in old_files], [new_files[k] for k in keys if k in new_files]
        if then != now_:
            problems.append(f"{what} (sha256 {', '.join(h[:12] for h in then)} then, "
                            f"{', '.join(h[:12] for h in now_)} now)")
    return problems


def _short(value: Any) -> str:
    return text if len(text := repr(value)) <= 40 else text[:37] + "..."


def select_checkpoint(recipe: Recipe, resume: str, force: bool = False) -> str:
    """The checkpoint to resume from: `resume` is a directory, or "auto" for the newest complete one of this run
    (incomplete ones are skipped with a notice), else of the same model and method under a smaller epoch count (a run
    made longer writes elsewhere). Refuses a checkpoint made from a different recipe or data unless `force`."""
    if resume != "auto":
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise RecipeError(f"{checkpoint}: checkpoint directory not found; check --resume")
        if (reason := incomplete_reason(checkpoint)) and not (checkpoint / TRAINER_STATE).is_file():
            raise RecipeError(f"{checkpoint}: not a checkpoint directory (no {TRAINER_STATE}); check --resume")
        if reason and not force:
            raise RecipeError(f"{checkpoint}: incomplete checkpoint ({reason}); pick another or pass --force-resume")
        if reason:
            print(f"notice: {checkpoint}: {reason}; used anyway (--force-resume)")
        check_fingerprint(checkpoint, recipe, force)
        return str(checkpoint)
    mine = recipe.checkpoint_dir
    own = _checkpoints(mine)
    for path in own:
        if (reason := incomplete_reason(path)) is None:
            check_fingerprint(path, recipe, force)
            print(f"resuming from {path}")
            return str(path)
        print(f"notice: skipping {path}: incomplete ({reason})")
    epochs, others = _epochs(mine.parent.name), [d for d in mine.parent.parent.glob(f"*/{mine.name}") if d != mine]
    for earlier in _checkpoints(*(d for d in others if _epochs(d.parent.name) < epochs)):  # a longer run's: past it
        if incomplete_reason(earlier) is None and not fingerprint_problems(earlier, recipe):
            state = checkpoint_state(earlier)  # Trainer's counts are ints
            print(f"resuming from {earlier}: the last complete checkpoint of the same recipe run for "
                  f"{state.get('num_train_epochs')} epochs / {state.get('max_steps')} steps (this run has no "
                  "checkpoint of its own)")
            return str(earlier)
    found = f"{len(own)} incomplete checkpoint(s)" if own else "no checkpoint"
    if longer := [d for d in others if _epochs(d.parent.name) > epochs and _checkpoints(d)]:
        raise RecipeError(f"{mine}: {found} to resume from; {longer[0]} holds a run of this model for "
                          f"{longer[0].parent.name} epochs, whose checkpoints are past this run's end (resuming "
                          "would save its weights as this run's); train from the start without --resume")
    raise RecipeError(f"{mine}: {found} to resume from; train first or pass --resume CHECKPOINT_DIR "
                      "(with --force-resume for an incomplete one)")


def check_fresh_start(recipe: Recipe) -> None:
    """Refuse a fresh run (no --resume) into a checkpoint directory holding another recipe's or data's checkpoints:
    it would write over some and leave the rest for --resume to pick. The same recipe's are written over."""
    for checkpoint in _checkpoints(recipe.checkpoint_dir):
        if problems := fingerprint_problems(checkpoint, recipe):
            raise RecipeError(f"{recipe.checkpoint_dir}: holds checkpoints of another run ({checkpoint.name}: made "
                              f"from {' and '.join(problems)}), which this run would mix with its own; continue that "
                              "run with --resume and its recipe, set output.checkpoint_dir, or remove them")


def resumable(recipe: Recipe) -> bool:
    """Whether `--resume` finds a complete checkpoint of this run's own (else it fails: no continue command)."""
    return any(incomplete_reason(path) is None for path in _checkpoints(recipe.checkpoint_dir))


def _epochs(name: str) -> float:  # of a run directory's name (`recipe.run_dir`)
    try:
        return float(name)
    except ValueError:
        return float("inf")


def _checkpoints(*directories: Path) -> list[Path]:  # highest step first
    found = [p for d in directories for p in d.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def checkpoint_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json (its step, its run's max_steps …); {} when unreadable."""
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def nothing_left(recipe: Recipe, checkpoint: str) -> dict | None:
    """When `checkpoint` ends the run `recipe` asks for (same recorded length) and the adapters were saved after it:
    say so, merge if asked and not yet done, return the run's summary; None when there is training left."""
    from accelerate import PartialState

    from .merge import merge_adapter
    from .outputs import remove_stale_merge
    from .report import SUMMARY_FILE

    checkpoint = Path(checkpoint)
    try:
        record = json.loads((checkpoint / RECORD).read_text(encoding="utf-8"))
        summary = json.loads((recipe.adapters_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    state = checkpoint_state(checkpoint)
    done = state.get("global_step", 0) >= state.get("max_steps", float("inf")) > 0
    if not (done and record.get("length") == fingerprint(recipe)["length"]
            and summary.get("global_step") == state["global_step"]):
        return None
    print(f"nothing left to train: {checkpoint} is the last step ({state['global_step']}) of this recipe's run and "
          f"its adapters are saved in {recipe.adapters_dir}; to train longer raise training.num_train_epochs or "
          "training.max_steps")
    if recipe.output.merge and PartialState().is_main_process:
        merge_adapter(recipe.adapters_dir, output_dir=recipe.merged_dir, overwrite=True)  # up to date: writes nothing
    elif PartialState().is_main_process:
        remove_stale_merge(recipe)
    return summary

