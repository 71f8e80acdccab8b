"""Writing files so that an interruption never leaves a half-written file under a real name."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a sibling temporary path, then rename it over ``path``. The
    rename is atomic on POSIX, so readers see the old file or the new one, never a torn one;
    the temporary file is removed if ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: Path):
    """Yield a sibling temporary folder to fill; on success it replaces ``path`` (removed
    first if it exists), on failure it is deleted and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
