"""``zimagekit serve``: the flags of :mod:`zimagekit.serve`."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from ..errors import ZImageKitError, exit_code


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="zimagekit serve", description="A local web page and HTTP APIs (zimagekit's, A1111's /sdapi/v1, "
        "OpenAI's /v1/images/generations) over one loaded model; requests run one at a time.",
        epilog="Open http://HOST:PORT/ in a browser; API docs at /docs.")
    parser.add_argument("--model", type=Path, help="a Z-Image folder (default: $ZIMAGEKIT_MODEL, else the shipped "
                        "shapes-world model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--api-key", metavar="KEY", help="require this key (Authorization: Bearer KEY, X-API-Key, or "
                        "?key= for the page); needed to bind beyond loopback")
    parser.add_argument("--allow-no-key", action="store_true",
                        help="bind beyond loopback without a key anyway: anyone on the network can use the GPU")
    parser.add_argument("--lora-dir", type=Path, help="folder of .safetensors LoRAs a request may pick by name")
    parser.add_argument("--output-dir", type=Path, help="also save every image here (names chosen by the server)")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp32 or fp16 (default: bf16)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    parser.add_argument("--max-side", type=int, default=2048, help="largest width/height a request may ask (2048)")
    parser.add_argument("--max-steps", type=int, default=100, help="most steps a request may ask (100)")
    parser.add_argument("--max-images", type=int, default=8, help="most images per request (8)")
    args = parser.parse_args(argv)

    def run():
        if not _loopback(args.host) and not args.api_key:
            if not args.allow_no_key:
                raise ZImageKitError(f"--host {args.host} exposes the server to the network; pass --api-key KEY "
                                     "(or --allow-no-key to let anyone who can reach it generate)")
            print(f"WARNING: serving on {args.host} without an API key: anyone who can reach this port can use it",
                  file=sys.stderr)
        if args.lora_dir is not None and not args.lora_dir.is_dir():
            raise ZImageKitError(f"--lora-dir {args.lora_dir} is not a folder")
        for name in ("max_side", "max_steps", "max_images", "port"):
            if getattr(args, name) < 1:
                raise ZImageKitError(f"--{name.replace('_', '-')} must be at least 1")
        import uvicorn

        app = build(args)
        print(f"zimagekit serving {app.state.model_name} at http://{args.host}:{args.port}/ (API docs: /docs)")
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")

    return exit_code(run)


def build(args):
    """The app for parsed flags (tests build it this way too)."""
    from ..pipeline import ZImagePipeline
    from ..serve.app import Generator, Limits, create_app
    from ..shipped import default_model_folder

    model = args.model or default_model_folder()
    if model is None:
        raise ZImageKitError("no model: pass --model FOLDER or set ZIMAGEKIT_MODEL")
    pipe = ZImagePipeline.from_pretrained(model, args.dtype, args.device)
    name = Path(model).resolve().name
    generator = Generator(pipe, name, args.lora_dir, Limits(args.max_side, args.max_steps, args.max_images),
                          args.output_dir)
    app = create_app(generator, args.api_key)
    app.state.model_name = name
    return app


if __name__ == "__main__":
    sys.exit(main())
