"""Every file and directory sft_lora writes, written whole: built in a temporary sibling (`<name>.tmp-PID`), flushed,
then renamed over the old one, so a crash leaves the old output or none, never half of one; a write that fails is said
in one line (disk full, read-only)."""

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from .config import RecipeError
from .text import first_line

PARTIAL = ".sft_lora_partial"  # marks a temporary directory being filled (removed before the rename)


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `final` (only if `overwrite`), or what `final`
    links to: a link (to a bigger disk) is written through and kept."""
    final = Path(os.path.realpath(final)) if Path(final).is_symlink() else Path(final)
    check_target(final, overwrite=overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecipeError(f"{final.parent}: cannot create the output directory ({exc.strerror})") from None
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for left in _left_by_dead_writers(final):  # GBs of a killed merge; never a directory of the user's (unmarked)
        if (left / PARTIAL).is_file():
            shutil.rmtree(left, ignore_errors=True)
    try:
        tmp.mkdir()
        (tmp / PARTIAL).touch()
        yield tmp
        (tmp / PARTIAL).unlink()
        for path in filter(Path.is_file, tmp.rglob("*")):
            readable(path)
        old = final.rename(final.with_name(f"{final.name}.old-{os.getpid()}")) if final.exists() else None
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception) or (reason := write_error(exc)) is None:
            raise
        raise RecipeError(f"{final}: could not write ({reason}); check free space and permissions") from None


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is flushed to disk and replaces `final`."""
    final = Path(final)
    tmp = final.with_name(f"{final.stem}.tmp-{os.getpid()}{final.suffix}")  # same suffix: writers pick the format
    for left in _left_by_dead_writers(final, final.suffix):  # a checkpoint's record listed it among its files
        left.unlink(missing_ok=True)
    try:
        yield tmp
        readable(tmp)
        fsync(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside the training loop, raised as Ctrl-C is, so the writers above remove what they had
    begun (Python's default ends the process on the spot: a killed merge left its GBs until the next merge)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    def __reduce__(self):  # pickled and copied by its number, not its message
        return Interrupted, (self.signum,)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT raise Interrupted while inside (the training loop installs its own stop handlers);
    in a forked worker they end it as by default (Python's KeyboardInterrupt printed each worker's traceback)."""
    owner = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != owner:  # a forked worker (datasets' map pool): ended as by default, or the pool hangs
            _remove_own_tempfiles()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Interrupted(signum)
    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works only there
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
                if main_thread and signal.getsignal(sig) is not signal.SIG_IGN}  # nohup's SIGHUP stays ignored
    try:
        yield
    except Exception as exc:  # raised while a library cleaned up after the signal (datasets' worker pool): the signal
        if (signalled := interrupt_in(exc)) is None:
            raise
        signalled.training_started = getattr(exc, "training_started", False)  # run's mark (its command continues)
        raise signalled from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _remove_own_tempfiles() -> None:
    """Remove the files this process has open for writing under `tempfile`'s names (tmp + 8 characters): a signalled
    datasets map worker's unfinished shard in the prepared-data cache, which its death left (GBs for a large set)."""
    for fd in glob.glob("/proc/self/fd/*"):  # Linux; elsewhere nothing is found
        with contextlib.suppress(OSError, ValueError):
            flags = int(Path(fd.replace("/fd/", "/fdinfo/")).read_text().split("flags:")[1].split()[0], 8)
            path = os.readlink(fd)
            if flags & (os.O_WRONLY | os.O_RDWR) and re.fullmatch(r"tmp[a-z0-9_]{8}", os.path.basename(path)):
                os.unlink(path)


def interrupt_in(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C, SIGTERM or SIGHUP that `exc` was raised while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__context__
    return None


def write_atomic(final: str | Path, text: str) -> None:
    with atomic_file(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | Path) -> dict:
    """A JSON object written here (a record, a state, a summary); {} when there is none or it is unreadable."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def readable(path: str | Path) -> None:
    """The mode the user's umask asks for (0644 under 022): safetensors writes 0600, unreadable to teammates."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def fsync(path: str | Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target(final: str | Path, *, overwrite: bool) -> None:
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise RecipeError(f"{final}: exists and is a file, not a directory; remove it or choose another output")
    if final.exists() and not overwrite:
        raise RecipeError(f"{final}: already exists; pass --overwrite to replace it or choose another output")


def write_error(exc: BaseException) -> str | None:
    """The reason when `exc` is a failed write (disk full, read-only), else None. Python raises OSError, safetensors
    SafetensorError("... os error 28"), torch.save a RuntimeError from its zip writer."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if match := re.search(r"I/O error: (.*?) \(os error \d+\)", text := first_line(exc)):
        return match.group(1)
    return "torch.save could not write the file" if "inline_container" in text or "write failed" in text else None


def _left_by_dead_writers(final: Path, suffix: str = "") -> Iterator[Path]:
    """The temporary siblings of `final` (`<stem>.tmp-PID<suffix>`, as the writers here name them) whose writing
    process no longer runs: what a killed writer left."""
    stem = final.name.removesuffix(suffix)
    for left in final.parent.glob(f"{glob.escape(stem)}.tmp-*{glob.escape(suffix)}"):
        pid = left.name[len(stem) + len(".tmp-"):len(left.name) - len(suffix)]
        if pid.isdigit() and not _running(pid):
            yield left


def _running(pid: str) -> bool:
    """Whether a process `pid` runs here (another writer's temporary directory is left alone)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's
        return True
    return True
