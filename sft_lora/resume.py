"""Resume: the checkpoints whose completion record vouches for them (`fingerprint.py` says what for), which one a run
resumes from (also a shorter run's), whether anything is left to train (README, Reliability)."""

from pathlib import Path
from typing import Any

from .atomic import read_json
from .config import Recipe, RecipeError
from .fingerprint import RECORD, check_fingerprint, fingerprint_problems, run_length
from .text import say

TRAINER_STATE = "trainer_state.json"
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def incomplete_reason(checkpoint: str | Path) -> str | None:
    """Why a checkpoint directory cannot be trusted, or None when its record and files agree."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / RECORD).is_file():
        return f"no {RECORD} (the run stopped while saving it, or it predates sft_lora's records)"
    if not isinstance(files := read_json(checkpoint / RECORD).get("files"), dict):
        return f"{RECORD} is unreadable"
    for name, size in files.items():
        if not (path := checkpoint / name).is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were saved"
    if TRAINER_STATE not in files or not any(w in files for w in WEIGHTS):
        return f"{RECORD} lists no {TRAINER_STATE} or weights"
    return None


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
            say(f"notice: {checkpoint}: {reason}; used anyway (--force-resume)")
        check_fingerprint(checkpoint, recipe, force)
        return str(checkpoint)
    mine = recipe.checkpoint_dir
    own = _checkpoints(mine)
    for path in own:
        if (reason := incomplete_reason(path)) is None:
            check_fingerprint(path, recipe, force)
            say(f"resuming from {path}")
            return str(path)
        say(f"notice: skipping {path}: incomplete ({reason})")
    epochs, others = _epochs(mine.parent.name), [d for d in mine.parent.parent.glob(f"*/{mine.name}") if d != mine]
    for earlier in _checkpoints(*(d for d in others if _epochs(d.parent.name) < epochs)):  # a longer run's: past it
        if incomplete_reason(earlier) is None and not fingerprint_problems(earlier, recipe):
            state = checkpoint_state(earlier)  # Trainer's counts are ints
            say(f"resuming from {earlier}: the last complete checkpoint of the same recipe run for "
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


def check_full_state(checkpoint: str, force: bool) -> None:
    """Refuse, unless `force`, a checkpoint of weights alone (`training.save_only_model`): Trainer resumed it with a
    fresh optimizer and schedule, silently, a run unlike the one it continues."""
    files = read_json(Path(checkpoint) / RECORD).get("files") or {}
    if not files or any("optimizer" in name or name.startswith("global_step") for name in files):  # ZeRO's dirs
        return
    message = f"{checkpoint}: saved with training.save_only_model (weights alone, no optimizer or schedule state)"
    if not force:
        raise RecipeError(f"{message}, so a resume would not continue the run; train from the start, or pass "
                          "--force-resume to go on with a fresh optimizer")
    say(f"notice: {message}; resuming with a fresh optimizer (--force-resume)")


def check_template(checkpoint: str | None, tokenizer, force: bool) -> None:
    """Refuse a checkpoint whose saved chat template is not the one this run renders, unless `force`: the fingerprint
    hashes template files, not sft_lora's default template, which an upgrade may change (a BOS added in front)."""
    saved = Path(checkpoint or "") / "chat_template.jinja"
    if not (checkpoint and saved.is_file() and isinstance(tokenizer.chat_template, str)) or saved.read_text(
            encoding="utf-8") == tokenizer.chat_template:
        return
    message = f"{checkpoint}: trained on another chat template than this run renders (sft_lora's default changed?)"
    if not force:
        raise RecipeError(f"{message}; pass --force-resume to go on with this one, and data.chat_template set to "
                          f"a copy of {saved} (outside the checkpoints) too to go on with the one it trained on")
    say(f"notice: {message}; resuming anyway (--force-resume)")


def check_fresh_start(recipe: Recipe) -> None:
    """Refuse a fresh run (no --resume) into a checkpoint directory holding another recipe's or data's checkpoints:
    it would write over some and leave the rest for --resume to pick. The same recipe's are written over, unless run
    for another length (a longer run's later checkpoints, on another schedule, were resumed from after a kill)."""
    length = run_length(recipe)
    for checkpoint in _checkpoints(recipe.checkpoint_dir):
        problems = fingerprint_problems(checkpoint, recipe)
        if (then := checkpoint_state(checkpoint, RECORD).get("length") or length) != length:
            changed = (f"training.{k}: {then.get(k)} -> {v}" for k, v in length.items() if then.get(k) != v)
            problems.append(f"a run of another length ({', '.join(changed)})")
        if problems:
            launch = " and accelerate config" if any(p.startswith("another launch") for p in problems) else ""
            raise RecipeError(f"{recipe.checkpoint_dir}: holds checkpoints of another run ({checkpoint.name}: made "
                              f"from {' and '.join(problems)}), which this run would mix with its own; continue that "
                              f"run with --resume and its recipe{launch}, set output.checkpoint_dir, or remove them")


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


def checkpoint_state(checkpoint: str | Path, name: str = TRAINER_STATE) -> dict[str, Any]:
    """A checkpoint's trainer_state.json (its step, its run's max_steps …), or its completion record (`RECORD`);
    {} when there is none or it is unreadable."""
    return read_json(Path(checkpoint) / name)


def finished(recipe: Recipe, checkpoint: str) -> bool:
    """Whether `checkpoint` ends the run `recipe` asks for (same recorded length) and the adapters were saved after
    it."""
    from .report import SUMMARY_FILE

    record, state = checkpoint_state(checkpoint, RECORD), checkpoint_state(checkpoint)
    summary = read_json(recipe.adapters_dir / SUMMARY_FILE)  # {}: none, so not saved after it
    done = state.get("global_step", 0) >= state.get("max_steps", float("inf")) > 0
    return done and record.get("length") == run_length(recipe) and summary.get("global_step") == state["global_step"]


def nothing_left(recipe: Recipe, checkpoint: str, force: bool = False) -> dict | None:
    """When `checkpoint` ends the run `recipe` asks for (same recorded length) and the adapters were saved after it:
    say so, merge if asked and not yet done, return the run's summary; None when there is training left (from a
    checkpoint with its optimizer's state: `check_full_state`)."""
    from accelerate import PartialState

    from .merge import merge_adapter
    from .outputs import remove_stale_merge
    from .report import SUMMARY_FILE

    if not finished(recipe, checkpoint):
        check_full_state(checkpoint, force)
        return None
    state = checkpoint_state(checkpoint)
    summary = read_json(recipe.adapters_dir / SUMMARY_FILE)
    say(f"nothing left to train: {checkpoint} is the last step ({state['global_step']}) of this recipe's run and "
          f"its adapters are saved in {recipe.adapters_dir}; to train longer raise training.num_train_epochs or "
          "training.max_steps")
    if recipe.output.merge and PartialState().is_main_process:
        merge_adapter(recipe.adapters_dir, output_dir=recipe.merged_dir, overwrite=True,
                      trust_remote_code=recipe.model.trust_remote_code)  # up to date: writes nothing
    elif PartialState().is_main_process:
        remove_stale_merge(recipe)
    return summary

