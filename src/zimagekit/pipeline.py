"""Z-Image text-to-image and image-to-image pipeline: Qwen3 → S3-DiT (Euler, CFG) → Flux VAE.

Numerically this is diffusers' ``ZImagePipeline`` / ``ZImageImg2ImgPipeline`` (0.42); it
differs where that costs time or memory for nothing:

* prompts are encoded at their real length by a Qwen3 without its last layer and final norm
  (:mod:`zimagekit.text_encoder`), each distinct prompt once;
* the σ schedule, the model times and the per-step guidance scales are computed once per
  generation on the host, and the loop never reads a device value;
* all images of a call share a size, so the S3-DiT gets one 5-D batch (positive and negative
  halves together under CFG), and the VAE decodes one image at a time;
* initial noise is drawn on the CPU, so a seed gives the same image on any device;
* inputs are never modified (diffusers rewrites a prompt list in place).

Folder layout (Tongyi-MAI/Z-Image-Turbo): ``model_index.json``, ``transformer/`` (S3-DiT),
``text_encoder/`` (Qwen3), ``tokenizer/``, ``vae/`` (AutoencoderKL), ``scheduler/``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .autoencoder import AutoencoderKL
from .errors import ZImageKitError
from .request import GenerationRequest
from .s3dit import S3DiT, max_caption_tokens
from .sampling import (
    ScheduleConfig,
    add_noise,
    cfg_combine,
    cfg_scales,
    cpu_randn,
    get_sigmas,
    img2img_start,
    keep_unmasked,
    sample_euler,
    time_from_sigma,
)
from .shipped import TURBO_DEFAULTS
from .text_encoder import Qwen3TextEncoder
from .vae_codec import from_vae_output, scale_latents, to_uint8, to_vae_input, unscale_latents

__all__ = ["ModelFolder", "ZImagePipeline", "load_text_encoder", "resolve_device", "resolve_dtype"]

COMPONENT_CONFIGS = {
    "transformer": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
}
MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# Scheduler options diffusers offers that Z-Image does not use; refuse rather than ignore them.
UNSUPPORTED_SCHEDULER_OPTIONS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "shift_terminal",
)
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
OUTPUT_TYPES = ("pil", "pt", "latent")


# ---------------------------------------------------------------------------------------------
# Argument resolution shared with the CLI
# ---------------------------------------------------------------------------------------------


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a dtype or a name (fp32/float32, bf16/bfloat16, fp16/float16)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ZImageKitError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return DTYPES[str(dtype).lower()]


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A usable torch device; ``None`` means CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ZImageKitError(f"unknown device {str(device)!r} ({_first_line(e)}); use cpu, cuda or cuda:N") from e
    try:
        torch.empty(0, device=device)
    except Exception as e:  # a CPU-only build raises AssertionError, a bad index RuntimeError
        raise ZImageKitError(f"device {str(device)!r} is not available here ({_first_line(e)}); use cpu") from e
    return device


def _first_line(error: BaseException) -> str:
    """The first line of an exception message, so wrapped errors stay on one line."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelFolder:
    """A checked Z-Image folder in the Hugging Face layout; opening it reads only JSON.

    ``image_multiple`` is what width and height must be multiples of: the VAE's downsampling
    (2^(blocks − 1), 8 for the Flux VAE) times the S3-DiT patch size (2), so 16 for Z-Image.
    """

    root: Path
    image_multiple: int
    vae_force_upcast: bool = True  # the VAE runs in fp32 whatever the pipeline dtype
    # The longest caption the transformer can place (s3dit.max_caption_tokens of axes_lens[0]).
    max_caption_tokens: int | None = None
    # Whether model_index.json records an image size (a model trained at one size, like the
    # shapes models), rather than leaving Turbo's 1024² implied.
    records_size: bool = False
    # Sampling defaults the folder records (model_index.json "_zimagekit_defaults", which
    # diffusers ignores); a model without them gets Turbo's.
    defaults: dict = field(default_factory=lambda: dict(TURBO_DEFAULTS))
    # Components taken from elsewhere (name -> folder), as diffusers' from_pretrained(vae=...).
    overrides: dict = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path, overrides: dict | None = None) -> ModelFolder:
        """``overrides`` (e.g. ``{"vae": "my-vae"}``) replace components; each is checked as a
        component of the folder is."""
        root = Path(folder)
        overrides = {name: Path(path) for name, path in (overrides or {}).items() if path is not None}
        if unknown := sorted(set(overrides) - set(COMPONENT_CONFIGS)):
            raise ZImageKitError(f"no component {unknown[0]!r} to replace; a Z-Image folder has {sorted(COMPONENT_CONFIGS)}")
        layout = "model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/"
        if not root.exists():
            raise ZImageKitError(f"model folder {root} does not exist; pass a Z-Image folder ({layout})")
        if not root.is_dir():
            raise ZImageKitError(f"model path {root} is not a folder; pass a Z-Image folder ({layout})")
        index = _read_json(root / "model_index.json", f"a Z-Image folder has {layout}")
        defaults = index.get("_zimagekit_defaults", {})
        if not isinstance(defaults, dict) or set(defaults) - set(TURBO_DEFAULTS):
            raise ZImageKitError(f"{root / 'model_index.json'}: _zimagekit_defaults may only set {sorted(TURBO_DEFAULTS)}")
        places = {name: overrides.get(name, root / name) for name in COMPONENT_CONFIGS}
        for name, config in COMPONENT_CONFIGS.items():
            where = places[name]
            if not where.is_dir():
                raise ZImageKitError(
                    f"model folder {root} is missing the {name}/ component; copy it from the original model"
                    if name not in overrides else f"{name} folder {where} does not exist")
            if config is not None and not (where / config).is_file():
                raise ZImageKitError(f"{where} has no {config}; copy the {name}/ component again")
        vae = _read_json(places["vae"] / "config.json", "the VAE config")
        transformer = _read_json(places["transformer"] / "config.json", "the transformer config")
        text_encoder = _read_json(places["text_encoder"] / "config.json", "the text encoder config")
        # Components from different models load fine one by one, then fail deep inside a forward.
        te_width, cap_dim = text_encoder.get("hidden_size"), transformer.get("cap_feat_dim")
        latent_channels, in_channels = vae.get("latent_channels"), transformer.get("in_channels")
        for what, a, b in [
            (f"text_encoder hidden_size {te_width} != transformer cap_feat_dim {cap_dim}", te_width, cap_dim),
            (
                f"vae latent_channels {latent_channels} != transformer in_channels {in_channels}",
                latent_channels,
                in_channels,
            ),
        ]:
            if a is not None and b is not None and a != b:
                raise ZImageKitError(f"{root}: {what}; the components come from different models")
        multiple = vae_downsampling(vae.get("block_out_channels", [0] * 4)) * transformer.get("all_patch_size", [2])[0]
        axes_lens = transformer.get("axes_lens")
        max_caption = max_caption_tokens(axes_lens[0]) if isinstance(axes_lens, list) and axes_lens else None
        return cls(root, multiple, vae_force_upcast=vae.get("force_upcast", True),
                   defaults={**TURBO_DEFAULTS, **defaults}, max_caption_tokens=max_caption,
                   records_size=bool({"height", "width"} & set(defaults)), overrides=overrides)

    def component(self, name: str) -> Path:
        return self.overrides.get(name, self.root / name)


def vae_downsampling(block_out_channels) -> int:
    """Pixels per latent cell of an AutoencoderKL: one 2x downsample between consecutive blocks."""
    return 2 ** (len(block_out_channels) - 1)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ZImageKitError(f"{path} is missing ({what})")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZImageKitError(f"{path} is not readable JSON ({_first_line(e)}); copy it again") from e
    if not isinstance(value, dict):
        raise ZImageKitError(f"{path} must hold a JSON object")
    return value


def load_text_encoder(
    folder: str | Path | ModelFolder, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> Qwen3TextEncoder:
    """Only the tokenizer and the (truncated) Qwen3 of a Z-Image folder (a path, or an opened
    :class:`ModelFolder`, whose replaced components count), e.g. to encode prompts before the
    transformer is loaded."""
    model = folder if isinstance(folder, ModelFolder) else ModelFolder.open(folder)
    return _load_text_encoder(model, resolve_dtype(dtype), resolve_device(device))


def _load_text_encoder(model: ModelFolder, dtype: torch.dtype, device: torch.device) -> Qwen3TextEncoder:
    with _loading(model, "text_encoder"):
        return Qwen3TextEncoder.from_pretrained(
            model.component("text_encoder"), model.component("tokenizer"), dtype=dtype, device=device
        )


@contextlib.contextmanager
def _loading(model: ModelFolder, name: str):
    """Turn a library's error while loading a component into one line that names the component."""
    try:
        yield
    except ZImageKitError:
        raise
    except Exception as e:  # loaders raise many types for a bad file
        raise ZImageKitError(
            f"cannot load {name} from {model.component(name)}: {_first_line(e)}; "
            f"the files may be corrupt or truncated, copy {name}/ again"
        ) from e


def read_schedule_config(path: Path) -> tuple[ScheduleConfig, dict]:
    """A folder's scheduler_config.json: the fields that decide the σ schedule, and the whole
    file (kept so a saved folder writes every field back)."""
    raw = _read_json(path, "the scheduler config")
    for option in UNSUPPORTED_SCHEDULER_OPTIONS:
        if raw.get(option):
            raise ZImageKitError(f"{path}: scheduler option {option}={raw[option]!r} is not supported by Z-Image")
    if raw.get("use_dynamic_shifting") and raw.get("time_shift_type", "exponential") != "exponential":
        raise ZImageKitError(f"{path}: only the exponential time shift is supported")
    known = {f.name for f in fields(ScheduleConfig)}
    schedule = ScheduleConfig(**{k: v for k, v in raw.items() if k in known})
    # A shift of 0 or below gives a schedule that is not a path from noise to data, and the
    # sampler would still run: a wrong image, not an error, unless it is caught here.
    numbers = {"shift": schedule.shift, "num_train_timesteps": schedule.num_train_timesteps}
    if schedule.use_dynamic_shifting:
        numbers |= {"base_shift": schedule.base_shift, "max_shift": schedule.max_shift}
    for key, value in numbers.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ZImageKitError(f"{path}: {key} must be a number, got {value!r}; copy scheduler/ again")
    if schedule.shift <= 0 or schedule.num_train_timesteps < 1:
        raise ZImageKitError(f"{path}: shift must be > 0 and num_train_timesteps >= 1, got {schedule.shift} and "
                             f"{schedule.num_train_timesteps}; Z-Image-Turbo's are 3.0 and 1000")
    if schedule.use_dynamic_shifting and schedule.base_image_seq_len >= schedule.max_image_seq_len:
        raise ZImageKitError(f"{path}: base_image_seq_len must be below max_image_seq_len for dynamic shifting")
    return schedule, raw


def save_with_transformer(folder: ModelFolder, transformer: S3DiT, out: Path, dtype: torch.dtype) -> None:
    """Write ``folder`` to ``out`` with ``transformer`` in place of its own, stored in ``dtype``
    (the module is cast in place: no second copy of a 6B model), every other component and
    ``model_index.json`` copied byte for byte (a replaced component from where it was taken),
    atomically (a failure leaves ``out`` as it was). How a trained or post-trained transformer
    ships."""
    import shutil

    from .fileio import atomic_folder

    root, skip = folder.root.resolve(), {"transformer", *folder.overrides}
    with atomic_folder(Path(out)) as tmp:
        shutil.copytree(root, tmp, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if n in skip] if Path(d).resolve() == root else [])
        for name, where in folder.overrides.items():
            if name != "transformer":
                shutil.copytree(where, tmp / name)
        transformer.to(dtype).save_pretrained(tmp / "transformer")


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


class ZImagePipeline:
    """Text-to-image (and image-to-image) with Z-Image / Z-Image-Turbo.

    ``transformer`` is an :class:`~zimagekit.s3dit.S3DiT`, ``vae`` a diffusers
    ``AutoencoderKL`` (its ``scaling_factor``/``shift_factor`` map latents), ``text_encoder`` a
    :class:`~zimagekit.text_encoder.Qwen3TextEncoder`.  With ``offload=True`` every component
    waits on the CPU and visits ``device`` only while it runs (text encoder, then transformer,
    then VAE), which trades transfer time for memory.
    """

    def __init__(
        self,
        transformer: S3DiT,
        vae,
        text_encoder: Qwen3TextEncoder,
        schedule: ScheduleConfig | None = None,
        device: torch.device | str | None = None,
        offload: bool = False,
        scheduler_config: dict | None = None,
        defaults: dict | None = None,
        controlnet=None,
    ):
        self.transformer = transformer
        self.controlnet = controlnet  # a zimagekit.controlnet.ZImageControlNet, or None
        self.defaults = {**TURBO_DEFAULTS, **(defaults or {})}
        self.vae = vae
        self.text_encoder = text_encoder
        self.schedule = schedule or ScheduleConfig()
        self.device = resolve_device(device)
        self.offload = offload
        # Kept only so save_pretrained writes back every field the folder had.
        self._scheduler_config = dict(scheduler_config or {})
        self.vae_scale_factor = vae_downsampling(vae.config.block_out_channels)
        self.image_multiple = self.vae_scale_factor * transformer.config.all_patch_size[0]

    # -- loading and saving ------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        offload: bool = False,
        load_text_encoder: bool = True,
        transformer: str | Path | None = None,
        quantize: str | None = None,
        controlnet: str | Path | None = None,
    ) -> ZImagePipeline:
        """Load a Z-Image folder.  ``dtype`` (default fp32; use bf16 for the real model) applies to
        the transformer and text encoder; the VAE stays fp32 when its config asks
        (``force_upcast``, true for the Flux VAE).  Any unusable component raises one
        :class:`ZImageKitError` naming it.

        ``load_text_encoder=False`` skips the Qwen3 weights, for callers that encoded their
        prompts first with :func:`load_text_encoder` and freed it, so the text encoder and the
        transformer are never in memory together.

        ``transformer`` replaces the folder's ``transformer/``: another folder, a single
        safetensors file (diffusers or ComfyUI names) or a GGUF file, which stays quantized
        (:mod:`zimagekit.quantized`); a single file is read with the folder's
        ``transformer/config.json``. ``quantize="fp8"`` stores the transformer blocks' linear
        weights as fp8 e4m3 with per-row scales (half of bf16's memory); ``"fp8-matmul"`` also
        multiplies in fp8 (Hopper's fp8 GEMM; see :mod:`zimagekit.quantized`).

        ``controlnet``: a Z-Image ControlNet (diffusers folder or released single file, see
        :mod:`zimagekit.controlnet`) for ``control_image``.
        """
        if quantize not in (None, "fp8", "fp8-matmul"):
            raise ZImageKitError(f"quantize={quantize!r} is not supported; use 'fp8' or 'fp8-matmul' (or a GGUF file "
                                 "as transformer)")
        model = ModelFolder.open(folder)
        dtype = resolve_dtype(dtype)
        device = resolve_device(device)
        home = torch.device("cpu") if offload else device
        if quantize and transformer is not None and Path(transformer).suffix == ".gguf":
            raise ZImageKitError(f"{Path(transformer).name} is already quantized; leave out fp8 (it applies to a "
                                 "dense transformer)")
        if quantize == "fp8-matmul" and device.type == "cuda" and (
                dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) < (8, 9)):
            raise ZImageKitError("fp8 matmuls on CUDA need bf16 (--dtype bf16) and a GPU of compute capability 8.9 "
                                 "or newer (Ada, Hopper); use fp8 weights alone (--fp8) here")
        schedule, raw_schedule = read_schedule_config(model.component("scheduler") / "scheduler_config.json")

        with _loading(model, "transformer"):
            config = None
            own = model.component("transformer") / "config.json"
            if transformer is not None and Path(transformer).is_file() and own.is_file():
                config = S3DiT.config_class.from_json(own)  # a single file carries no config: the folder's
            # fp8 is quantized on the CPU before the move, so the device never holds the dense weights
            transformer = S3DiT.from_pretrained(transformer or model.component("transformer"), dtype=dtype,
                                                device="cpu" if quantize else home, config=config)
        if quantize:
            from .quantized import quantize_fp8

            transformer = quantize_fp8(transformer, matmul=quantize == "fp8-matmul").to(home)
        transformer.requires_grad_(False).eval()
        vae_dtype = torch.float32 if model.vae_force_upcast else dtype
        with _loading(model, "vae"):
            vae = AutoencoderKL.from_pretrained(model.component("vae"), dtype=vae_dtype, device=home)
        vae.requires_grad_(False)
        control = None
        if controlnet is not None:
            from .controlnet import ZImageControlNet

            control = ZImageControlNet.from_pretrained(controlnet, transformer.config, dtype=dtype, device=home)
            control.check_transformer(transformer, str(controlnet))
        if load_text_encoder:
            text_encoder = _load_text_encoder(model, dtype, home)
        else:
            text_encoder = Qwen3TextEncoder(None, None, model.component("text_encoder"), model.component("tokenizer"))
        return cls(transformer, vae, text_encoder, schedule, device, offload, raw_schedule, model.defaults, control)

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the Hugging Face layout (loadable by this class and by diffusers).

        ``dtype`` stores the transformer and the VAE in it (bf16 halves a folder; loading casts
        to the dtype asked for, the VAE to fp32) without changing this pipeline's modules: they
        are cast as copies, which for a moment costs the memory of one more of each. The text
        encoder is written as it is."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        transformer, vae = self.transformer, self.vae
        if dtype is not None:
            transformer = copy.deepcopy(transformer).to(dtype)
            # nn.Module.to, not diffusers' ModelMixin.to, which warns against any cast of a
            # loaded model; a stored copy is what it recommends instead.
            vae = torch.nn.Module.to(copy.deepcopy(vae), dtype)
        transformer.save_pretrained(folder / "transformer")
        vae.save_pretrained(folder / "vae")
        self.text_encoder.save_pretrained(folder / "text_encoder", folder / "tokenizer")
        scheduler = {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            **self._scheduler_config,
            **{f.name: getattr(self.schedule, f.name) for f in fields(ScheduleConfig)},
        }
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index = dict(MODEL_INDEX)
        own = {k: v for k, v in self.defaults.items() if TURBO_DEFAULTS[k] != v}
        if own:
            index["_zimagekit_defaults"] = own
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    # -- components on and off the device ----------------------------------------------------

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module):
        """Bring an offloaded component (if loaded) to the execution device for a block."""
        move = self.offload and module is not None
        if move:
            module.to(self.device)
        try:
            yield module
        finally:
            if move:
                module.to("cpu")

    def free_text_encoder(self) -> None:
        """Drop the Qwen3 weights (7.3 GiB in bf16 for the real model) once prompts are encoded.

        Later calls must pass ``prompt_embeds`` (and ``negative_prompt_embeds`` with guidance).
        The memory comes back only if nothing else still references the model.
        """
        self.text_encoder.free()

    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 512) -> list[torch.Tensor]:
        """Caption features (list of ``(L_i, cap_feat_dim)``) for one prompt or a list of prompts."""
        prompts = _as_prompt_list(prompts, "prompt")
        with self._on_device(self.text_encoder.model):
            return self.text_encoder.encode(prompts, max_sequence_length)

    # -- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        cfg_normalization: float | bool = 0.0,
        cfg_truncation: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: Sequence[torch.Tensor] | None = None,
        negative_prompt_embeds: Sequence[torch.Tensor] | None = None,
        init_image=None,
        mask_image=None,
        strength: float | None = None,
        max_sequence_length: int = 512,
        image=None,
        control_image=None,
        controlnet_conditioning_scale: float = 0.75,
        output_type: str = "pil",
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
    ):
        """Generate images. ``None`` arguments take the model folder's defaults
        (``self.defaults``), which are Z-Image-Turbo's unless the folder records its own:
        8 steps, no guidance, 1024².

        Args:
            prompt: one prompt or a list (a batch; lengths may differ).  Or pass ``prompt_embeds``.
            negative_prompt: used only when ``guidance_scale > 0``; one for all prompts or one
                per prompt; default empty.
            height, width: multiples of ``self.image_multiple`` (16); default 1024, or the init
                image's size (rounded down) for img2img.
            num_inference_steps: transformer calls (N steps = N NFEs).
            guidance_scale: ``w`` in pred = pos + w·(pos − neg) (standard CFG scale − 1); on for
                w > 0, as in diffusers ≥ 0.37.
            cfg_normalization: c > 0 caps ‖pred‖ at c·‖pos‖ per image (True means 1).
            cfg_truncation: guidance is off for steps whose t = 1 − σ exceeds this.
            num_images_per_prompt: images per prompt, ordered prompt by prompt.
            generator: a CPU ``torch.Generator``, or one per image; ``seed`` builds one.
            latents: the initial noise ε, ``(B, 16, H/8, W/8)``, instead of drawing it.  For
                img2img too (diffusers' img2img instead takes already-noised latents).
            init_image: a PIL image (or one per prompt) turns this into img2img; the image is
                encoded, noised to the σ where ``strength`` says to start (diffusers'
                semantics: N·strength of the N steps run; default 0.6), then denoised.
                ``image`` is the same argument under diffusers' name.
            mask_image: with an init image, inpainting as diffusers' ``ZImageInpaintPipeline``
                does it: a PIL image of the init image's size (or one per prompt), grey levels ≥
                0.5 (white) regenerated and the rest kept; after every step the kept region is
                reset to the init image noised to that step's σ. ``strength`` defaults to 1.0.
            control_image: with a ControlNet loaded, a PIL image (or one per prompt) whose VAE
                latents steer generation, as diffusers' ``ZImageControlNetPipeline``; it is resized to
                the output size, which defaults to the folder's (not the control image's: diffusers
                does so too). Its hints are scaled by ``controlnet_conditioning_scale``.
                With ``mask_image`` and ``init_image`` too, inpainting goes through the ControlNet
                (its 2.x releases take the mask and masked image as extra channels), from pure
                noise and with no blending, as ``ZImageControlNetInpaintPipeline`` does.
            output_type: "pil" (list of images), "pt" (``(B, 3, H, W)`` in [0, 1]) or "latent"
                (the final latents, before the VAE's scaling and shift).
            callback: called after every step with the sampler's dict (see
                :func:`zimagekit.sampling.sample_euler`).
            progress: show a tqdm progress bar.
        """
        if output_type not in OUTPUT_TYPES:
            raise ZImageKitError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        # Prompts -> caption features, one list entry per image.
        if prompt_embeds is None:
            if prompt is None:
                raise ZImageKitError("pass a prompt (or prompt_embeds)")
            prompts = _as_prompt_list(prompt, "prompt")
        else:
            prompts = None
            prompt_embeds = list(prompt_embeds)
        num_prompts = len(prompts) if prompts is not None else len(prompt_embeds)
        if image is not None:
            if init_image is not None:
                raise ZImageKitError("pass init_image or image (the same argument under diffusers' name), not both")
            init_image = image
        images = _as_image_list(init_image, num_prompts, "init_image") if init_image is not None else None
        masks = _as_image_list(mask_image, num_prompts, "mask_image") if mask_image is not None else None
        controls = _as_image_list(control_image, num_prompts, "control_image") if control_image is not None else None
        if controls is not None and self.controlnet is None:
            raise ZImageKitError("control_image needs a ControlNet: ZImagePipeline.from_pretrained(..., controlnet=PATH)")
        if not math.isfinite(controlnet_conditioning_scale):
            raise ZImageKitError(f"controlnet_conditioning_scale must be a finite number, got {controlnet_conditioning_scale}")
        # With a ControlNet, a mask is a ControlNet input and the image is generated from noise.
        control_inpaint = controls is not None and masks is not None
        if control_inpaint and strength is not None:
            raise ZImageKitError("strength does not apply to ControlNet inpainting, which denoises from pure noise")
        request = GenerationRequest(
            num_prompts=num_prompts, width=width, height=height, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, cfg_normalization=float(cfg_normalization), cfg_truncation=cfg_truncation,
            num_images_per_prompt=num_images_per_prompt, seed=seed, img2img=images is not None,
            inpaint=masks is not None, strength=strength, max_sequence_length=max_sequence_length,
        ).validate().resolved(self.defaults, self.image_multiple,
                              images[0].size if images and not controls else None)
        if masks is not None:
            _check_masks(masks, images)
        do_cfg = request.guidance_scale > 0

        negatives = None
        if do_cfg and negative_prompt_embeds is None:
            if prompts is None and negative_prompt is None:
                raise ZImageKitError("with prompt_embeds and guidance, pass negative_prompt_embeds or negative_prompt")
            negatives = _negative_list(negative_prompt, num_prompts)
        texts = (prompts or []) + (negatives or [])
        encoded = self.encode_prompt(texts, max_sequence_length) if texts else []
        if prompts is not None:
            prompt_embeds, encoded = encoded[:num_prompts], encoded[num_prompts:]
        if do_cfg:
            negative_prompt_embeds = encoded if negatives is not None else list(negative_prompt_embeds)
            if len(negative_prompt_embeds) != num_prompts:
                raise ZImageKitError(f"{len(negative_prompt_embeds)} negative prompts for {num_prompts} prompts")
        batch = request.num_images

        # Latent shape and schedule.
        height, width, num_inference_steps = request.height, request.width, request.num_inference_steps
        shape = (
            batch,
            self.transformer.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        image_seq_len = self.transformer.config.image_tokens(shape[2], shape[3])
        sigmas = get_sigmas(num_inference_steps, self.schedule, image_seq_len)
        if images is not None:
            sigmas = sigmas[img2img_start(num_inference_steps, request.strength) :]

        # Starting latents: noise, or (img2img) the noised image latents.
        generators = _generators(generator, seed, batch)
        if latents is not None and tuple(latents.shape) != shape:
            raise ZImageKitError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        after_step = None
        control = None
        if controls is not None:
            control = self._control_latents(controls, images if control_inpaint else None, masks if control_inpaint
                                            else None, width, height, shape, num_images_per_prompt)
        if images is None or control_inpaint:
            noise = latents if latents is not None else cpu_randn(shape, generators)
            x = noise.to(self.device, torch.float32)
        else:
            x0 = self._encode_images(images, width, height, batch, num_images_per_prompt, generators)
            noise = (latents if latents is not None else cpu_randn(shape, generators)).to(self.device, torch.float32)
            x = add_noise(x0, noise, sigmas[0])
            if masks is not None:
                mask = _latent_masks(masks, width, height, shape, num_images_per_prompt).to(self.device)

                def after_step(x_next, sigma_next):
                    return keep_unmasked(x_next, x0, noise, mask, sigma_next)

        caps = [pe for pe in prompt_embeds for _ in range(num_images_per_prompt)]
        neg_caps = [ne for ne in negative_prompt_embeds for _ in range(num_images_per_prompt)] if do_cfg else None
        x = self._denoise(x, sigmas, caps, neg_caps, request, generators, callback=callback, progress=progress,
                          after_step=after_step, control=control, control_scale=controlnet_conditioning_scale)
        if output_type == "latent":
            return x
        return self.decode(x, output_type)

    def _denoise(self, x, sigmas, caps, neg_caps, request: GenerationRequest, generators, *, callback, progress,
                 after_step=None, control=None, control_scale=1.0):
        """Run the Euler sampler with the S3-DiT and Z-Image CFG; everything that depends only
        on the schedule (model times, guidance per step, caption batches) is built once here."""
        from tqdm.auto import tqdm

        model = self.transformer
        batch = x.shape[0]
        caps = [c.to(self.device, model.dtype) for c in caps]
        scales = cfg_scales(sigmas, request.guidance_scale, request.cfg_truncation) if neg_caps is not None else None
        both_caps = caps + [c.to(self.device, model.dtype) for c in neg_caps] if neg_caps is not None else None
        # The DiT's time input is t = 1 − σ (PAPER eq. 1 convention), one row per batch entry.
        times = time_from_sigma(sigmas[:-1]).to(self.device)

        if control is None:
            run = model
        else:
            from .controlnet import controlled_forward

            def run(latent, t, captions):
                rows = control if len(latent) == len(control) else torch.cat([control, control])
                return controlled_forward(model, self.controlnet, latent, t, captions, rows, control_scale)

        def velocity(x: torch.Tensor, sigma: torch.Tensor, i: int) -> torch.Tensor:
            latent = x.to(model.dtype).unsqueeze(2)  # (B, C, F=1, H, W)
            if scales is not None and scales[i] > 0:
                out = run(torch.cat([latent, latent]), times[i].expand(2 * batch), both_caps)
                pos, neg = out.squeeze(2).float().chunk(2)
                return cfg_combine(pos, neg, scales[i], request.cfg_normalization)
            return run(latent, times[i].expand(batch), caps).squeeze(2).float()

        controlnet = self.controlnet if control is not None else None
        with self._on_device(model), self._on_device(controlnet), \
                tqdm(total=len(sigmas) - 1, disable=not progress, leave=False) as bar:

            def on_step(info: dict) -> None:
                bar.update()
                if callback is not None:
                    callback(info)

            fresh_noise = None
            if self.schedule.stochastic_sampling:  # drawn on the CPU like the initial noise

                def fresh_noise(i: int) -> torch.Tensor:
                    return cpu_randn(tuple(x.shape), generators, self.device)

            return sample_euler(velocity, x, sigmas, on_step, fresh_noise, after_step)

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents → images in [0, 1] (``"pt"``) or PIL; one image at a time to bound VAE memory."""
        config = self.vae.config
        images = []
        with self._on_device(self.vae):
            for z in latents.split(1):
                z = unscale_latents(z.to(self.device, self.vae.dtype), config)
                images.append(from_vae_output(self.vae.decode(z).sample))
        images = torch.cat(images)
        if output_type == "pt":
            return images
        from PIL import Image

        return [Image.fromarray(p) for p in to_uint8(images)]

    @torch.no_grad()
    def _control_latents(self, controls, images, masks, width, height, shape, per_prompt) -> torch.Tensor:
        """The ControlNet's input, one row per output image: the control images' VAE posterior
        means (diffusers' ``sample_mode="argmax"``), scaled, as (B, C, 1, h, w). With ``masks``
        (ControlNet inpainting) the kept region's flag (1 − mask, at the latent grid) and the
        latents of the init image with the masked pixels zeroed follow, as diffusers stacks
        them; otherwise zero channels pad it to the ControlNet's ``control_in_dim``."""
        def pixels(pil_images):
            return to_vae_input(_resized_pixels(pil_images, width, height)).to(self.device, self.vae.dtype)

        def encode(x):
            with self._on_device(self.vae):
                return scale_latents(self.vae.encode(x).latent_dist.mean.float(), self.vae.config)

        owner = lambda n: _owners(shape[0], per_prompt, n)  # noqa: E731
        latents = encode(pixels(controls))[owner(len(controls))]
        need = self.controlnet.config.control_in_dim
        if masks is not None:
            if need != 2 * shape[1] + 1:
                raise ZImageKitError(f"this ControlNet takes {need} input channels, not the {2 * shape[1] + 1} of "
                                     "inpainting (a 2.x Union release has them); leave out mask_image")
            full = _binary_masks(masks, width, height).to(self.device)
            n = max(len(images), len(masks))  # one image and one mask, or one of either per prompt
            pick = lambda items, k: items[min(k, len(items) - 1)]  # noqa: E731
            masked = encode(torch.cat([pixels([pick(images, k)]) * (pick(full, k) < 0.5).to(self.vae.dtype)
                                       for k in range(n)]))
            keep = 1 - torch.nn.functional.interpolate(full, size=shape[2:], mode="nearest")
            latents = torch.cat([latents, keep[owner(len(masks))], masked[owner(n)]], dim=1)
        elif need > latents.shape[1]:
            latents = torch.cat([latents, latents.new_zeros(shape[0], need - latents.shape[1], *shape[2:])], dim=1)
        elif need < latents.shape[1]:
            raise ZImageKitError(f"this ControlNet takes {need} input channels, fewer than the VAE's {latents.shape[1]}")
        return latents.unsqueeze(2)

    def _encode_images(self, images, width, height, batch, per_prompt, generators) -> torch.Tensor:
        """Init images → clean latents, one row per output image.

        Follows diffusers' img2img: LANCZOS resize, [-1, 1], a *sample* of the VAE posterior,
        then ``(z − shift)·scale``.  With one generator the posterior noise for all init images is
        drawn before the initial noise, as diffusers does; with one generator per image, each
        image draws its own posterior noise and then its own initial noise, so any image is
        reproducible from its own seed.
        """
        pixels = to_vae_input(_resized_pixels(images, width, height)).to(self.device)
        config = self.vae.config
        with self._on_device(self.vae):
            posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        # Output image b belongs to prompt b // per_prompt; a single init image serves them all.
        owner = _owners(batch, per_prompt, len(images))
        if isinstance(generators, list):
            eps = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in generators]).to(self.device)
            z = mean[owner] + std[owner] * eps
        else:
            eps = torch.randn(mean.shape, generator=generators).to(self.device)
            z = (mean + std * eps)[owner]
        return scale_latents(z, config)


# ---------------------------------------------------------------------------------------------
# Input helpers
# ---------------------------------------------------------------------------------------------


def _as_prompt_list(prompt, what: str) -> list[str]:
    """A new list of prompt strings (the caller's list is never touched)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    for p in prompts:
        if not isinstance(p, str):
            raise ZImageKitError(f"each {what} must be a string, got {type(p).__name__}")
    return prompts


def _negative_list(negative_prompt, num_prompts: int) -> list[str]:
    if negative_prompt is None:
        return [""] * num_prompts
    if isinstance(negative_prompt, str):
        return [negative_prompt] * num_prompts
    negatives = _as_prompt_list(negative_prompt, "negative prompt")
    if len(negatives) != num_prompts:
        raise ZImageKitError(
            f"{len(negatives)} negative prompts for {num_prompts} prompts; pass one, or one per prompt"
        )
    return negatives


def _as_image_list(images, num_prompts: int, name: str) -> list:
    from PIL import Image

    images = [images] if isinstance(images, Image.Image) else list(images)
    if not all(isinstance(i, Image.Image) for i in images):
        raise ZImageKitError(f"{name} must be a PIL image or a list of PIL images")
    if len(images) not in (1, num_prompts):
        raise ZImageKitError(f"{len(images)} {name}s for {num_prompts} prompts; pass one, or one per prompt")
    return images


def _owners(batch: int, per_prompt: int, n: int) -> list[int]:
    """Which of ``n`` per-prompt inputs each output image uses: image b belongs to prompt
    b // per_prompt; a single input serves them all."""
    return [min(b // per_prompt, n - 1) for b in range(batch)]


def _resized_pixels(images: list, width: int, height: int) -> torch.Tensor:
    """PIL images → uint8 (N, 3, height, width), LANCZOS-resized where their size differs, as
    diffusers' image processor does."""
    from PIL import Image

    out = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        out.append(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
    return torch.stack(out)


def _check_masks(masks: list, images: list) -> None:
    """A mask must cover its image: a mask of another size is most likely the wrong file."""
    for k, mask in enumerate(masks):
        image = images[min(k, len(images) - 1)]
        if mask.size != image.size:
            raise ZImageKitError(f"the mask is {mask.size[0]}x{mask.size[1]} but the init image is "
                                 f"{image.size[0]}x{image.size[1]}; give a mask of the image's size")


def _binary_masks(masks: list, width: int, height: int) -> torch.Tensor:
    """(N, 1, H, W) float32 masks as diffusers makes them: greyscale, LANCZOS to the output
    size, [0, 1], binarised at 0.5."""
    from PIL import Image

    rows = []
    for mask in masks:
        grey = mask.convert("L")
        if grey.size != (width, height):
            grey = grey.resize((width, height), resample=Image.LANCZOS)
        m = torch.from_numpy(np.array(grey).astype(np.float32) / 255.0)
        rows.append((m >= 0.5).float()[None, None])
    return torch.cat(rows)


def _latent_masks(masks: list, width: int, height: int, shape: tuple, per_prompt: int) -> torch.Tensor:
    """(B, 1, h, w) masks at the latent grid (nearest neighbour from :func:`_binary_masks`),
    one row per output image."""
    m = torch.nn.functional.interpolate(_binary_masks(masks, width, height), size=shape[2:], mode="nearest")
    return m[_owners(shape[0], per_prompt, len(masks))]


def _generators(generator, seed: int | None, batch: int):
    """One CPU generator (or None: torch's global RNG) or a list with one per image."""
    if generator is None and seed is not None:
        generator = torch.Generator("cpu").manual_seed(seed)
    many = isinstance(generator, (list, tuple))
    for g in generator if many else [generator]:
        if g is not None and g.device.type != "cpu":
            raise ZImageKitError(
                "pass a CPU torch.Generator: noise is drawn on the CPU so a seed gives the same image on every device"
            )
    if many:
        if len(generator) != batch:
            raise ZImageKitError(f"{len(generator)} generators for {batch} images; pass one, or one per image")
        return list(generator)
    return generator


