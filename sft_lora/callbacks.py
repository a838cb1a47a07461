"""Trainer callbacks (README, Reliability): each checkpoint's completion record, written last; on SIGTERM, SIGINT or
SIGHUP a checkpoint at the next step boundary, then exit 128 + the signal (143, 130, 129); a second exits at once."""

import contextlib
import functools
import json
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .atomic import fsync, readable, write_atomic, write_error
from .config import RECIPE_FILE, Recipe, RecipeError
from .fingerprint import RECORD, fingerprint
from .resume import resumable
from .text import first_line


def training_error(exc: Exception, trainer, recipe: Recipe, resumed: str | None) -> RecipeError | None:
    """The one line for what stopped `trainer.train` that the user can mend, else None: a disk full or read-only while
    checkpointing (that checkpoint has no record, so resume skips it), a wandb key the server refuses (wandb.init at
    the first step), a checkpoint file torch refuses to unpickle (its own message advises weights_only=False)."""
    saving = next((c.saving for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointRecord)), None)
    if saving is not None and (reason := write_error(exc)) is not None:
        again = ("with --resume (this incomplete checkpoint is skipped)" if resumed or resumable(recipe) else
                 "(no checkpoint is complete yet)")
        return RecipeError(f"{saving}: could not save the checkpoint ({reason}); free space or fix permissions, "
                           f"then run again {again}")
    if type(exc).__module__.startswith("wandb"):
        return RecipeError(f"wandb: {first_line(exc)}; check WANDB_API_KEY (or `wandb login`) or set wandb.mode: "
                           "offline")
    if type(exc).__name__ == "UnpicklingError" and resumed:  # torch loading weights_only met more than tensors
        return RecipeError(f"{resumed}: a file of this checkpoint holds more than tensors, which may run code, so "
                           "torch refused to load it (never load it with weights_only=False); resume from another "
                           "checkpoint")
    return None


def checkpoint_path(args, step: int) -> Path:  # where Trainer's `_save_checkpoint` saves step's checkpoint
    return Path(args.output_dir) / f"checkpoint-{step}"


class CheckpointRecord(TrainerCallback):
    """Writes `sft_lora_checkpoint.json` into each checkpoint once all its files are on disk (Trainer marks no end):
    each file's size and the run's fingerprint. Resume trusts only checkpoints whose files match their record. The
    resolved recipe goes beside it, so a checkpoint merges and chats as the final adapters do."""

    def __init__(self, recipe: Recipe, counts: dict[str, dict[str, int]] | None = None,
                 taken: dict | None = None) -> None:
        self.recipe, self.counts = recipe, counts or {}  # records by source, for the checkpoint's model card
        # `taken`: the fingerprint taken before the data was read (an edit while preparing is not this run's data)
        self.fingerprint = taken or fingerprint(recipe)
        self.saving: Path | None = None  # the checkpoint being written, between on_step_end and on_save

    def on_step_end(self, args, state, control, **kwargs):
        # A save is about to rewrite this directory (a fresh run over an old one): an old record must not vouch
        # for files that are being replaced. Trainer has no "before save" event; on_step_end is the last one.
        if control.should_save:
            self.saving = checkpoint_path(args, state.global_step)
            if state.is_world_process_zero:
                (self.saving / RECORD).unlink(missing_ok=True)

    on_epoch_end = on_step_end  # an epoch-end save too

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its shards before rank 0 lists them
        if not state.is_world_process_zero:
            return
        from .card import checkpoint_card

        checkpoint = checkpoint_path(args, state.global_step)
        card = checkpoint_card(self.recipe, self.counts, state.log_history, state.global_step, checkpoint)
        write_atomic(checkpoint / "README.md", card)  # not PEFT's blank template
        write_atomic(checkpoint / RECIPE_FILE, self.recipe.to_yaml())  # merge and chat read it, as of the adapters
        files = {}
        own = (RECORD, RECORD.replace(".json", ".tmp-"))  # and a killed writer's leftover, which the write removes
        for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and not p.name.startswith(own)):
            readable(path)  # Trainer's weights come 0600 from safetensors; as the umask says, like every file
            fsync(path)
            files[str(path.relative_to(checkpoint))] = path.stat().st_size
        record = {"step": state.global_step, **self.fingerprint, "files": files}
        write_atomic(checkpoint / RECORD, json.dumps(record, indent=1, default=str) + "\n")
        fsync(checkpoint)
        self.saving = None


class RecipeWinsOnResume(TrainerCallback):
    """On resume, the recipe's logging/eval/save cadence and schedule length apply (README, Reliability): Trainer
    restores the cadence from the checkpoint's trainer_state.json, and the optimizer's learning rate as the old
    schedule left it (0 at the end of a finished run), which the first step of an extended run would train at."""

    def __init__(self, checkpoint_max_steps: int | None = None) -> None:
        self.checkpoint_max_steps = checkpoint_max_steps  # the last step of the run the resumed checkpoint belongs to

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if not state.global_step:
            return
        if state.global_step == state.max_steps == self.checkpoint_max_steps:  # this run's last checkpoint: Trainer
            raise AtTheEnd  # would train one step more where the end is not at an epoch's end (step 51 of 50)
        if state.global_step >= state.max_steps:  # a longer run's weights would be saved as this run's
            raise PastTheEnd(f"the checkpoint resumed from is at step {state.global_step} of a "
                             f"{self.checkpoint_max_steps}-step run, past this run's last step ({state.max_steps}); "
                             "pass --resume with an earlier checkpoint, or train from the start without --resume")
        state.compute_steps(args, state.max_steps)  # what Trainer computes from args on a fresh start
        if isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):  # each schedule transformers builds by name
            lr_scheduler.last_epoch -= 1  # this step's rate again, from the schedule's rule under the new length
            lr_scheduler.step()


class PastTheEnd(RecipeError):
    """A resume from a checkpoint beyond the run's length; raised before any step, so no continue command."""

    training_started = False


class AtTheEnd(Exception):
    """A resume from the run's own last checkpoint: nothing to train, its adapters still to save."""


# SIGHUP too: a closed terminal or ssh session (training started without nohup) lost the run, with no checkpoint
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving `checkpoint` at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}")


class GracefulStop(TrainerCallback):
    """Installs the handlers for the length of `Trainer.train` (Python's defaults apply outside it)."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal this process received
        self.stopped: int | None = None  # the signal training stops on: every rank's at the same step
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS
                              if signal.getsignal(sig) is not signal.SIG_IGN}  # `nohup`: SIGHUP stays ignored

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        # os.write, not print: a handler may interrupt a print in progress, and print is not reentrant.
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\n{name} again: exiting now without saving\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":  # a Ctrl-C reaches every rank: said once
            os.write(2, f"\n{name}: saving a checkpoint after this step, then stopping (again to exit now)\n".encode())

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.signum
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Any process's signal stops every rank at the same step: the save is a collective under ZeRO. The reduced
            # flag alone decides: a signal handled just after the collective waits for the next step's (read from
            # `signum` here, it stopped that rank alone, and the others hung in the next step's collective).
            flag = torch.tensor([stop or 0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = int(flag.item()) or None
        if stop is not None:
            self.stopped = stop
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # Trainer evaluates before it saves: a preemption's grace may not last

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped is not None:  # the stopped epoch's end: saved already, no evaluation on the way out
            control.should_evaluate = False


def parent_stops_workers(loader):
    """The DataLoader's workers let the first stop signal pass: one sent to the whole process group (scancel, systemd,
    a closed terminal) killed them, and training with them ("DataLoader worker killed"), with no checkpoint. The
    parent stops at the step boundary and ends them; a second signal ends them as by default."""
    base = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper hands its attributes through
    # once: Trainer hands a persistent-workers eval loader out again at each evaluation
    if base.num_workers and getattr(base.worker_init_fn, "func", None) is not _worker_passes_stop_signals:
        base.worker_init_fn = functools.partial(_worker_passes_stop_signals, base.worker_init_fn)
        if (base.multiprocessing_context or multiprocessing.get_context()).get_start_method() == "fork":
            base.multiprocessing_context = _SignalsHeldAtFork()
    return loader


class _SignalsHeldProcess(multiprocessing.context.ForkProcess):
    def start(self) -> None:
        # held from the fork until the worker's init takes them: torch's own SIGTERM handler, set as the worker
        # starts, dies of any SIGTERM that is not the parent's
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


class _SignalsHeldAtFork(multiprocessing.context.ForkContext):
    Process = _SignalsHeldProcess


def _worker_passes_stop_signals(init, worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup`: SIGHUP stays ignored
            signal.signal(sig, _default_from_now_on)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if init is not None:
        init(worker_id)


def _default_from_now_on(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)


@contextlib.contextmanager
def interruptible(trainer) -> Iterator[None]:
    """Around `trainer.train()`: restores Python's handlers even when training fails (on_train_end does not), then
    raises TrainingInterrupted if it stopped on a signal (a checkpoint is saved; nothing final may be written)."""
    stop = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GracefulStop))
    try:
        yield
    finally:
        stop.restore()
    if stop.stopped is not None:
        step = trainer.state.global_step
        raise TrainingInterrupted(stop.stopped, step, checkpoint_path(trainer.args, step))
