"""LoRA for the S3-DiT, in the key format diffusers' Z-Image pipeline loads
(``transformer.layers.0.attention.to_q.lora_A.weight`` …); files in the other layouts people
share (kohya, ComfyUI, peft, fused qkv) are renamed on load by :mod:`zimagekit.lora_formats`.

A :class:`LoRA` is its own module: it holds the low-rank factors and adds their output to
the model's linear layers through forward hooks, so the model's parameters and state dict
stay exactly the base checkpoint's, the trainer can optimise ``{"lora": lora}`` as one group
with the base frozen, and several LoRAs can be attached at once.

The model stores q/k/v and w1/w3 fused, but adapters are addressed by the Hugging Face
names: each named part of a fused projection has its own (A, B) and writes its slice of the
fused output. ``ΔW = (alpha / rank) · B A`` (Hu et al. 2021, eq. 3); files store B with
alpha / rank folded in, so a loader that assumes alpha = rank (diffusers without metadata)
applies exactly the same update.

    lora = LoRA.create(model, rank=16)             # train lora.parameters(); model frozen
    lora.save("style.safetensors")
    LoRA.load(model, "style.safetensors", scale=0.8).merge()   # inference without overhead
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import ZImageKitError
from .fileio import atomic_write
from .lora_formats import to_diffusers_lora
from .quantized import QuantizedLinear
from .weights import read_safetensors

# A block's projections whose Hugging Face name differs from the model's layer: name ->
# (internal layer, which part of its fused output, how many parts). Any other Linear (the
# blocks' adaLN_modulation.0, t_embedder.mlp.0, ...) is addressed by its own path.
TARGETS = {
    "attention.to_q": ("attention.qkv", 0, 3),
    "attention.to_k": ("attention.qkv", 1, 3),
    "attention.to_v": ("attention.qkv", 2, 3),
    "attention.to_out.0": ("attention.to_out", 0, 1),
    "feed_forward.w1": ("feed_forward.w13", 0, 2),
    "feed_forward.w3": ("feed_forward.w13", 1, 2),
    "feed_forward.w2": ("feed_forward.w2", 0, 1),
}
_BLOCK = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)$")
_KEY = re.compile(r"^transformer\.(.+)\.lora_([AB])\.weight$")


def _blocks(model: nn.Module):
    for kind in ("noise_refiner", "context_refiner", "layers"):
        for i, block in enumerate(getattr(model, kind)):
            yield f"{kind}.{i}", block


class LoRA(nn.Module):
    """Low-rank adapters on named S3-DiT projections, applied by forward hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # ParameterDict keys may not contain '.', so "layers.3.attention.to_q" is stored as
        # "layers:3:attention:to_q".
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.scale = 1.0
        self.factor = 1.0  # alpha / rank
        self.merged = False
        self._model = [model]  # a list, so the model is not registered as a submodule
        self._hooks = []

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def create(cls, model: nn.Module, rank: int, alpha: float | None = None, targets=tuple(TARGETS)) -> "LoRA":
        """Freeze ``model`` and adapt ``targets`` (Hugging Face names) in every block. B starts
        at zero, so the adapted model starts exactly as the base model."""
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise ZImageKitError(f"unknown LoRA targets {unknown}; choose from {sorted(TARGETS)}")
        if rank < 1:
            raise ZImageKitError(f"LoRA rank must be >= 1, got {rank}")
        model.requires_grad_(False)
        lora = cls(model)
        factor = (alpha if alpha is not None else rank) / rank
        for block_name, block in _blocks(model):
            for target in targets:
                layer = block.get_submodule(TARGETS[target][0])
                a = torch.empty(rank, layer.in_features, device=layer.weight.device)
                nn.init.kaiming_uniform_(a, a=5**0.5)
                out = layer.out_features // TARGETS[target][2]
                lora._set(f"{block_name}.{target}", a, torch.zeros(out, rank, device=a.device))
        lora.factor = factor
        return lora.attach()

    @classmethod
    def load(cls, model: nn.Module, path, scale: float = 1.0) -> "LoRA":
        """Attach the adapters of a LoRA file (any layout :mod:`zimagekit.lora_formats` reads) at
        ``scale``."""
        state = to_diffusers_lora(read_safetensors(Path(path)), str(path))
        if not state:
            raise ZImageKitError(f"{path}: the file holds no LoRA factors")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            m = _KEY.match(key)
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        lora = cls(model)
        for name, ab in pairs.items():
            layer, _, parts, _ = lora._resolve(name, path)
            a, b = ab["A"], ab["B"]
            out = layer.out_features // parts
            if a.shape[1] != layer.in_features or b.shape[0] != out or a.shape[0] != b.shape[1]:
                raise ZImageKitError(f"{path}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}; this model "
                                     f"needs A (r, {layer.in_features}) and B ({out}, r)")
            # a quantized layer's .weight is computed: read its device from the stored data
            device = layer.data.device if isinstance(layer, QuantizedLinear) else layer.weight.device
            lora._set(name, a.to(device), b.to(device))
        lora.requires_grad_(False)
        lora.factor = 1.0  # files carry alpha / rank inside B
        lora.scale = scale
        return lora.attach()

    def _set(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        key = name.replace(".", ":")
        self.A[key] = nn.Parameter(a)
        self.B[key] = nn.Parameter(b)

    def _resolve(self, name: str, source="LoRA") -> tuple[nn.Linear, int, int, str]:
        """A Hugging Face module name → (the model's Linear computing it, the part of its output,
        how many parts, its internal path)."""
        m = _BLOCK.match(name)
        internal, part, parts = (TARGETS[m.group(2)] if m and m.group(2) in TARGETS else (None, 0, 1))
        path = f"{m.group(1)}.{internal}" if internal else name
        try:
            layer = self._model[0].get_submodule(path)
        except AttributeError:
            raise ZImageKitError(f"{source}: the model has no {name}; this LoRA is for another model") from None
        if not isinstance(layer, (nn.Linear, QuantizedLinear)):
            raise ZImageKitError(f"{source}: {name} is not a linear layer of this model, so a LoRA cannot adapt it")
        return layer, part, parts, path

    # -- applying ----------------------------------------------------------------------------

    def _by_layer(self):
        """internal layer path -> (layer, parts, [(part index, key)])."""
        groups: dict[str, tuple] = {}
        for key in self.A:
            layer, part, parts, path = self._resolve(key.replace(":", "."))
            groups.setdefault(path, (layer, parts, []))[2].append((part, key))
        return groups

    def attach(self) -> "LoRA":
        for layer, parts, items in self._by_layer().values():
            self._hooks.append(layer.register_forward_hook(self._hook(parts, items)))
        return self

    def _hook(self, parts, items):
        def add_update(layer, inputs, y):
            if self.merged:
                return y
            x = inputs[0]
            pieces = [None] * parts
            for part, key in items:
                pieces[part] = (x @ self.A[key].to(x.dtype).t()) @ self.B[key].to(x.dtype).t()
            out = y.shape[-1] // parts
            pieces = [p if p is not None else y.new_zeros(*y.shape[:-1], out) for p in pieces]
            return y + (self.scale * self.factor) * torch.cat(pieces, dim=-1)

        return add_update

    def detach_from_model(self) -> None:
        """Remove the hooks (after unmerging if merged): the model is the base model again."""
        self.unmerge()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def mergeable(self) -> bool:
        """False when an adapted layer is quantized: its weight cannot take the update, so the
        adapters stay as hooks (exact, at the cost of their small matmuls)."""
        return not any(isinstance(layer, QuantizedLinear) for layer, _, _ in self._by_layer().values())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter into its base weight (no inference overhead)."""
        if not self.mergeable:
            raise ZImageKitError("this LoRA adapts quantized layers, which cannot hold a merged update; "
                                 "leave it unmerged (its hooks apply it exactly)")
        if not self.merged:
            self._apply_delta(+1)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1)
            self.merged = False

    def _apply_delta(self, sign: int) -> None:
        for layer, parts, items in self._by_layer().values():
            out = layer.out_features // parts
            for part, key in items:
                delta = (self.B[key].float() @ self.A[key].float()) * (sign * self.scale * self.factor)
                layer.weight[part * out:(part + 1) * out] += delta.to(layer.weight.dtype)

    # -- saving ------------------------------------------------------------------------------

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapters under diffusers' keys, alpha / rank folded into B."""
        out = {}
        for key in self.A:
            name = key.replace(":", ".")
            out[f"transformer.{name}.lora_A.weight"] = self.A[key].detach().float().contiguous()
            out[f"transformer.{name}.lora_B.weight"] = (self.B[key] * self.factor).detach().float().contiguous()
        return out

    def save(self, path) -> None:
        state = self.diffusers_state_dict()
        atomic_write(Path(path), lambda p: save_file(state, str(p), metadata={"format": "pt"}))
