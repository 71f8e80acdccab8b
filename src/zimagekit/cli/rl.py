"""``zimagekit rl``: RL post-training of a Z-Image folder. The config's ``algorithm`` picks the
method, each in its own module under :mod:`zimagekit.algorithms`; ``export`` writes a run's
policy as a Z-Image folder."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from ..errors import ZImageKitError
from .runs import run_stage

# algorithm name -> the module holding its CONFIG class, train(cfg) and export(run, out, use_ema)
ALGORITHMS = {
    "flow_grpo": "zimagekit.algorithms.flow_grpo",
    "diffusion_dpo": "zimagekit.algorithms.diffusion_dpo",
    "dmdr": "zimagekit.algorithms.dmdr",
}


def _module(name):
    if name is None:
        raise ZImageKitError(f"the config names no algorithm; set algorithm: to one of {', '.join(ALGORITHMS)} "
                             f"(configs/shapes/flow_grpo.yaml is an example)")
    if name not in ALGORITHMS:
        raise ZImageKitError(f"unknown RL algorithm {name!r}; set algorithm to one of {', '.join(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS[name])


def main(argv=None) -> int:
    def train(config, overrides):
        from ..runconfig import load_config, peek_config

        module = _module(peek_config(config, overrides, "algorithm"))
        return module.train(load_config(module.CONFIG, config, overrides))

    def export(run_dir, out, use_ema):
        from ..runconfig import peek_config

        if not (Path(run_dir) / "config.yaml").is_file():
            raise ZImageKitError(f"{run_dir}: not an RL run (config.yaml is missing)")
        _module(peek_config(Path(run_dir) / "config.yaml", (), "algorithm")).export(run_dir, out, use_ema)

    return run_stage(
        "zimagekit rl", "RL post-training of a Z-Image folder: " + ", ".join(ALGORITHMS) + " (the config's "
        "algorithm key), with rewards from zimagekit.rewards; see docs/rl.md.",
        "post-train as the config says", "write a run's policy (LoRA merged, bf16) into a copy of its model folder",
        "grpo.group_size=8 grpo.kl_beta=0.04", train, export, argv)


if __name__ == "__main__":
    sys.exit(main())
