"""Write a directory all at once: build it in a temporary sibling, then rename it into place.

A crash while writing leaves only `<name>.tmp-*`, never a final directory that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .config import RecipeError


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `final` (only if `overwrite`)."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise RecipeError(f"{final}: exists and is a file, not a directory; remove it or choose another output")
    if final.exists() and not overwrite:
        raise RecipeError(f"{final}: already exists; pass --overwrite to replace it or choose another output")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecipeError(f"{final.parent}: cannot create the output directory ({exc.strerror})") from None
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RecipeError(f"{final}: could not write ({exc.strerror}); check free space and permissions") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
