"""``zimagekit distill``: Decoupled-DMD (:mod:`zimagekit.algorithms.decoupled_dmd`)."""

from __future__ import annotations

import sys

from .runs import run_stage


def main(argv=None) -> int:
    from ..algorithms import decoupled_dmd as dd
    from ..runconfig import load_config

    return run_stage(
        "zimagekit distill", dd.__doc__.split("\n\n")[0].replace("\n", " "),
        "distil a teacher folder into an N-step student",
        "write a run's EMA student + the teacher's encoders as a Z-Image folder",
        "distill.mode=coupled distill.student_steps=4",
        lambda config, overrides: dd.train(load_config(dd.DistillConfig, config, overrides)),
        lambda run_dir, out, use_ema: dd.export(run_dir, out, use_ema=use_ema), argv)


if __name__ == "__main__":
    sys.exit(main())
