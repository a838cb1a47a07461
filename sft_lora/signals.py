"""SIGTERM/SIGINT during training: checkpoint at the next step boundary and stop; a second signal exits at once.

Preemption (SLURM, Kubernetes, spot instances) sends SIGTERM and waits a grace period; Ctrl-C sends SIGINT.
The first signal lets the current optimiser step finish, saves a normal checkpoint (with its completion record)
and ends training; `run.main` then exits with 128 + the signal number — 143 for SIGTERM, 130 for SIGINT, the
codes shells and schedulers already use for "terminated by this signal". A second signal exits at once with the
same code; a checkpoint it cuts short has no completion record and is skipped on resume.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from transformers import TrainerCallback

HANDLED = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The process exit code for a run stopped by `signum`: 128 + signum (SIGINT 130, SIGTERM 143)."""
    return 128 + signum


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving `checkpoint` at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to "
                         f"{checkpoint}")


class GracefulStop(TrainerCallback):
    """Installs the handlers for the length of `Trainer.train` (Python's defaults apply outside it)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED}

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\n{name} again: exiting now without saving\n".encode())
            os._exit(exit_code(signum))
        self.signum = signum
        # os.write, not print: a handler may interrupt a print in progress, and print is not reentrant.
        os.write(2, f"\n{name}: saving a checkpoint after this step, then stopping (again to exit now)\n".encode())

    def on_step_end(self, args, state, control, **kwargs):
        if self._requested(args):
            control.should_save = True
            control.should_training_stop = True

    def _requested(self, args) -> bool:
        """Whether any process got a signal: every rank must save (a collective under ZeRO) at the same step."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.signum is None and int(flag.item()):
            self.signum = int(flag.item())
        return self.signum is not None



@contextlib.contextmanager
def interruptible(trainer) -> Iterator[None]:
    """Around `trainer.train()`: afterwards, raise TrainingInterrupted if it stopped on a signal (its checkpoint
    is saved; the run is not finished, so nothing final may be written). Restores Python's handlers even when
    training fails, which Trainer's on_train_end does not cover."""
    stop = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GracefulStop))
    try:
        yield
    finally:
        stop.restore()
    if stop.signum is not None:
        step = trainer.state.global_step
        raise TrainingInterrupted(stop.signum, step, os.path.join(trainer.args.output_dir, f"checkpoint-{step}"))
