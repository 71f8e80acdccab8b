"""The ``zimagekit`` command: ``generate``, ``train``, ``distill``, ``rl``, ``inspect``, ``plan``, ``plot``,
``serve``, ``shapes``.

Flags follow stable-diffusion.cpp and diffusers, so people's muscle memory works::

    zimagekit generate "a red fox in snow" --model ./Z-Image-Turbo -W 1024 -H 768 -s 42
    zimagekit generate -p "a cat" --num-images 4 -o cats_%03d.png --cfg-scale 0
    zimagekit generate --prompt-file prompts.txt --model ./Z-Image-Turbo -o out_%03d.png
    zimagekit generate "oil painting" --init-image photo.png --strength 0.6 --model ./Z-Image-Turbo

A problem with the input prints one ``error: ...`` line on stderr and exits 2; no output file
is left behind.  Heavy imports (torch, transformers, diffusers) happen only when a command runs,
so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import ZImageKitError
from .generate import add_generate


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in the same one-line form as every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="zimagekit", description="Z-Image (S3-DiT) tools.")
    parser.add_argument("--version", action="version", version=f"zimagekit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add_generate(commands)
    _add_delegated(commands, "train", "flow-matching training (full, LoRA, from scratch) on an image-caption dataset, "
                   "and export of a run as a Z-Image folder; torchrun for several GPUs", "zimagekit.cli.train")
    _add_delegated(commands, "distill", "Decoupled-DMD: distil a teacher folder into a few-step student",
                   "zimagekit.cli.distill")
    _add_delegated(commands, "rl", "RL post-training with a reward: Flow-GRPO, Diffusion-DPO, DMDR (distillation + RL)",
                   "zimagekit.cli.rl")
    _add_delegated(commands, "inspect", "parameter breakdown and token/RoPE layout of an S3-DiT",
                   "zimagekit.cli.inspect")
    _add_delegated(commands, "plan", "per-GPU training memory of an S3-DiT for a GPU count and strategy",
                   "zimagekit.cli.plan")
    _add_delegated(commands, "plot", "curves of the metrics that training runs logged (metrics.csv), as a PNG",
                   "zimagekit.cli.plot")
    _add_delegated(commands, "serve", "a local web page and HTTP APIs (A1111 /sdapi/v1, OpenAI images) over one model",
                   "zimagekit.cli.serve")
    commands.add_parser(
        "shapes", help="train, export and evaluate the shapes-world models: zimagekit shapes {text,vae,teacher} "
        "{train,export,evaluate} ..., or judge a folder of images: zimagekit shapes judge FOLDER",
        add_help=False).set_defaults(delegated=True, run=_shapes)
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "delegated", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    _show_warnings()
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except ZImageKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# Each stage of the shapes-world recipe, in training order; each module's main takes
# train / export / evaluate subcommands (the tokenizer stage lives with the text encoder).
# judge scores any folder of images against the prompts in their PNG metadata.
SHAPES_STAGES = {"text": "zimagekit.shapes.text", "vae": "zimagekit.shapes.vae", "teacher": "zimagekit.shapes.teacher",
                 "judge": "zimagekit.shapes.judge"}


def _shapes(args) -> int:
    import importlib

    if not args.rest or args.rest[0] in ("-h", "--help"):
        print("usage: zimagekit shapes STAGE COMMAND [options]\n\nstages, in training order:\n"
              "  text     tokenizer OUT | train --config ... | export RUN OUT | evaluate ...\n"
              "  vae      train --config ... | export RUN OUT | evaluate ...\n"
              "  teacher  train --config ... | export RUN OUT | evaluate MODEL ...\n"
              "  judge    FOLDER: judge a folder of generated images (GenEval-style accuracy)\n\n"
              "zimagekit shapes STAGE --help explains each; configs/shapes/*.yaml are the shipped runs' configs.")
        return 0 if args.rest else 2
    stage, *rest = args.rest
    if stage not in SHAPES_STAGES:
        raise ZImageKitError(f"unknown shapes stage {stage!r}; choose one of {', '.join(SHAPES_STAGES)}")
    return importlib.import_module(SHAPES_STAGES[stage]).main(rest)


def _add_delegated(commands, name: str, help: str, module: str) -> None:
    """A subcommand whose flags belong to ``module.main(argv)``: everything after the name is
    handed over unparsed, so ``zimagekit NAME --help`` prints that module's own help."""
    import importlib

    commands.add_parser(name, help=help, add_help=False).set_defaults(
        delegated=True, run=lambda args: importlib.import_module(module).main(args.rest))


def _show_warnings() -> None:
    """Print zimagekit's warnings (e.g. a prompt cut at max_sequence_length) as one line each."""
    log = logging.getLogger("zimagekit")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


