"""``zimagekit plot RUN [RUN ...] --metric NAME [--metric NAME ...] -o FILE.png``: curves of the
metrics training runs logged (their metrics.csv), for reading a run without TensorBoard."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ZImageKitError, exit_code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zimagekit plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                        help="training run directories (each holds the metrics.csv that train, distill and rl write)")
    parser.add_argument("--metric", action="append", required=True, metavar="NAME",
                        help="a metrics.csv column, e.g. loss/student or reward/mean; repeat for one panel each")
    parser.add_argument("--window", type=int, default=1, metavar="N",
                        help="draw the moving mean of N logged values, the raw values faint behind it (default 1: raw)")
    parser.add_argument("--label", action="append", metavar="TEXT",
                        help="a legend label per run, in the order of the runs (default: the directories' names)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.png", help="the PNG to write")
    args = parser.parse_args(argv)

    def run():
        from ..trainer.logs import plot_metrics

        if args.window < 1:
            raise ZImageKitError(f"--window must be at least 1, got {args.window}")
        if args.output.suffix.lower() != ".png":
            raise ZImageKitError(f"--output must name a .png file, got {args.output}")
        plot_metrics(args.runs, args.metric, args.output, args.window, args.label)
        print(f"wrote {args.output}")

    return exit_code(run)
