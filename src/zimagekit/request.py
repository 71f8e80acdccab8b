"""One image-generation request: its settings, the model folder's defaults for the ones left
out, and every check that can run before a weight is loaded.

:class:`ZImagePipeline` and ``zimagekit generate`` both build a :class:`GenerationRequest`, so
a setting has one default and one check wherever it comes from; only the wording of the error
differs (``labels``: the pipeline names its keyword arguments, the command line its flags).
No torch here, so the command line checks its flags before importing it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ZImageKitError

# A seed is a torch.Generator seed: 0 .. 2^64 − 1.
MAX_SEED = 2**64 - 1

# How the pipeline's errors name each setting (its keyword arguments, in words).
PIPELINE_LABELS = {
    "width": "width", "height": "height", "num_inference_steps": "steps", "guidance_scale": "guidance scale",
    "cfg_normalization": "cfg_normalization", "cfg_truncation": "cfg_truncation",
    "num_images_per_prompt": "num_images_per_prompt", "seed": "seed", "strength": "strength",
    "max_sequence_length": "max_sequence_length", "init_image": "init_image", "mask_image": "mask_image",
}


def check_image_size(width: int, height: int, multiple: int) -> None:
    """Width and height must be positive multiples of ``multiple``; the error suggests the nearest."""
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple:
            lower = max(multiple, value // multiple * multiple)
            upper = lower if value < multiple else lower + multiple
            choices = f"{lower}" if lower == upper else f"{lower} or {upper}"
            raise ZImageKitError(f"{name} {value} is not a multiple of {multiple}; use {choices}")


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``None`` means the model folder's default (:meth:`resolved`), which is
    Z-Image-Turbo's unless the folder records its own; sizes default to the init image's
    (rounded down to the model's multiple) for img2img."""

    num_prompts: int = 1
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None  # w in pred = pos + w·(pos − neg); 0: off
    cfg_normalization: float = 0.0  # c > 0 caps ‖pred‖ at c·‖pos‖
    cfg_truncation: float = 1.0  # no guidance once t = 1 − σ exceeds this
    num_images_per_prompt: int = 1
    seed: int | None = None  # image k uses seed + k
    img2img: bool = False
    inpaint: bool = False  # a mask with the init image
    strength: float | None = None  # img2img only; None: 0.6, or 1.0 for inpainting (diffusers' defaults)
    max_sequence_length: int = 512

    @property
    def num_images(self) -> int:
        return self.num_prompts * self.num_images_per_prompt

    def validate(self, labels: dict[str, str] = PIPELINE_LABELS) -> GenerationRequest:
        """Check every setting on its own (no model needed); returns ``self``. Errors name
        settings as ``labels`` does."""
        def fail(key: str, problem: str):
            raise ZImageKitError(f"{labels[key]} {problem}")

        for key in ("guidance_scale", "cfg_normalization", "cfg_truncation", "strength"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                fail(key, f"must be a finite number, got {value}")
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is not None and value < 1:
                fail(key, f"must be a positive number of pixels, got {value} (leave it out for the model's default)")
        for key in ("num_inference_steps", "num_images_per_prompt", "max_sequence_length"):
            value = getattr(self, key)
            if value is not None and value < 1:
                fail(key, f"must be at least 1, got {value}")
        if self.num_prompts < 1:
            raise ZImageKitError("the prompt list is empty")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            fail("guidance_scale", f"must be >= 0 (0 turns guidance off), got {self.guidance_scale}")
        if float(self.cfg_normalization) < 0:
            fail("cfg_normalization", f"must be >= 0 (0 turns it off), got {self.cfg_normalization}")
        if self.seed is not None and self.seed < 0:
            fail("seed", f"must be >= 0, got {self.seed}")
        if self.seed is not None and self.seed > MAX_SEED - (self.num_images - 1):
            fail("seed", f"{self.seed} is too large: the {self.num_images} image(s) use seeds seed .. seed + "
                         f"{self.num_images - 1}, and a seed is at most 2^64 - 1")
        if self.inpaint and not self.img2img:
            fail("mask_image", f"needs {labels['init_image']} (the image to inpaint)")
        if self.strength is not None:
            if not self.img2img:
                fail("strength", f"needs {labels['init_image']}")
            if not 0 < self.strength <= 1:
                fail("strength", f"must be in (0, 1], got {self.strength}")
        return self

    def resolved(self, defaults: dict, multiple: int, init_size: tuple[int, int] | None = None) -> GenerationRequest:
        """Every ``None`` filled: steps and guidance from ``defaults`` (a folder's recorded
        defaults), the size from the init image (``init_size``, rounded down to ``multiple``)
        or ``defaults``, strength 0.6 (1.0 to inpaint); the size checked against ``multiple``."""
        width = self.width or (init_size[0] // multiple * multiple if init_size else defaults["width"])
        height = self.height or (init_size[1] // multiple * multiple if init_size else defaults["height"])
        check_image_size(width, height, multiple)
        return dataclasses.replace(
            self, width=width, height=height,
            num_inference_steps=(defaults["num_inference_steps"] if self.num_inference_steps is None
                                 else self.num_inference_steps),
            guidance_scale=defaults["guidance_scale"] if self.guidance_scale is None else self.guidance_scale,
            strength=(1.0 if self.inpaint else 0.6) if self.strength is None else self.strength)

    def image_seeds(self) -> list[int]:
        """The seed of each image, in output order (prompt by prompt)."""
        if self.seed is None:
            raise ValueError("the request has no seed")
        return [self.seed + k for k in range(self.num_images)]
