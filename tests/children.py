"""Real child processes for the kill, signal and secret tests, started cheaply.

A `python -m sft_lora.run` process spends ~8 s importing torch/transformers/TRL before its first step. The
children here fork from a multiprocessing *forkserver* that has done those imports once (and never run a torch
op, so forking it is safe): each child is a separate process that runs `sft_lora.run.main` and can be sent any
signal, SIGKILL included, at a fraction of the cost.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

_CONTEXT = None


def context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["tests._preload"])
    return _CONTEXT


def _run_main(argv: list[str], out: str, env: dict[str, str], setup: Callable[[], None] | None) -> None:
    os.environ.update(env)
    for fd, path in ((1, out + ".out"), (2, out + ".err")):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered: the parent watches the steps
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch

    # One thread: on a shared CPU, OpenMP threads spinning against other processes make a step ~10x slower, and
    # every run compared in a test must use the same thread count to be bitwise comparable.
    torch.set_num_threads(1)
    if setup is not None:
        setup()
    from sft_lora.run import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Child:
    """`python -m sft_lora.run ARGV` in a child process; stdout and stderr go to `{log}.out` / `{log}.err`."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 setup: Callable[[], None] | None = None) -> None:
        self.log = str(log)
        self.process = context().Process(target=_run_main, args=(argv, self.log, env or {}, setup))
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def out(self) -> str:
        return _read(self.log + ".out")

    def err(self) -> str:
        return _read(self.log + ".err")

    def steps_done(self) -> int:
        """Optimiser steps finished so far (Trainer prints one log line per step with logging_steps=1)."""
        return len(re.findall(r"^\{'loss'", self.out(), flags=re.M))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 300) -> bool:
        """Poll until `predicate()` or the child exits; True when the predicate held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if not self.process.is_alive():
                return predicate()
            time.sleep(0.005)
        raise TimeoutError(f"child {self.pid} neither finished nor reached the condition in {timeout} s")

    def join(self, timeout: float = 300) -> int:
        """Wait for the exit; the exit code (negative: killed by that signal)."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            raise TimeoutError(f"child {self.pid} still running after {timeout} s:\n{self.err()[-2000:]}")
        return self.process.exitcode


def run(argv: list[str], log: Path, env: dict[str, str] | None = None,
        setup: Callable[[], None] | None = None) -> tuple[int, Child]:
    child = Child(argv, log, env, setup)
    return child.join(), child


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
