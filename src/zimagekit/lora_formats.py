"""The LoRA file layouts people share for Z-Image, read into diffusers' names.

diffusers' layout (``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, alpha folded into
the factors) is the one :class:`zimagekit.lora.LoRA` applies; every other layout is renamed
here, with the result diffusers' own Z-Image converter gives for the same file
(``tests/test_lora_formats.py`` compares them key by key):

* prefixes: ``diffusion_model.`` (ComfyUI, musubi-tuner), ``transformer.`` (diffusers),
  ``base_model.model.`` (a saved peft model), ``lora_unet_`` (kohya/sd-scripts, whose module
  path joins every name with ``_``: ``lora_unet_layers_0_attention_to_q``);
* factor names: ``lora_A``/``lora_B`` (diffusers, peft; ``lora_A.default.weight`` when peft
  keeps its adapter name), ``lora_down``/``lora_up`` (kohya, ComfyUI), ``lora.down``/``lora.up``
  (some trainers write dots);
* ``<module>.alpha``: the update is ``(alpha / rank) · up · down`` (Hu et al. 2021, eq. 3), so
  the factor is folded into the two matrices, split between them as diffusers splits it;
* the original module names: ``attention.qkv`` (fused q/k/v: one down matrix, the up matrix
  cut in three; dropped when the file also has split q/k/v), ``attention.out``
  (``attention.to_out.0``; dropped beside it).

A key that fits none of these is named in a one-line error: a file is never half-applied.
"""

from __future__ import annotations

import logging
import math
import re

import torch

from .errors import ZImageKitError

logger = logging.getLogger(__name__)

_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "lora_unet_")
# factor name -> "A" (down) or "B" (up), most specific first
_FACTORS = (
    (".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora_down.weight", "A"), (".lora_up.weight", "B"),
    (".lora.down.weight", "A"), (".lora.up.weight", "B"),
    (".alpha", "alpha"),
)  # fmt: skip
# Module names whose own underscores a kohya path (or a dotted one) hides, longest first.
_NAMES = ("context_refiner", "noise_refiner", "adaLN_modulation", "all_final_layer", "all_x_embedder",
          "cap_embedder", "t_embedder", "feed_forward", "attention_norm1", "to_out", "to_q", "to_k", "to_v")


def _module_path(stem: str) -> str:
    """``layers_0_attention_to_q`` or ``layers.0.attention.to.q`` → ``layers.0.attention.to_q``:
    split on both separators, then rejoin the known names that contain an underscore."""
    path = stem.replace("_", ".")
    for name in _NAMES:
        path = re.sub(rf"(^|\.){re.escape(name.replace('_', '.'))}(?=\.|$)", rf"\g<1>{name}", path)
    return path


def _alpha_split(scale: float) -> tuple[float, float]:
    """``alpha / rank`` as (down, up) factors, halving up and doubling down while down·2 < up
    (diffusers' split, so the folded tensors equal its converter's)."""
    down, up = scale, 1.0
    while down * 2 < up:
        down *= 2
        up /= 2
    return down, up


def to_diffusers_lora(state: dict[str, torch.Tensor], source: str = "LoRA") -> dict[str, torch.Tensor]:
    """``state`` (any layout above) → ``transformer.<module>.lora_A/B.weight`` with alpha folded in."""
    if any(".lokr_" in k or ".hada_" in k for k in state):
        raise ZImageKitError(f"{source}: LoKr/LoHa adapters are not supported, only LoRA (lora_A/lora_B or "
                             "lora_down/lora_up factors)")
    if any("dora_scale" in k for k in state):
        # As diffusers does: DoRA's magnitude vectors are dropped, the low-rank part applies.
        logger.warning("%s: DoRA magnitude vectors (dora_scale) are ignored; only the low-rank update applies", source)
        state = {k: v for k, v in state.items() if "dora_scale" not in k}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        stem = key
        for prefix in _PREFIXES:
            stem = stem.removeprefix(prefix)
        factor = next(((suffix, which) for suffix, which in _FACTORS if stem.endswith(suffix)), None)
        if factor is None:
            unknown.append(key)
            continue
        path = _module_path(stem[: -len(factor[0])])
        modules.setdefault(path, {})[factor[1]] = tensor
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise ZImageKitError(f"{source}: not a LoRA layout zimagekit reads: {shown} (expected e.g. "
                             "transformer.layers.0.attention.to_q.lora_A.weight, kohya lora_unet_..._to_q.lora_down.weight "
                             "or diffusion_model.layers.0.attention.to_q.lora_down.weight)")

    out: dict[str, torch.Tensor] = {}
    for path, factors in modules.items():
        if set(factors) - {"alpha"} != {"A", "B"}:
            if "A" in factors or "B" in factors:
                have = "lora_A/down" if "A" in factors else "lora_B/up"
                raise ZImageKitError(f"{source}: {path} has {have} but not its partner; the file is incomplete")
            raise ZImageKitError(f"{source}: {path} has an alpha but no factors; the file is incomplete")
        down, up = factors["A"], factors["B"]
        if "alpha" in factors:
            alpha = float(factors["alpha"])
            if not math.isfinite(alpha) or alpha <= 0 or down.shape[0] == 0:
                raise ZImageKitError(f"{source}: {path} has alpha {alpha} and rank {down.shape[0]}; both must be "
                                     "positive")
        scale = (_alpha_split(float(factors["alpha"]) / down.shape[0]) if "alpha" in factors else (1.0, 1.0))
        block, _, name = path.rpartition(".attention.")
        if name == "qkv":
            if any(f"{block}.attention.to_{p}" in modules for p in "qkv"):
                continue  # the split keys say the same
            for p, chunk in zip("qkv", up.chunk(3, dim=0)):
                out[f"transformer.{block}.attention.to_{p}.lora_A.weight"] = down * scale[0]
                out[f"transformer.{block}.attention.to_{p}.lora_B.weight"] = chunk * scale[1]
            continue
        if name == "out":
            if f"{block}.attention.to_out.0" in modules:
                continue
            path = f"{block}.attention.to_out.0"
        out[f"transformer.{path}.lora_A.weight"] = down * scale[0]
        out[f"transformer.{path}.lora_B.weight"] = up * scale[1]
    return out
