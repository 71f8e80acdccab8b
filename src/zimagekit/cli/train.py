"""``zimagekit train``: flow-matching training on an image-caption dataset and ``export`` of a
run as a Z-Image folder (:mod:`zimagekit.image_training`)."""

from __future__ import annotations

import os
import sys

from .runs import run_stage


def main(argv=None) -> int:
    def train(config, overrides):
        from ..image_training import ZImageTrainConfig, train
        from ..runconfig import load_config

        run_dir = train(load_config(ZImageTrainConfig, config, overrides))
        # torchrun's rank: only the first process reports (the process group is gone by now).
        return run_dir if os.environ.get("RANK", "0") == "0" else None

    def export(run_dir, out, use_ema):
        from ..image_training import export

        export(run_dir, out, use_ema)

    return run_stage(
        "zimagekit train", "Flow-matching training of an S3-DiT on an image-caption dataset (full, LoRA or from "
        "scratch; torchrun for several GPUs; see docs/training.md), and export of a run as a Z-Image folder.",
        "train as the config says", "write a run (one phase's directory) as a Z-Image folder: the trained "
        "transformer (LoRA merged, bf16) with the pretrained folder's other components",
        "optim.lr=1e-4 train.batch_size=2 parallel.strategy=ddp", train, export, argv)


if __name__ == "__main__":
    sys.exit(main())
