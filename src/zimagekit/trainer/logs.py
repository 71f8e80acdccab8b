"""What a run writes for people to read: the metric log and sample grids."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from ..fileio import atomic_write

if TYPE_CHECKING:
    from PIL import Image


class MetricLog:
    """metrics.csv, plus TensorBoard events when the tensorboard package is installed.

    On resume, rows and events after the resumed step (written by the run that crashed
    after its last checkpoint) are dropped, so the logs read as one uninterrupted run."""

    def __init__(self, run_dir: Path, columns: list[str], resumed_step: int):
        self.columns = columns
        path = run_dir / "metrics.csv"
        kept = []
        if path.exists():
            with path.open(newline="") as fh:
                kept = [row for row in csv.DictReader(fh) if int(row["step"]) <= resumed_step]
        # Rewritten atomically, then appended to: a crash now loses no earlier row.
        def write(tmp: Path):
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
        atomic_write(path, write)
        self._file = path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, columns)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, row: dict) -> None:
        self._csv.writerow({k: ("" if v is None else v) for k, v in row.items()})
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    from PIL import Image

    w = max(im.width for im in images)
    h = max(im.height for im in images)
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid
