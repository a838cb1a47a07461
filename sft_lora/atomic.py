"""Write a file or a directory all at once: build it in a temporary sibling, then rename it into place.

A crash while writing leaves only `<name>.tmp-*`, never a final file or directory that looks complete. Every
output sft_lora writes goes through `atomic_file` or `atomic_dir`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .config import RecipeError


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `final` (only if `overwrite`)."""
    final = Path(final)
    check_target(final, overwrite=overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecipeError(f"{final.parent}: cannot create the output directory ({exc.strerror})") from None
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                readable(path)
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (reason := write_error(exc)) is None:
            raise
        raise RecipeError(f"{final}: could not write ({reason}); check free space and permissions") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is flushed to disk and replaces `final`."""
    final = Path(final)
    tmp = final.with_name(f"{final.stem}.tmp-{os.getpid()}{final.suffix}")  # same suffix: writers pick the format
    try:
        yield tmp
        readable(tmp)
        fsync(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(final: str | Path, text: str) -> None:
    """Replace `final` with `text` (UTF-8) all at once."""
    with atomic_file(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def readable(path: str | Path) -> None:
    """Give a written file the mode the user's umask asks for (0644 under the usual 022): some writers (safetensors
    writes through a 0600 temporary file) make it private, so teammates on a shared server could not read weights."""
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
    """Raise RecipeError if `final` is a file, or exists and `overwrite` is false."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise RecipeError(f"{final}: exists and is a file, not a directory; remove it or choose another output")
    if final.exists() and not overwrite:
        raise RecipeError(f"{final}: already exists; pass --overwrite to replace it or choose another output")


def write_error(exc: BaseException) -> str | None:
    """The reason, when `exc` is a failed write (disk full, read-only, file too large); None for other errors.

    Writers report it differently: Python as OSError, safetensors as SafetensorError("... os error 28"), torch.save
    as RuntimeError from its zip writer."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if match := re.search(r"I/O error: (.*?) \(os error \d+\)", text):
        return match.group(1)
    if "inline_container" in text or "write failed" in text:
        return "torch.save could not write the file"
    return None
