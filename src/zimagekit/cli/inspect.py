"""``zimagekit inspect``: the flags of :mod:`zimagekit.inspection`."""

from __future__ import annotations

import argparse
import sys

from .. import inspection
from ..errors import ZImageKitError, exit_code
from ..inspection import breakdown_table, dual_stream_table, layout_table, resolve_config, trace
from ..s3dit import PRESETS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zimagekit inspect", description=inspection.__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="z-image-turbo",
                        help=f"a preset ({', '.join(sorted(PRESETS))}) or a model / transformer folder (default: z-image-turbo)")
    parser.add_argument("--caption-tokens", type=int, default=None, metavar="N",
                        help="also show the token layout for a caption of N tokens (after the chat template)")
    parser.add_argument("--size", default="1024x1024", metavar="WxH", help="image size for the token layout (default 1024x1024)")
    parser.add_argument("--dual", action="store_true",
                        help="compare with the dual-stream (MMDiT-style) counterfactual at the same width and depth")
    parser.add_argument("--trace", metavar="PROMPT",
                        help="run MODEL (a model folder) once on PROMPT and print the tensor shapes of every stage")
    parser.add_argument("--trace-size", type=int, default=None, metavar="PX", help="image side for --trace "
                        "(default: the folder's)")
    parser.add_argument("--vae-factor", type=int, default=8, metavar="F", help="VAE downsampling factor (Flux VAE: 8)")
    args = parser.parse_args(argv)

    def run():
        config = resolve_config(args.model)
        print(f"S3-DiT {args.model}: dim {config.dim}, {config.n_layers} layers + {config.n_refiner_layers} noise and "
              f"{config.n_refiner_layers} context refiners, {config.n_heads} heads of {config.head_dim}\n")
        print(breakdown_table(config))
        if args.dual:
            print()
            print(dual_stream_table(config))
        if args.trace is not None:
            if args.model in PRESETS:
                raise ZImageKitError("--trace needs a model folder (text encoder, transformer, VAE), not a preset")
            print()
            print(trace(args.model, args.trace, args.trace_size))
        if args.caption_tokens is not None:
            try:
                width, height = (int(v) for v in args.size.lower().split("x"))
            except ValueError:
                raise ZImageKitError(f"--size {args.size!r} is not WxH, e.g. 1024x768") from None
            if args.caption_tokens < 1:
                raise ZImageKitError("--caption-tokens must be at least 1")
            print()
            print(layout_table(config, args.caption_tokens, width, height, args.vae_factor))

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
