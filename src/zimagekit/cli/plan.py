"""``zimagekit plan``: the flags of :mod:`zimagekit.plan`."""

from __future__ import annotations

import argparse
import sys

from .. import plan as plan_module
from ..errors import exit_code
from ..plan import GiB, training_memory, weight_bytes
from ..quantized import BYTES_PER_WEIGHT
from ..s3dit import PRESETS, S3DiTConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zimagekit plan", description=plan_module.__doc__.split("\n\n")[0],
                                     epilog="The arithmetic is in the docstring of zimagekit/plan.py.")
    parser.add_argument("--preset", default="z-image-turbo", choices=sorted(PRESETS), help="model preset")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the model is trained on (default 8)")
    parser.add_argument("--strategy", default="fsdp", choices=("ddp", "fsdp"), help="data parallel or FSDP2 sharding")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per GPU (default 1)")
    parser.add_argument("--size", type=int, default=1024, help="square image side in pixels (VAE factor 8, patch 2)")
    parser.add_argument("--caption-tokens", type=int, default=512, help="caption length after the chat template")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="autocast dtype of the compute")
    parser.add_argument("--checkpointing", action="store_true", help="per-block gradient checkpointing")
    parser.add_argument("--lora", type=int, metavar="RANK", help="LoRA of this rank instead of full fine-tuning")
    parser.add_argument("--weights", choices=list(BYTES_PER_WEIGHT), metavar="FORMAT",
                        help="also print the transformer's resident weights for inference in this format: "
                        + ", ".join(BYTES_PER_WEIGHT) + " (GGUF types and --fp8)")
    args = parser.parse_args(argv)
    def run():
        cfg = S3DiTConfig.preset(args.preset)
        side = args.size // 16  # VAE factor 8 times patch 2
        plan = training_memory(cfg, args.gpus, args.strategy, args.batch, side * side, args.caption_tokens,
                               args.precision, args.checkpointing, args.lora)
        what = f"LoRA rank {args.lora}" if args.lora else f"{args.strategy.upper()} on {args.gpus} GPU(s)"
        print(f"{args.preset}, {what}, micro-batch {args.batch} at {args.size}² ({side * side} image + "
              f"{args.caption_tokens} caption tokens), {args.precision}"
              f"{', gradient checkpointing' if args.checkpointing else ''}: per GPU")
        for name in ("parameters", "gradients", "optimizer", "activations", "total"):
            print(f"  {name:<12}{getattr(plan, name) / GiB:>9.2f} GiB")
        if args.weights:
            print(f"inference: transformer weights in {args.weights}: {weight_bytes(cfg, args.weights) / GiB:.2f} GiB "
                  f"(bf16: {weight_bytes(cfg) / GiB:.2f} GiB)")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
