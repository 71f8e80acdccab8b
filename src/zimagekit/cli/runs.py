"""The command line every training stage shares: ``train --config FILE [key=value ...]`` and
``export RUN_DIR OUT [--no-ema]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from ..errors import exit_code


def add_run_commands(subparsers, train_help: str, export_help: str, example: str = "optim.lr=3e-4 train.steps=2000"):
    """The ``train --config FILE [key=value ...]`` and ``export RUN_DIR OUT [--no-ema]``
    subcommands every training stage has; returns both parsers for stage-specific flags."""
    train = subparsers.add_parser("train", help=train_help)
    train.add_argument("--config", type=Path, help="YAML/TOML run config (default: the dataclass defaults)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted overrides, e.g. {example}")
    export = subparsers.add_parser("export", help=export_help)
    export.add_argument("run_dir", type=Path, help="the training run directory (holds config.yaml and checkpoints/)")
    export.add_argument("out", type=Path, help="the folder to write (replaced if it exists)")
    export.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    return train, export


def run_stage(prog: str, description: str, train_help: str, export_help: str, example: str,
              train: Callable[[Path | None, list[str]], object], export: Callable[[Path, Path, bool], None],
              argv=None) -> int:
    """``prog train ...`` or ``prog export ...``; flags without a subcommand mean ``train``, so
    ``zimagekit distill --config FILE`` works. ``train(config, overrides)`` returns the run
    directory, which is printed."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_commands(sub, train_help, export_help, example=example)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")
    args = parser.parse_args(argv)

    def run():
        if args.command == "train":
            run_dir = train(args.config, args.overrides)
            if run_dir is not None:
                print(f"run directory: {run_dir}")
        else:
            export(args.run_dir, args.out, not args.no_ema)
            print(f"wrote {args.out}")

    return exit_code(run)
