"""Reward curves of RL runs from their metrics.csv: a moving average of the logged reward
(each logged value is one rollout's mean, so single points are noisy) against trainer steps.

    python scripts/rl_curves.py OUT.png runs/shapes-dmdr runs/shapes-dmd-control ...
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def main(out: str, *runs: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        with open(Path(run) / "metrics.csv") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("reward/mean")]
        steps = [int(r["step"]) for r in rows]
        rewards = [float(r["reward/mean"]) for r in rows]
        window = 5
        smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
                  for i in range(len(rewards))]
        ax.plot(steps, smooth, label=Path(run).name)
    ax.set_xlabel("trainer step")
    ax.set_ylabel("training reward (moving mean of 5 logs)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
