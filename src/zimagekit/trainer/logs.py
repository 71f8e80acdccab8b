"""What a run writes for people to read: the metric log and sample grids, and plots of the
metric log (``zimagekit plot``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ZImageKitError
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


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A run's metrics.csv as ``{column: [(step, value), ...]}``; empty cells are left out."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise ZImageKitError(f"{run_dir}: no metrics.csv (is it a training run directory?)")
    columns: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), 2):
            try:
                step = int(row["step"])
                for key, value in row.items():
                    if key != "step" and value not in ("", None):
                        columns.setdefault(key, []).append((step, float(value)))
            except (TypeError, ValueError, KeyError):
                raise ZImageKitError(f"{path}:{line}: not a metrics row (a step and numbers expected)") from None
    return columns


def moving_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window − 1`` before it (fewer at the start); a NaN
    spoils only the windows that hold it."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(values))]


def plot_metrics(run_dirs: list[Path], metrics: list[str], out: Path, window: int = 1,
                 labels: list[str] | None = None) -> None:
    """One panel per metric, one line per run (its moving mean over ``window`` logged values,
    the raw values faint behind it), written as a PNG to ``out``."""
    try:
        import matplotlib
    except ImportError:
        raise ZImageKitError("plots need matplotlib: pip install matplotlib (or zimagekit[train])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ZImageKitError(f"{len(labels)} labels for {len(run_dirs)} runs; give one label per run")
    logs = [read_metrics(d) for d in run_dirs]
    for run_dir, log in zip(run_dirs, logs):
        if missing := [m for m in metrics if m not in log]:
            raise ZImageKitError(f"{run_dir} logged no {', '.join(missing)}; it has {', '.join(sorted(log))}")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for n, (label, log) in enumerate(zip(labels, logs)):
            steps, values = zip(*log[metric])
            colour = f"C{n}"
            if window > 1:
                ax.plot(steps, values, color=colour, alpha=0.2, lw=0.8)
            ax.plot(steps, moving_mean(list(values), window), color=colour, lw=1.6, label=label)
        ax.set(xlabel="trainer step", title=metric + (f" (moving mean of {window})" if window > 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(out), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
