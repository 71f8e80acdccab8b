"""Quantized transformer weights for small GPUs: GGUF single files and fp8 (weight-only, or
with fp8 matmuls).

A :class:`QuantizedLinear` keeps its weight in the stored format (GGUF blocks, or fp8 e4m3 with
one scale per output channel) and dequantizes it at each call, just before the matmul, so the
resident memory is the quantized size; only one layer's full weight exists at a time. It
replaces ``nn.Linear`` modules of a built S3-DiT from outside (:func:`load_gguf`,
:func:`quantize_fp8`); the model file knows nothing of it.

GGUF (the llama.cpp container the community's Z-Image files use) is read with the ``gguf``
package; dequantization is written here in torch, from the block layouts, so it runs on the
GPU. Types: F32, F16, BF16 (kept as ordinary weights), Q8_0, Q4_0, Q4_K, Q5_K, Q6_K (kept
quantized). Bytes per weight, which :mod:`zimagekit.plan` uses: a block of ``n`` weights takes
``size`` bytes (``BLOCKS``), e.g. Q8_0 34 bytes per 32 (1.0625), Q4_K 144 per 256 (0.5625).

Key names may be the original/ComfyUI layout (``layers.0.attention.qkv``, ``x_embedder``, with
or without ``model.diffusion_model.``) or diffusers'; the fused projections (q/k/v, w1/w3) are
joined row-wise in their stored format when their parts share a type (rows are whole blocks).

fp8 matmuls (``quantize_fp8(model, matmul=True)``) run Hopper's fp8 GEMM instead of
dequantizing: each call scales the input's rows to e4m3 (absmax / 448, computed on the fly)
and multiplies the two e4m3 matrices with ``torch._scaled_mm`` and both row-wise scales, the
scheme torchao calls dynamic float8 activations and weights, per row. torchao's own version
refuses any device below CUDA compute capability 8.9; torch's kernel also runs on the CPU,
where the tests hold it to the closed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ZImageKitError

QK_K = 256
# type name -> (weights per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Bytes per stored weight, per format (fp8: one byte plus a 4-byte scale per output row,
# negligible for wide layers).
BYTES_PER_WEIGHT = {"bf16": 2.0, "fp8": 1.0, **{k: size / n for k, (n, size) in BLOCKS.items()}}
E4M3_MAX = 448.0


# ---------------------------------------------------------------------------------------------
# Dequantization (one function per block layout; blocks is uint8 (n_blocks, bytes_per_block))
# ---------------------------------------------------------------------------------------------


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 stored as 2 uint8 columns → float32 (n, 1)."""
    return raw.contiguous().view(torch.float16).float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # fp16 scale d, then 32 signed bytes: w = d · q. Whole-row dtype views (34 bytes is even)
    # read both fields without copying them out first: twice as fast as slicing then viewing.
    return b.view(torch.float16)[:, :1].float() * b.view(torch.int8)[:, 2:].float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # fp16 d, then 16 bytes: low nibbles are weights 0..15, high nibbles 16..31; w = d · (q − 8)
    q = b[:, 2:]
    q = torch.cat([q & 0x0F, q >> 4], dim=1).float() - 8
    return _f16(b[:, :2]) * q


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes holding eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K super-block:
    bytes 0–3 hold scales 0–3 (low 6 bits) and the top 2 bits of scales 4–7; bytes 4–7 the
    same for the mins; bytes 8–11 the low 4 bits of scales 4–7 (low nibble) and mins 4–7
    (high nibble)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scales.float(), mins.float()


def _low_high_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes → (n, 8, 32) 4-bit values: each 32-byte group gives its low nibbles to one
    sub-block and its high nibbles to the next."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # fp16 d, fp16 dmin, 12 scale bytes, 128 nibble bytes; sub-block j: w = d·sc_j·q − dmin·m_j
    sc, mn = _k_scales(b[:, 4:16])
    q = _low_high_nibbles(b[:, 16:]).float()
    w = (_f16(b[:, 0:2]) * sc)[:, :, None] * q - (_f16(b[:, 2:4]) * mn)[:, :, None]
    return w.reshape(-1, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # as Q4_K, plus 32 bytes of fifth bits before the nibbles: bit j of byte i is the high bit
    # of weight i of sub-block j
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]
    high = torch.stack([(qh >> j) & 1 for j in range(8)], dim=1)  # (n, 8, 32)
    q = (_low_high_nibbles(b[:, 48:]) | (high << 4)).float()
    w = (_f16(b[:, 0:2]) * sc)[:, :, None] * q - (_f16(b[:, 2:4]) * mn)[:, :, None]
    return w.reshape(-1, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d;
    # 16 sub-blocks of 16: w = d · scale_j · (q − 32)
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    low = ql.reshape(-1, 2, 1, 64)
    low = torch.cat([low & 0x0F, low >> 4], dim=2).reshape(-1, 2, 4, 32)  # per half: 4 groups of 32
    high = qh.reshape(-1, 2, 1, 32)
    high = torch.cat([(high >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2)  # (n, 2, 4, 32)
    q = ((low | (high << 4)).float() - 32).reshape(-1, 16, 16)
    return ((d * scales.contiguous().view(torch.int8).float())[:, :, None] * q).reshape(-1, QK_K)


_DEQUANTIZE = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(data: torch.Tensor, kind: str, shape: tuple[int, int], scale: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A stored weight → a ``dtype`` tensor of ``shape`` (out, in). ``data`` is uint8 (out,
    bytes per row) for GGUF block types, float8_e4m3fn (out, in) for ``"fp8"`` (with ``scale``
    (out, 1))."""
    if kind == "fp8":
        return (data.float() * scale).to(dtype)
    n, size = BLOCKS[kind]
    return _DEQUANTIZE[kind](data.reshape(-1, size)).reshape(shape).to(dtype)


class QuantizedLinear(nn.Module):
    """``nn.Linear`` whose weight stays quantized; see the module docstring."""

    def __init__(self, data: torch.Tensor, kind: str, shape: tuple[int, int], bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, fp8_matmul: bool = False):
        super().__init__()
        self.kind = kind
        self.fp8_matmul = fp8_matmul  # fp8 only: an e4m3 x e4m3 GEMM instead of dequantizing
        self.out_features, self.in_features = shape
        self.register_buffer("data", data)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (computed; for code that reads ``.weight``'s shape or values)."""
        return dequantize(self.data, self.kind, (self.out_features, self.in_features), self.scale,
                          self.bias.dtype if self.bias is not None else torch.float32)

    def _apply(self, fn, recurse=True):
        # A module-wide dtype cast (model.to(bf16)) must not convert the stored weight: it
        # keeps its format and follows only the device.
        data, scale = self.data, self.scale
        super()._apply(fn, recurse)
        self.data = data.to(self.data.device)
        if scale is not None:
            self.scale = scale.to(self.scale.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul:
            return self._fp8_matmul(x)
        w = dequantize(self.data, self.kind, (self.out_features, self.in_features), self.scale, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _fp8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """y = (s_x x8) (s_w w8)ᵀ + b with x8 = e4m3(x / s_x), s_x = rowwise absmax(x) / 448."""
        rows = x.reshape(-1, self.in_features)
        s_x = (rows.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        x8 = (rows.float() / s_x).to(torch.float8_e4m3fn)
        # data is (out, in) row-major, so its transpose is the column-major operand the kernel wants.
        y = torch._scaled_mm(x8, self.data.t(), scale_a=s_x, scale_b=self.scale.t(), out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}" + (", fp8 matmul" if self.fp8_matmul else "")


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as held (quantized where quantized)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


# ---------------------------------------------------------------------------------------------
# GGUF files
# ---------------------------------------------------------------------------------------------


@dataclass
class GGUFWeight:
    """One quantized tensor of a GGUF file: uint8 rows of blocks and the logical (out, in) shape."""

    data: torch.Tensor
    kind: str
    shape: tuple[int, int]

    def chunk(self, parts: int, dim: int = 0) -> list[GGUFWeight]:
        """Split rows (the fused q/k/v of a ComfyUI file); rows are whole blocks."""
        rows = self.shape[0] // parts
        return [GGUFWeight(self.data[i * rows:(i + 1) * rows], self.kind, (rows, self.shape[1])) for i in range(parts)]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.kind, self.shape, dtype=dtype)


def read_gguf(path: Path) -> dict[str, torch.Tensor | GGUFWeight]:
    """Every tensor of a GGUF file by name: float types as tensors, block types as
    :class:`GGUFWeight`. Unsupported types and unreadable files are one error each."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ZImageKitError("reading GGUF files needs the gguf package: pip install gguf (or zimagekit[gguf])") from None
    try:
        reader = GGUFReader(str(path))
    except FileNotFoundError:
        raise ZImageKitError(f"{path}: no such file") from None
    except Exception as e:  # a truncated or foreign file fails in many ways inside the reader
        raise ZImageKitError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "it may be truncated, download it again") from None
    out: dict[str, torch.Tensor | GGUFWeight] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if kind in FLOAT_TYPES:
            data = torch.from_numpy(t.data.copy())
            if kind == "BF16":  # numpy has no bfloat16: the reader hands over its raw bytes
                data = data.view(torch.bfloat16)
            out[t.name] = data.reshape(shape)
        elif kind in BLOCKS:
            if len(shape) != 2:
                raise ZImageKitError(f"{path}: {t.name} is {kind} with shape {shape}; only 2-D weights are quantized")
            out[t.name] = GGUFWeight(torch.from_numpy(t.data.copy()), kind, shape)
        else:
            raise ZImageKitError(f"{path}: {t.name} is stored as {kind}, which zimagekit cannot dequantize; "
                                 f"use a file in {', '.join([*BLOCKS, *FLOAT_TYPES])}")
    return out


def _joined(parts: list) -> torch.Tensor | GGUFWeight:
    """The row-wise concatenation of a fused projection's parts, quantized if they all share
    one block type, else dequantized."""
    if all(isinstance(p, GGUFWeight) for p in parts) and len({p.kind for p in parts}) == 1:
        return GGUFWeight(torch.cat([p.data for p in parts]), parts[0].kind,
                          (sum(p.shape[0] for p in parts), parts[0].shape[1]))
    return torch.cat([p.dequantize() if isinstance(p, GGUFWeight) else p.float() for p in parts])


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def load_gguf(cls, path: Path, dtype: torch.dtype | None = None, device=None, config=None):
    """An S3-DiT (``cls``) from a GGUF file: block-type weights become :class:`QuantizedLinear`
    modules, everything else loads as usual in ``dtype``. The config comes from the tensor
    shapes unless given (as for any single file)."""
    from .weights import FUSED, RENAMED, check_state_dict, comfy_to_hf, infer_config, is_comfy_state_dict

    state = read_gguf(path)
    if is_comfy_state_dict(state):
        state = comfy_to_hf(state)
    # quantized tensors stand in for their shapes, for the config and the key check
    shapes = {k: (torch.empty(v.shape, device="meta") if isinstance(v, GGUFWeight) else v) for k, v in state.items()}
    if config is None:
        config = infer_config(shapes, cls.config_class)
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model, shapes, source=str(path))
    # Hugging Face names → the model's own (fused) ones, in the stored format.
    internal = dict(state)
    for name in list(internal):
        for fused, parts in FUSED.items():
            if name.endswith(parts[0]):
                stem = name[: -len(parts[0])]
                internal[stem + fused] = _joined([internal.pop(stem + p) for p in parts])
        for own, hf in RENAMED.items():
            if name.endswith(hf) and name in internal:
                internal[name[: -len(hf)] + own] = internal.pop(name)
    for name, value in list(internal.items()):
        if not isinstance(value, GGUFWeight):
            continue
        module_path = name.removesuffix(".weight")
        if not (name.endswith(".weight") and isinstance(_submodule(model, module_path), nn.Linear)):
            internal[name] = value.dequantize()  # a quantized pad token or embedding: stored as floats
        else:
            parent, _, child = module_path.rpartition(".")
            bias = internal.get(module_path + ".bias")  # loaded below with the other floats
            layer = QuantizedLinear(value.data, value.kind, value.shape, None if bias is None else bias.float())
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            del internal[name]
    missing, unexpected = nn.Module.load_state_dict(model, internal, strict=False, assign=True)
    leftover = [k for k in missing if not k.endswith((".data", ".scale"))]
    if leftover or unexpected:  # check_state_dict passed, so this is a bug, not a bad file
        raise RuntimeError(f"GGUF load left {leftover[:3]} missing and {unexpected[:3]} unexpected")
    return model.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# fp8 (e4m3), weight-only
# ---------------------------------------------------------------------------------------------


def quantize_fp8(model: nn.Module, blocks_only: bool = True, matmul: bool = False) -> nn.Module:
    """Store every linear layer of the transformer blocks (or of the whole model) as fp8 e4m3
    with one fp32 scale per output row (absmax / 448, the format's largest finite value), in
    place. Compute stays in the input's dtype, each call dequantizing; with ``matmul`` the
    inputs are quantized too and the product is an fp8 GEMM (see the module docstring)."""
    prefixes = ("layers.", "noise_refiner.", "context_refiner.")
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, nn.Linear) or (blocks_only and not name.startswith(prefixes)):
            continue
        w = layer.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        data = (w / scale).to(torch.float8_e4m3fn)
        bias = None if layer.bias is None else layer.bias.detach()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                QuantizedLinear(data, "fp8", tuple(w.shape), bias, scale, fp8_matmul=matmul))
    return model
