"""``zimagekit generate``: its flags, their checks before any weight loads, and the loop that
writes the images (batched: ``--batch-size`` images per pipeline call)."""

from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path

from ..errors import ZImageKitError
from ..shipped import TURBO_DEFAULTS, default_model_folder, recorded_defaults

IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def add_generate(commands) -> None:
    # --help states the defaults of the model a plain call would use (JSON only, no torch).
    folder = os.environ.get("ZIMAGEKIT_MODEL") or default_model_folder()
    d = recorded_defaults(folder) if folder else dict(TURBO_DEFAULTS)
    name = Path(folder).name if folder else "Z-Image-Turbo"
    p = commands.add_parser(
        "generate",
        help="text-to-image (and image-to-image) with a Z-Image model folder",
        description=f"Generate images with Z-Image / Z-Image-Turbo. Steps, guidance and size default to what the "
        f"model folder records (model_index.json), else Turbo's (8 steps, no guidance, 1024x1024); the default "
        f"model, {name}, uses {d['num_inference_steps']} steps, guidance {d['guidance_scale']:g}, "
        f"{d['width']}x{d['height']}. Prints the seed and each file written.",
    )
    p.set_defaults(run=_generate)
    g = p.add_argument_group("prompt")
    g.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help="the prompt (or use -p or --prompt-file)")
    g.add_argument("-p", "--prompt", metavar="TEXT", help="the prompt, as a flag")
    g.add_argument(
        "--prompt-file", type=Path, metavar="FILE", help="UTF-8 text file, one prompt per line (blank lines skipped)"
    )
    g.add_argument(
        "-n",
        "--negative-prompt",
        default="",
        metavar="TEXT",
        help="what to steer away from; used only when --cfg-scale > 0 (default: empty)",
    )
    g.add_argument(
        "--max-sequence-length",
        type=int,
        default=512,
        metavar="N",
        help="prompt tokens kept, chat template included; longer prompts are cut with a warning (default: 512)",
    )

    g = p.add_argument_group("image")
    g.add_argument(
        "-W", "--width", type=int, metavar="PX",
        help=f"width, a multiple of 16 (default: the model's, {d['width']} for {name}; or the init image's)"
    )
    g.add_argument(
        "-H", "--height", type=int, metavar="PX",
        help=f"height, a multiple of 16 (default: the model's, {d['height']} for {name}; or the init image's)"
    )
    g.add_argument(
        "--num-images",
        "-b",
        "--batch-count",
        dest="num_images",
        type=int,
        default=1,
        metavar="N",
        help="images per prompt (default: 1)",
    )
    g.add_argument(
        "-o",
        "--output",
        default="output.png",
        metavar="FILE",
        help="output file, .png/.jpg/.webp (default: output.png). For several images give a printf "
        "pattern like out_%%03d.png; otherwise _000, _001, ... is added before the extension",
    )
    g.add_argument("--no-metadata", action="store_true", help="do not write the generation parameters into PNGs")

    g = p.add_argument_group("sampling")
    g.add_argument(
        "-s",
        "--seed",
        type=int,
        default=42,
        metavar="N",
        help="random seed; negative picks one at random. Image k of a run uses seed + k (default: 42)",
    )
    g.add_argument(
        "--steps", "--num-inference-steps", dest="steps", type=int, default=None, metavar="N",
        help=f"denoising steps = transformer calls (default: the model folder's, {d['num_inference_steps']} for "
        f"{name}; else Turbo's 8)",
    )  # fmt: skip
    g.add_argument(
        "--cfg-scale",
        "--guidance-scale",
        dest="cfg_scale",
        type=float,
        default=None,
        metavar="W",
        help="guidance w in pred = pos + w*(pos - neg), diffusers' Z-Image convention (standard CFG scale minus 1); "
        f"0 turns it off, as Turbo wants (default: the model folder's, {d['guidance_scale']:g} for {name}; else 0)",
    )
    g.add_argument(
        "--cfg-normalization",
        type=float,
        default=0.0,
        metavar="C",
        help="cap the guided prediction's norm at C times the positive one's (default: 0 = off)",
    )
    g.add_argument(
        "--cfg-truncation",
        type=float,
        default=1.0,
        metavar="T",
        help="no guidance once t = 1 - sigma exceeds T (default: 1 = never)",
    )
    g.add_argument("-i", "--init-image", type=Path, metavar="FILE", help="start from this image (img2img)")
    g.add_argument("--mask", type=Path, metavar="FILE",
                   help="inpaint: regenerate the init image where this mask (same size as the image) is white, "
                   "keep it where black; needs --init-image")
    g.add_argument("--controlnet", type=Path, metavar="PATH",
                   help="a Z-Image ControlNet (diffusers folder, or a released Fun ControlNet Union .safetensors)")
    g.add_argument("--control-image", type=Path, metavar="FILE",
                   help="the image the ControlNet follows (edges, depth, pose, ...); resized to the output size; "
                   "with -i and --mask, inpainting goes through the ControlNet (2.x releases)")
    g.add_argument("--control-scale", type=float, default=0.75, metavar="F",
                   help="how strongly the ControlNet steers, its hints' scale (default: 0.75, as diffusers)")
    g.add_argument(
        "--strength",
        type=float,
        metavar="S",
        help="img2img/inpaint: how much to change the init image, in (0, 1]; about S x steps run "
        "(default: 0.6; 1.0 with --mask)",
    )

    g = p.add_argument_group("model and hardware")
    g.add_argument(
        "--model",
        default=os.environ.get("ZIMAGEKIT_MODEL"),
        metavar="FOLDER",
        help="Z-Image folder in the Hugging Face layout: model_index.json, transformer/, text_encoder/, tokenizer/, "
        "vae/, scheduler/ (default: $ZIMAGEKIT_MODEL, else the shapes-world model shipped with zimagekit)",
    )
    g.add_argument("--transformer", type=Path, metavar="PATH",
                   help="use this transformer instead of the model folder's: a folder, a .safetensors single file "
                   "(diffusers or ComfyUI names) or a .gguf file (Q8_0, Q6_K, Q5_K, Q4_K, Q4_0; kept quantized)")
    g.add_argument("--fp8", action="store_true",
                   help="store the transformer blocks' weights as fp8 e4m3 with per-row scales (half of bf16's "
                   "memory; dequantized per layer at each step)")
    g.add_argument("--fp8-matmul", action="store_true",
                   help="--fp8, and multiply in fp8 too: each layer's input is scaled per row to e4m3 on the fly and "
                   "the product is an fp8 GEMM (Hopper and newer GPUs; relative error 0.043 against --fp8's 0.037 "
                   "on a test model)")
    g.add_argument("--vae-tiling", action="store_true",
                   help="decode (and encode an init image) in overlapping tiles of the VAE's sample_size, as "
                   "diffusers' vae.enable_tiling(): bounded memory for large images, faint seams possible")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (regional compilation; the first image waits for the "
                   "compiler, later steps and images run faster: worth it on a GPU for many images)")
    g.add_argument(
        "--dtype",
        default="bf16",
        metavar="NAME",
        help="bf16, fp32 or fp16 for the transformer and text encoder; the VAE stays fp32 "
        "(default: bf16; fp16 overflows with Z-Image)",
    )
    g.add_argument("--device", metavar="NAME", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    g.add_argument(
        "--offload",
        "--offload-to-cpu",
        dest="offload",
        action="store_true",
        help="keep the models in CPU memory and move each to the device only while it runs",
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="merge a LoRA (diffusers key format, .safetensors) into the transformer at SCALE (default 1); repeatable",
    )
    g.add_argument(
        "--batch-size", type=int, default=4, metavar="N",
        help="images per transformer batch; more is faster until memory runs out, and never changes an image "
        "(default: 4)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _prompts(args) -> list[str]:
    given = [args.prompt_arg is not None, args.prompt is not None, args.prompt_file is not None]
    if sum(given) != 1:
        raise ZImageKitError(
            "give exactly one prompt source: a PROMPT argument, -p/--prompt, or --prompt-file"
            if sum(given) > 1
            else "no prompt: pass one as an argument, with -p, or with --prompt-file"
        )
    if args.prompt_file is None:
        prompt = args.prompt_arg if args.prompt_arg is not None else args.prompt
        if not prompt.strip():
            raise ZImageKitError("the prompt is empty")
        return [prompt]
    try:
        text = args.prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ZImageKitError(f"cannot read prompt file {args.prompt_file}: {e}") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ZImageKitError(f"prompt file {args.prompt_file} has no prompts; write one prompt per line")
    return prompts


def _output_paths(output: str, count: int) -> list[Path]:
    """Where each image goes: a printf pattern is filled with 0, 1, ...; a plain name gets
    ``_000``, ``_001``, ... when there are several images.  Checked before any work starts."""
    path = Path(output)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ZImageKitError(f"output {output} must end in one of {', '.join(IMAGE_EXTENSIONS)}")
    if "%" in output:
        try:
            paths = [Path(output % i) for i in range(count)]
        except (TypeError, ValueError) as e:
            raise ZImageKitError(f"output pattern {output!r} is not a printf pattern like out_%03d.png ({e})") from e
        if count > 1 and len(set(paths)) != count:
            raise ZImageKitError(
                f"output pattern {output!r} gives the same name to several images; use e.g. out_%03d.png"
            )
    elif count == 1:
        paths = [path]
    else:
        paths = [path.with_name(f"{path.stem}_{i:03d}{path.suffix}") for i in range(count)]
    for folder in {p.parent for p in paths}:
        folder = folder if str(folder) else Path(".")
        if not folder.is_dir():
            raise ZImageKitError(f"cannot write to {folder}/: it is not an existing folder; create it or change -o")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ZImageKitError(f"cannot write to {folder}/: permission denied; change -o")
    for p in paths:
        if p.is_dir():
            raise ZImageKitError(f"output {p} is a folder; give a file name")
    return paths


def _lora_spec(spec: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE``; the file must exist (checked before any weights load)."""
    if Path(spec).is_file():  # a colon inside the file name, no scale
        return Path(spec), 1.0
    path, sep, tail = spec.rpartition(":")
    if not sep or not path:
        raise ZImageKitError(f"--lora {spec}: no such file {spec}")
    try:
        scale = float(tail)
    except ValueError:
        raise ZImageKitError(f"--lora {spec}: the scale after the last ':' must be a number, got {tail!r} "
                             f"(write FILE or FILE:SCALE, e.g. style.safetensors:0.8)") from None
    if not math.isfinite(scale):
        raise ZImageKitError(f"--lora {spec}: the scale must be a finite number, got {tail!r}")
    if not Path(path).is_file():
        raise ZImageKitError(f"--lora {spec}: no such file {path}")
    return Path(path), scale


# How the command's errors name each setting of a GenerationRequest.
FLAGS = {
    "width": "--width", "height": "--height", "num_inference_steps": "--steps", "guidance_scale": "--cfg-scale",
    "cfg_normalization": "--cfg-normalization", "cfg_truncation": "--cfg-truncation",
    "num_images_per_prompt": "--num-images", "seed": "--seed", "strength": "--strength",
    "max_sequence_length": "--max-sequence-length", "init_image": "--init-image", "mask_image": "--mask",
}


def _request(args, num_prompts: int, seed: int):
    from ..request import GenerationRequest

    return GenerationRequest(
        num_prompts=num_prompts, width=args.width, height=args.height, num_inference_steps=args.steps,
        guidance_scale=args.cfg_scale, cfg_normalization=args.cfg_normalization, cfg_truncation=args.cfg_truncation,
        num_images_per_prompt=args.num_images, seed=seed, img2img=args.init_image is not None,
        inpaint=args.mask is not None, strength=args.strength, max_sequence_length=args.max_sequence_length,
    ).validate(FLAGS)


def _check_prompt_lengths(folder, prompts: list[str], max_sequence_length: int) -> None:
    """Every prompt, chat-formatted and cut to ``max_sequence_length`` as the encoder will,
    must fit the transformer's caption positions: checked with the tokenizer alone, before
    any weights load, so a long prompt in a file never stops a batch halfway."""
    if folder.max_caption_tokens is None:
        return
    from ..text_encoder import ChatTokenizer

    tokenizer = ChatTokenizer.from_pretrained(folder.component("tokenizer"))
    lengths = [min(len(ids), max_sequence_length) for ids in tokenizer([tokenizer.format(p) for p in prompts])]
    limit = folder.max_caption_tokens
    too_long = [(n, p, length) for n, (p, length) in enumerate(zip(prompts, lengths), 1) if length > limit]
    if too_long:
        n, prompt, length = too_long[0]
        where = f"prompt {n} of {len(prompts)}" if len(prompts) > 1 else "the prompt"
        raise ZImageKitError(f"{where} ({prompt[:40]!r}) is {length} tokens with the chat template, but this model "
                             f"places at most {limit} (transformer axes_lens[0]); shorten it"
                             + (f" ({len(too_long)} prompts are too long)" if len(too_long) > 1 else ""))


def _open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ZImageKitError(f"cannot read {what} {path}: {e}") from e


def _save_image(image, path: Path, metadata) -> None:
    """Write under a temporary name in the same folder, then rename: never a half-written file."""
    from ..fileio import atomic_write

    fmt = IMAGE_EXTENSIONS[path.suffix.lower()]
    extra = {"pnginfo": metadata} if metadata is not None and fmt == "PNG" else {}
    try:
        atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **extra))
    except OSError as e:
        raise ZImageKitError(f"cannot write {path}: {e}") from e


def _generate(args) -> int:
    # Cheap checks first, so a typo never waits for gigabytes of weights.
    prompts = _prompts(args)
    if args.batch_size < 1:
        raise ZImageKitError(f"--batch-size must be at least 1, got {args.batch_size}")
    seed = args.seed if args.seed >= 0 else random.SystemRandom().randrange(2**32)
    request = _request(args, len(prompts), seed)
    model = args.model or default_model_folder()
    if model is None:
        raise ZImageKitError(
            "no model: pass --model FOLDER (a Z-Image folder in the Hugging Face layout) or set ZIMAGEKIT_MODEL"
        )
    loras = [_lora_spec(spec) for spec in args.lora]
    paths = _output_paths(args.output, request.num_images)
    if (args.controlnet is None) != (args.control_image is None):
        raise ZImageKitError("--control-image needs --controlnet" if args.controlnet is None
                             else "--controlnet needs --control-image (the image it follows)")
    if not math.isfinite(args.control_scale):
        raise ZImageKitError(f"--control-scale must be a finite number, got {args.control_scale}")
    control_inpaint = args.control_image is not None and args.mask is not None
    if control_inpaint and args.strength is not None:
        raise ZImageKitError("--strength does not apply to ControlNet inpainting, which denoises from pure noise")
    control_image = _open_image(args.control_image, "control image") if args.control_image is not None else None
    init_image = _open_image(args.init_image, "init image") if args.init_image is not None else None
    mask = _open_image(args.mask, "mask") if args.mask is not None else None
    if mask is not None and mask.size != init_image.size:
        raise ZImageKitError(f"the mask {args.mask} is {mask.size[0]}x{mask.size[1]} but the init image is "
                             f"{init_image.size[0]}x{init_image.size[1]}; give a mask of the image's size")

    import torch

    from ..pipeline import ModelFolder, ZImagePipeline, load_text_encoder, resolve_device, resolve_dtype
    from ..pngmeta import GenerationInfo, png_info

    dtype, device = resolve_dtype(args.dtype), resolve_device(args.device)
    folder = ModelFolder.open(model)
    request = request.resolved(folder.defaults, folder.image_multiple,
                               init_image.size if init_image and not control_image else None)
    _check_prompt_lengths(folder, prompts, request.max_sequence_length)
    trained = (folder.defaults["width"], folder.defaults["height"])
    if folder.records_size and (request.width, request.height) != trained:
        print(f"note: {folder.root.name} was trained at {trained[0]}x{trained[1]}; at {request.width}x"
              f"{request.height} expect worse images")
    print(f"seed: {seed}")

    # Text encoder first, alone: encode every prompt, drop it, then load the transformer, so the
    # two are never in memory together (the README's memory plan).
    encoder = load_text_encoder(folder.root, dtype, device)
    use_cfg = request.guidance_scale > 0
    embeds = encoder.encode(prompts, request.max_sequence_length)
    negative = encoder.encode([args.negative_prompt], request.max_sequence_length)[0] if use_cfg else None
    del encoder
    quantize = "fp8-matmul" if args.fp8_matmul else "fp8" if args.fp8 else None
    pipe = ZImagePipeline.from_pretrained(folder.root, dtype, device, offload=args.offload, load_text_encoder=False,
                                          transformer=args.transformer, quantize=quantize, controlnet=args.controlnet)
    if loras:
        from ..lora import LoRA

        for path, scale in loras:
            lora = LoRA.load(pipe.transformer, path, scale)
            if lora.mergeable:  # quantized layers keep the adapters as hooks
                lora.merge()
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.compile:  # after the LoRAs merge, so the compiled blocks hold the final weights
        pipe.transformer.compile_repeated_blocks()

    # One entry per image, prompt by prompt; image k has seed + k whatever the batching, so a
    # batch size never changes an image.
    per_image = [(prompt, embed) for prompt, embed in zip(prompts, embeds) for _ in range(request.num_images_per_prompt)]
    seeds = request.image_seeds()
    model_name = folder.root.resolve().name + (f" + {args.transformer.name}" if args.transformer else "") + (
        " (fp8 matmul)" if args.fp8_matmul else " (fp8)" if args.fp8 else "")
    k = 0  # images written so far, in the order of paths
    try:
        for start in range(0, len(per_image), args.batch_size):
            chunk = range(start, min(start + args.batch_size, len(per_image)))
            if len(per_image) > len(chunk):
                print(f"images {chunk.start + 1}-{chunk.stop} of {len(per_image)}")
            images = pipe(
                prompt_embeds=[per_image[i][1] for i in chunk],
                negative_prompt_embeds=[negative] * len(chunk) if use_cfg else None,
                height=request.height,
                width=request.width,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                cfg_normalization=request.cfg_normalization,
                cfg_truncation=request.cfg_truncation,
                generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in chunk],
                init_image=init_image,
                mask_image=mask,
                strength=request.strength if init_image is not None and not control_inpaint else None,
                control_image=control_image,
                controlnet_conditioning_scale=args.control_scale,
                max_sequence_length=request.max_sequence_length,
                progress=not args.no_progress,
            )
            for image, i in zip(images, chunk):
                info = GenerationInfo(
                    prompt=per_image[i][0],
                    negative_prompt=args.negative_prompt if use_cfg else "",
                    steps=request.num_inference_steps,
                    cfg_scale=request.guidance_scale,
                    seed=seeds[i],
                    width=request.width,
                    height=request.height,
                    model=model_name,
                    cfg_normalization=request.cfg_normalization,
                    cfg_truncation=request.cfg_truncation,
                    strength=request.strength if init_image is not None and not control_inpaint else None,
                    mask=args.mask.name if mask is not None else None,
                    controlnet=f"{args.controlnet.name}, {args.control_image.name}" if control_image else None,
                    control_scale=args.control_scale if control_image else None,
                    loras=tuple(f"{path.stem}:{scale:g}" for path, scale in loras),
                )
                _save_image(image, paths[k], None if args.no_metadata else png_info(info))
                print(f"saved {paths[k]}")
                k += 1
    except BaseException:
        if k:
            print(f"stopped after writing {k} of {len(paths)} images: {', '.join(map(str, paths[:k]))}",
                  file=sys.stderr)
        raise
    return 0
