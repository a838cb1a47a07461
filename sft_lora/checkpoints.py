"""Checkpoints that can be trusted on resume: a completion record written last, and the run's fingerprint in it.

Trainer writes a checkpoint file by file, with nothing that marks the end (a process killed while saving leaves a
directory that looks like any other). `CheckpointRecord` writes `sft_lora_checkpoint.json` after every file of
the checkpoint is on disk: the size of each file, and the fingerprint of the recipe and data the checkpoint was
made from. Resume uses only checkpoints whose record is present and whose files match it, and refuses one made
from a different recipe or data unless forced.

What must match on resume is what shapes the weights (`fingerprint.py`): the resolved configuration's values
and the content of every file the recipe points at; everything else — outputs, logging, save cadence, the run's
length, the data's path — may change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .config import Recipe, RecipeError
from .outputs import fsync, readable, write_atomic

RECORD = "sft_lora_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What a checkpoint records about the run that made it."""
    from .fingerprint import files_sha256, recipe_sha256, weights_sha256, weights_view

    view = weights_view(recipe)
    length = {"max_steps": recipe.training.max_steps, "num_train_epochs": recipe.training.num_train_epochs}
    return {"recipe_sha256": recipe_sha256(recipe), "weights_sha256": weights_sha256(view),
            "files_sha256": files_sha256(recipe), "weights_view": view, "length": length}


class CheckpointRecord(TrainerCallback):
    """Writes `sft_lora_checkpoint.json` into each checkpoint once all its files are saved (see module doc)."""

    def __init__(self, recipe: Recipe, counts: dict[str, dict[str, int]] | None = None) -> None:
        self.recipe, self.counts = recipe, counts or {}  # records by source, for the checkpoint's model card
        self.fingerprint = fingerprint(recipe)
        self.saving: Path | None = None  # the checkpoint being written, between on_step_end and on_save

    def on_step_end(self, args, state, control, **kwargs):
        self._invalidate_if_saving(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._invalidate_if_saving(args, state, control)

    def _invalidate_if_saving(self, args, state, control) -> None:
        # A save is about to rewrite this directory (a fresh run over an old one): an old record must not vouch
        # for files that are being replaced. Trainer has no "before save" event; on_step_end is the last one.
        if control.should_save:
            self.saving = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero:
                (self.saving / RECORD).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its shards before rank 0 lists them
        if not state.is_world_process_zero:
            return
        from .report import checkpoint_card

        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        write_atomic(checkpoint / "README.md", checkpoint_card(self.recipe, self.counts, state.log_history,
                                                               state.global_step))  # not PEFT's blank template
        files = {}
        for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != RECORD):
            readable(path)  # Trainer's weights come 0600 from safetensors; as the umask says, like every file
            fsync(path)
            files[str(path.relative_to(checkpoint))] = path.stat().st_size
        record = {"step": state.global_step, **self.fingerprint, "files": files}
        write_atomic(checkpoint / RECORD, json.dumps(record, indent=1, default=str) + "\n")
        fsync(checkpoint)
        self.saving = None


def save_failure(trainer, exc: BaseException) -> RecipeError | None:
    """A one-line error when `exc` escaped `trainer.train()` because a checkpoint could not be written (disk full,
    read-only); None for any other error. The checkpoint it leaves has no record, so resume skips it."""
    from .outputs import write_error

    record = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CheckpointRecord)), None)
    reason = write_error(exc)
    if record is None or record.saving is None or reason is None:
        return None
    return RecipeError(f"{record.saving}: could not save the checkpoint ({reason}); free space or fix permissions, "
                       "then run again with --resume (this incomplete checkpoint is skipped)")


def incomplete_reason(checkpoint: str | Path) -> str | None:
    """Why a checkpoint directory cannot be trusted, or None when its record and files agree."""
    checkpoint = Path(checkpoint)
    record_path = checkpoint / RECORD
    if not record_path.is_file():
        return f"no {RECORD} (the run stopped while saving it, or it predates sft_lora's records)"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        files: dict[str, int] = record["files"]
    except (ValueError, KeyError, TypeError):
        return f"{RECORD} is unreadable"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were saved"
    if TRAINER_STATE not in files or not any(w in files for w in WEIGHTS):
        return f"{RECORD} lists no {TRAINER_STATE} or weights"
    return None


def check_fingerprint(checkpoint: Path, recipe: Recipe, force: bool = False) -> None:
    """Refuse (RecipeError) a checkpoint whose recorded recipe or data differs from `recipe`'s, unless `force`."""
    problems = fingerprint_problems(checkpoint, recipe)
    if not problems:
        return
    message = f"{checkpoint}: made from {' and '.join(problems)}"
    if force:
        print(f"notice: {message}; resuming anyway (--force-resume)")
        return
    raise RecipeError(f"{message}; resume with the recipe and data it was made from, or pass --force-resume")


def fingerprint_problems(checkpoint: Path, recipe: Recipe) -> list[str]:
    """How the recipe and data a checkpoint recorded differ from `recipe`'s ([] when they match or none is
    recorded)."""
    record_path = checkpoint / RECORD
    if not record_path.is_file():
        return []  # only reachable with force: nothing recorded to compare
    saved = json.loads(record_path.read_text(encoding="utf-8"))
    now = fingerprint(recipe)
    problems = []
    if saved.get("weights_sha256") != now["weights_sha256"]:
        old, new = saved.get("weights_view", {}), now["weights_view"]
        keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
        shown = ", ".join(f"{k}: {_short(old.get(k, '<unset>'))} -> {_short(new.get(k, '<unset>'))}"
                          for k in keys[:3])
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        problems.append(f"a different recipe ({shown}{more})")
    old_files, new_files = saved.get("files_sha256", {}), now["files_sha256"]
    for what, keys in (("different data", ("data.path", "data.eval_path")),
                       ("a different chat template", ("data.chat_template",))):
        then, now_ = [old_files[k] for k in keys if k in old_files], [new_files[k] for k in keys if k in new_files]
        if then != now_:
            problems.append(f"{what} (sha256 {', '.join(h[:12] for h in then)} then, "
                            f"{', '.join(h[:12] for h in now_)} now)")
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
