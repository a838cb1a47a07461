"""Which checkpoint a run resumes from, whether anything is left to train, and the command that continues a run.

`--resume` takes the newest complete checkpoint of this run. A run made longer (`training.num_train_epochs=4` after
3 epochs) writes under another directory — the epoch count is part of the layout — so when this run has none, the
newest complete checkpoint of the same model and method under another epoch count whose fingerprint matches is
taken, and the run says where it found it. A run whose last checkpoint ends the run the recipe asks for, with its
adapters saved, has nothing left to train: it says so and writes nothing.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .checkpoints import RECORD, TRAINER_STATE, check_fingerprint, fingerprint, fingerprint_problems, incomplete_reason
from .config import Recipe, RecipeError


def select_checkpoint(recipe: Recipe, resume: str, force: bool = False) -> str:
    """The checkpoint to resume from: `resume` is a directory, or "auto" for the newest complete one of this run
    (incomplete ones are skipped with a notice), else of the same run with another length. Refuses a checkpoint
    made from a different recipe or data unless `force`."""
    if resume != "auto":
        return _given(recipe, Path(resume), force)
    own = _checkpoints(recipe.checkpoint_dir)
    for path in own:
        reason = incomplete_reason(path)
        if reason is None:
            check_fingerprint(path, recipe, force)
            print(f"resuming from {path}")
            return str(path)
        print(f"notice: skipping {path}: incomplete ({reason})")
    if earlier := _other_length(recipe):
        state = json.loads((earlier / TRAINER_STATE).read_text(encoding="utf-8"))
        print(f"resuming from {earlier}: the last complete checkpoint of the same recipe run for "
              f"{_epochs(state)} epochs / {state.get('max_steps')} steps (this run has no checkpoint of its own)")
        return str(earlier)
    found = f"{len(own)} incomplete checkpoint(s)" if own else "no checkpoint"
    raise RecipeError(f"{recipe.checkpoint_dir}: {found} to resume from; train first or pass --resume CHECKPOINT_DIR "
                      "(with --force-resume for an incomplete one)")


def _given(recipe: Recipe, checkpoint: Path, force: bool) -> str:
    if not checkpoint.is_dir():
        raise RecipeError(f"{checkpoint}: checkpoint directory not found; check --resume")
    reason = incomplete_reason(checkpoint)
    if reason and not force:
        raise RecipeError(f"{checkpoint}: incomplete checkpoint ({reason}); pick another or pass --force-resume")
    if reason:
        if not (checkpoint / TRAINER_STATE).is_file():
            raise RecipeError(f"{checkpoint}: not a checkpoint directory (no {TRAINER_STATE}); check --resume")
        print(f"notice: {checkpoint}: {reason}; used anyway (--force-resume)")
    check_fingerprint(checkpoint, recipe, force)
    return str(checkpoint)


def _checkpoints(directory: Path) -> list[Path]:
    """`checkpoint-N` directories under `directory`, highest step first."""
    found = [p for p in directory.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def _other_length(recipe: Recipe) -> Path | None:
    """The highest-step complete checkpoint, with a matching fingerprint, of this model and method under another
    epoch count (`{checkpoint_dir}/{model_name}/*/{method}`); None if there is none."""
    own = recipe.checkpoint_dir
    others = [p for d in own.parent.parent.glob(f"*/{own.name}") if d != own for p in _checkpoints(d)]
    others.sort(key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    return next((p for p in others if incomplete_reason(p) is None and not fingerprint_problems(p, recipe)), None)


def _epochs(state: dict) -> str:
    epochs = state.get("num_train_epochs")
    return str(int(epochs)) if isinstance(epochs, (int, float)) and float(epochs).is_integer() else str(epochs)


def nothing_left(recipe: Recipe, checkpoint: str) -> dict | None:
    """When `checkpoint` is the last step of the run `recipe` asks for (same length, recorded in the checkpoint)
    and the adapters were saved after it: say so, merge if asked and not yet done, return the run's summary.
    None when there is training left."""
    from .report import SUMMARY_FILE

    checkpoint = Path(checkpoint)
    try:
        record = json.loads((checkpoint / RECORD).read_text(encoding="utf-8"))
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        summary = json.loads((recipe.adapters_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    done = state.get("global_step", 0) >= state.get("max_steps", float("inf")) > 0
    if not (done and record.get("length") == fingerprint(recipe)["length"]
            and summary.get("global_step") == state["global_step"]):
        return None
    print(f"nothing left to train: {checkpoint} is the last step ({state['global_step']}) of this recipe's run and "
          f"its adapters are saved in {recipe.adapters_dir}; to train longer raise training.num_train_epochs or "
          "training.max_steps")
    from accelerate import PartialState

    if recipe.output.merge and PartialState().is_main_process:
        from .merge import merge_adapter

        merge_adapter(recipe.adapters_dir, output_dir=recipe.merged_dir, overwrite=True)  # up to date: writes nothing
    return summary


def continue_command(args) -> str:
    """The command that continues a stopped run: this one, with `--resume` (the last complete checkpoint)."""
    from .config import SEED_FLAGS

    flags = [f"--{flag}={value}" for flag in SEED_FLAGS if (value := getattr(args, flag, None)) is not None]
    return shlex.join([sys.executable, "-m", "sft_lora.run", args.recipe, *args.overrides, *flags, "--resume"])
