"""Generation parameters written into PNGs: A1111 ``parameters`` text plus a JSON chunk.

The ``parameters`` text is the AUTOMATIC1111 "infotext" that sd.cpp, Civitai and most image
browsers parse::

    a photo of a cat
    Negative prompt: blurry
    Steps: 8, Sampler: Euler, CFG scale: 0, Seed: 42, Size: 1024x1024, Model: Z-Image-Turbo

The ``zimagekit`` chunk holds the same values as JSON for programs.  ``CFG scale`` is the
Z-Image / diffusers guidance scale ``w`` (pred = pos + w·(pos − neg)), i.e. the standard
CFG scale minus one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from PIL.PngImagePlugin import PngInfo

from . import __version__

__all__ = ["GenerationInfo", "infotext", "png_info"]


@dataclass
class GenerationInfo:
    """What it takes to reproduce one image."""

    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    strength: float | None = None  # img2img only
    mask: str | None = None  # inpainting: the mask file's name
    controlnet: str | None = None  # "ControlNet name, control image name"
    control_scale: float | None = None
    sampler: str = "Euler"
    loras: tuple[str, ...] = ()  # "name:scale" of each LoRA merged into the transformer


def _quote(value) -> str:
    """A1111 quotes a value with JSON when it contains a separator (``,``, ``:`` or a newline)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float) -> str:
    return f"{value:g}"


def infotext(info: GenerationInfo) -> str:
    """The A1111 ``parameters`` text: prompt, optional negative line, then ``Key: value`` pairs."""
    lines = [info.prompt]
    if info.negative_prompt:
        lines.append(f"Negative prompt: {info.negative_prompt}")
    fields = {
        "Steps": info.steps,
        "Sampler": info.sampler,
        "CFG scale": _number(info.cfg_scale),
        "Seed": info.seed,
        "Size": f"{info.width}x{info.height}",
        "Model": info.model,
    }
    if info.cfg_normalization:
        fields["CFG normalization"] = _number(info.cfg_normalization)
    if info.cfg_truncation < 1:
        fields["CFG truncation"] = _number(info.cfg_truncation)
    if info.strength is not None:
        fields["Denoising strength"] = _number(info.strength)
    if info.mask is not None:
        fields["Mask"] = info.mask
    if info.controlnet is not None:
        fields["ControlNet"] = info.controlnet
        fields["Control scale"] = _number(info.control_scale)
    if info.loras:
        fields["LoRA"] = " ".join(info.loras)
    fields["Version"] = f"zimagekit {__version__}"
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def png_info(info: GenerationInfo) -> PngInfo:
    """PNG text chunks ``parameters`` (A1111) and ``zimagekit`` (JSON); non-Latin-1 text
    (e.g. Chinese prompts) goes into iTXt chunks, which PIL picks automatically."""
    chunks = PngInfo()
    chunks.add_text("parameters", infotext(info))
    chunks.add_text("zimagekit", json.dumps({**asdict(info), "version": __version__}, ensure_ascii=False))
    return chunks
