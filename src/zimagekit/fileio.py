"""Writing files so that an interruption never leaves a half-written file under a real name."""

from __future__ import annotations

import os
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
