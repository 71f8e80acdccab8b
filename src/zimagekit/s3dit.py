"""S3-DiT: the Scalable Single-Stream Diffusion Transformer of Z-Image (arXiv 2511.22699, §3).

Read top to bottom beside the paper. One sequence carries image and caption tokens through
every main block ("single stream"); only the first two blocks of each modality are
modality-specific (`noise_refiner` for image tokens, `context_refiner` for caption tokens).

Conventions (the traps, ../docs spec §2 and "five facts"):

* Time: the model takes ``t = 1 - sigma`` (0 = pure noise, 1 = clean) and predicts
  ``v = x_data - x_noise`` (paper eq. 1). The sampler negates it for its Euler step in sigma.
* Timestep features: ``t * t_scale`` through a 256-d sinusoid laid out **[cos, sin]**.
* Modulation: four chunks (scale_msa, gate_msa, scale_mlp, gate_mlp), no shift, scales
  ``1 + s``, gates ``tanh``; the context refiner is unmodulated.
* Padding: caption and image tokens are padded to multiples of 32 with learned pad tokens
  that **are attended** (only padding between samples of a batch is masked).
* RoPE: 3 axes (caption/"time", H, W), interleaved complex pairs, theta 256, applied after
  the per-head RMSNorm of q and k.

Storage: q/k/v live in one fused ``attention.qkv`` Linear and w1/w3 in one fused
``feed_forward.w13`` Linear (one GEMM each instead of three and two). ``state_dict()`` and
``load_state_dict()`` still speak the Hugging Face names (``attention.to_q.weight``,
``feed_forward.w1.weight``, ...) through per-module hooks, so checkpoints are exactly those
of diffusers' ``ZImageTransformer2DModel``; the key mapping lives in :mod:`zimagekit.weights`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import weights
from .errors import ZImageKitError

ADALN_EMBED_DIM = 256  # width of the conditioning vector c (the "low-rank" adaLN of §3.1)
SEQ_MULTI_OF = 32  # captions and images are padded to a multiple of this many tokens
T_FREQ_DIM = 256  # sinusoidal timestep features
T_MLP_HIDDEN = 1024
QK_NORM_EPS = 1e-5  # the reference hard-codes this, whatever norm_eps says


# ----------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------


# JSON types of the config fields (annotations are strings under postponed evaluation).
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false",
               "tuple[int, ...]": "a list of integers"}


def _has_type(value, annotation: str) -> bool:
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if annotation == "int":
        return is_int(value)
    if annotation == "float":
        return is_int(value) or isinstance(value, float)
    if annotation == "bool":
        return isinstance(value, bool)
    return isinstance(value, (list, tuple)) and all(is_int(v) for v in value)


@dataclass
class S3DiTConfig:
    """Mirrors the fields of Z-Image-Turbo's ``transformer/config.json``."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    # Kept for checkpoint compatibility; like the reference, attention is plain multi-head.
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)

    def __post_init__(self):
        for name in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.dim % self.n_heads:
            raise ZImageKitError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if sum(self.axes_dims) != self.head_dim:
            raise ZImageKitError(
                f"axes_dims {list(self.axes_dims)} sum to {sum(self.axes_dims)}, but the head dimension is "
                f"dim/n_heads = {self.dim}/{self.n_heads} = {self.head_dim}; one of dim, n_heads and axes_dims "
                "is wrong"
            )
        if any(d % 2 for d in self.axes_dims):
            raise ZImageKitError(f"every entry of axes_dims {list(self.axes_dims)} must be even (RoPE rotates pairs)")
        if len(self.axes_dims) != len(self.axes_lens):
            raise ZImageKitError("axes_dims and axes_lens must have the same length")
        if len(self.all_patch_size) != len(self.all_f_patch_size):
            raise ZImageKitError("all_patch_size and all_f_patch_size must have the same length")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)  # SwiGLU hidden width of the reference, 10240 at dim 3840

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    def image_tokens(self, height: int, width: int, frames: int = 1) -> int:
        """Image tokens of a latent of ``frames`` x ``height`` x ``width`` cells at the default
        patch size (before padding to 32): the sequence length the resolution shift reads."""
        p, pf = self.all_patch_size[0], self.all_f_patch_size[0]
        return frames // pf * (height // p) * (width // p)

    def check_encoders(self, text_hidden_size: int, latent_channels: int, key: str = "model") -> None:
        """Whether a model of this config can read the text encoder's features and the VAE's
        latents; the error names the config field to set (``key`` is the config section)."""
        if self.cap_feat_dim != text_hidden_size:
            raise ZImageKitError(f"{key}.cap_feat_dim={self.cap_feat_dim} but the text encoder's hidden size is "
                                 f"{text_hidden_size}; set {key}.cap_feat_dim={text_hidden_size}")
        if self.in_channels != latent_channels:
            raise ZImageKitError(f"{key}.in_channels={self.in_channels} but the VAE has {latent_channels} latent "
                                 f"channels; set {key}.in_channels={latent_channels}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "S3DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        # The Omni/Edit variants add SigLIP tokens; the text-to-image model writes it as null.
        if d.pop("siglip_feat_dim", None) is not None:
            raise ZImageKitError(f"{source}: siglip_feat_dim is set (Omni/Edit model); only text-to-image S3-DiT is supported")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ZImageKitError(
                f"{source}: unknown field(s) {unknown}; S3DiTConfig accepts {sorted(known)}"
            )
        for f in dataclasses.fields(cls):
            if f.name in d and not _has_type(d[f.name], f.type):
                raise ZImageKitError(f"{source}: field {f.name!r} must be {_TYPE_WORDS[f.type]}, got "
                                     f"{json.dumps(d[f.name])}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "S3DiTConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ZImageKitError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ZImageKitError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ZImageKitError(f"{path}: expected a JSON object of config fields")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def preset(cls, name: str) -> "S3DiTConfig":
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise ZImageKitError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


PRESETS: dict[str, dict] = {
    # The released 6.15B model (Z-Image and Z-Image-Turbo share the transformer config).
    "z-image-turbo": dict(),
    # A few million parameters: tests and CPU experiments.
    "tiny": dict(dim=256, n_layers=4, n_refiner_layers=2, n_heads=4, n_kv_heads=4, cap_feat_dim=64,
                 axes_dims=(16, 24, 24), axes_lens=(1024, 128, 128)),
}


# ----------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale. Inside the blocks only its weight is used: they call
    :func:`rms_scale` themselves so the weight can be folded into the adaLN scale or gate."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * rms_scale(x, self.eps) * self.weight


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last dim, accumulated in fp32 (as diffusers'
    RMSNorm does) and returned in x's dtype, shape (..., 1)."""
    ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square() / x.shape[-1]
    return torch.rsqrt(ms + eps).to(x.dtype)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) as complex numbers x[2i] + i x[2i+1] by the
    unit complex ``freqs`` (..., D/2), in fp32 like the reference. This is the interleaved
    convention, not rotate-half. One complex multiply is one pass over x; on CPU it measured
    ~3.7x faster in fp32 than the same rotation in real cos/sin arithmetic."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention with per-head QK RMSNorm and 3-axis RoPE.

    q, k and v come from one fused projection; checkpoints store them as to_q/to_k/to_v.
    q and k are normalised and rotated together (one pass each instead of two).
    """

    def __init__(self, dim: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.norm_q = RMSNorm(head_dim, QK_NORM_EPS) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, QK_NORM_EPS) if qk_norm else None

    def heads(self, x, rope):
        """x: (B, L, dim), rope: complex (B, L, 1, 1, head_dim/2) -> q, k, v (B, heads, L, head_dim),
        q and k normalised and rotated."""
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.n_heads, -1)
        qk, v = qkv[:, :, :2], qkv[:, :, 2]
        if self.norm_q is not None:
            w = torch.stack([self.norm_q.weight, self.norm_k.weight])[:, None]  # (2, 1, head_dim)
            qk = qk * rms_scale(qk, QK_NORM_EPS) * w
        # SDPA's CPU kernel measured ~20% faster on head-major contiguous inputs than on
        # strided views of the fused projection, far more than the copy costs.
        q, k = apply_rope(qk, rope).permute(2, 0, 3, 1, 4).contiguous()
        return q, k, v.transpose(1, 2).contiguous()

    def forward(self, x, rope, mask):
        """mask: a (B, 1, 1, L) boolean key mask, or None when the batch needs none."""
        out = F.scaled_dot_product_attention(*self.heads(x, rope), attn_mask=mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class RowAlignedLinear(nn.Linear):
    """A bias-free Linear whose output rows start on 64-byte boundaries.

    The fused SwiGLU width 2 * int(8 dim / 3) is often not a multiple of 16 (2730 at dim
    512); MKL then stores every output row misaligned, and that GEMM measured ~30 % slower.
    So on CPU, without autograd (``out=`` has none) or autocast, the result goes into a
    buffer whose rows are padded to a cache line, and a view of its first ``out_features``
    columns is returned: the same values, only the row stride differs. Otherwise, or at an
    aligned width, it is a plain Linear. Being a Linear keeps forward hooks (LoRA) and state
    dicts working.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.out_features
        per_line = 64 // x.element_size()
        if (n % per_line == 0 or x.ndim < 2 or x.device.type != "cpu" or torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight)
        out = x.new_empty(*x.shape[:-1], n + (-n) % per_line)[..., :n]
        torch.mm(x.flatten(0, -2), self.weight.t(), out=out.flatten(0, -2))
        return out


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(w1 h) * w3 h)`` with w1 and w3 fused into one projection."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w13 = RowAlignedLinear(dim, 2 * hidden_dim)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        h1, h3 = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(h1) * h3)


class TransformerBlock(nn.Module):
    """One S3-DiT block with sandwich norm (pre- and post-norm around each sublayer).

    Modulated: ``x += tanh(g_msa) * norm2(attn(norm1(x) * (1 + s_msa)))`` and the same for
    the FFN; c goes into ``adaLN_modulation`` without an activation. Unmodulated (context
    refiner): the same without scale and gate. Each norm weight is multiplied into its
    (per-sample) scale or gate vector first, so every norm costs one reduction and one
    multiply, and the gated residual add is a single ``addcmul``.
    """

    def __init__(self, cfg: S3DiTConfig, modulation: bool):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.qk_norm)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim))

    def modulation_vectors(self, c=None):
        """(in_attn, out_attn, in_ffn, out_ffn): each norm's weight times its ``1 + scale``
        (inputs) or ``tanh(gate)`` (outputs); (B, 1, dim), or the bare weights unmodulated."""
        if not self.modulation:
            return self.attention_norm1.weight, self.attention_norm2.weight, self.ffn_norm1.weight, self.ffn_norm2.weight
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(4, dim=2)
        return (self.attention_norm1.weight * (1.0 + scale_msa), gate_msa.tanh() * self.attention_norm2.weight,
                self.ffn_norm1.weight * (1.0 + scale_mlp), gate_mlp.tanh() * self.ffn_norm2.weight)

    def norm_in(self, x, vector):
        return x * rms_scale(x, self.attention_norm1.eps) * vector

    def residual(self, x, out, vector):
        """``x + vector * out / rms(out)``: the post-norm and the gate in one addcmul."""
        return torch.addcmul(x, out * rms_scale(out, self.attention_norm1.eps), vector)

    def forward(self, x, rope, mask, c=None):
        in_attn, out_attn, in_ffn, out_ffn = self.modulation_vectors(c)
        x = self.residual(x, self.attention(self.norm_in(x, in_attn), rope, mask), out_attn)
        return self.residual(x, self.feed_forward(self.norm_in(x, in_ffn)), out_ffn)


class TimestepEmbedder(nn.Module):
    """t -> c: 256-d sinusoid of ``t * t_scale`` laid out [cos, sin], then 256 -> 1024 -> 256."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(T_FREQ_DIM, T_MLP_HIDDEN), nn.SiLU(), nn.Linear(T_MLP_HIDDEN, out_dim))

    @staticmethod
    def sinusoid(t: torch.Tensor, max_period: float = 10000.0) -> torch.Tensor:
        half = T_FREQ_DIM // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first: the reference's order

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) scaled by ``1 + Linear(SiLU(c))``, then a Linear to patch pixels.
    No shift and no gate."""

    def __init__(self, dim: int, adaln_dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x, c):
        return self.linear(self.norm_final(x) * (1.0 + self.adaLN_modulation(c).unsqueeze(1)))


# ----------------------------------------------------------------------------------------
# Token layout: padding, positions, RoPE tables and masks for one batch shape
# ----------------------------------------------------------------------------------------


def padded_length(n):
    """``n`` (an int or an integer tensor) rounded up to a multiple of SEQ_MULTI_OF."""
    return n + (-n) % SEQ_MULTI_OF


def max_caption_tokens(caption_axis_len: int) -> int:
    """The longest caption a model with ``axes_lens[0] = caption_axis_len`` can place: padded
    to c tokens (a multiple of 32) it takes RoPE positions 1..c, and the first image frame
    c + 1 (see :func:`build_layout`), all below ``caption_axis_len``."""
    return (caption_axis_len - 2) // SEQ_MULTI_OF * SEQ_MULTI_OF


@dataclass
class _Layout:
    """Everything about a batch that depends only on its shapes, built once per shape.

    Streams are padded per sample to multiples of 32 (pads are real, attended tokens) and
    then to the batch maximum (masked). Index tensors gather the padded streams from the
    flat embedded rows, so the forward pass has no per-sample Python loops.
    """

    img_tokens: list[int]  # real image tokens per sample
    img_grid: list[tuple[int, int, int]]  # (F, H, W) token grid per sample
    img_gather: torch.Tensor  # (B*Lx,) rows of [embedded image rows; x_pad_token]
    cap_gather: torch.Tensor  # (B*Lc,) rows of [embedded caption rows; cap_pad_token]
    uni_gather: torch.Tensor | None  # (B*Lu,) rows of [image stream; caption stream], None = plain concat
    img_rope: torch.Tensor  # complex (B, Lx, 1, 1, head_dim/2)
    cap_rope: torch.Tensor
    uni_rope: torch.Tensor
    img_mask: torch.Tensor | None
    cap_mask: torch.Tensor | None
    uni_mask: torch.Tensor | None


class _RopeTables:
    """Per-axis angle tables ``pos * theta^(-2k/d)`` (angles in float64, cast to fp32 as the
    reference does), looked up by integer (t, h, w) positions."""

    def __init__(self, cfg: S3DiTConfig, device: torch.device):
        self.axes_lens = cfg.axes_lens
        self.tables = []
        for d, n in zip(cfg.axes_dims, cfg.axes_lens):
            freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
            angles = torch.outer(torch.arange(n, dtype=torch.float64), freqs).float()
            self.tables.append(angles.to(device))

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        """pos: (..., n_axes) int64 -> unit complex64 of shape (..., 1, 1, head_dim/2)."""
        for axis, n in enumerate(self.axes_lens):
            top = int(pos[..., axis].max())
            if top >= n:
                raise ZImageKitError(
                    f"RoPE position {top} on axis {axis} exceeds axes_lens[{axis}]={n}: the caption is "
                    "too long or the image too large for this model; shorten the prompt or the size"
                )
        angles = torch.cat([tab[pos[..., a]] for a, tab in enumerate(self.tables)], dim=-1)
        return torch.polar(torch.ones_like(angles), angles)[..., None, None, :]


def _key_mask(lengths: list[int], device) -> torch.Tensor | None:
    """Boolean key mask (B, 1, 1, L) hiding only padding *between* samples, or None."""
    L = max(lengths)
    if all(n == L for n in lengths):
        return None
    return (torch.arange(L, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]


def build_layout(cfg, rope: _RopeTables, grids, cap_lens, device) -> _Layout:
    """Token layout of a batch: ``grids`` are per-sample (F, H, W) token grids, ``cap_lens``
    per-sample caption lengths (unpadded).

    Built with whole-batch tensor operations: a batch of captions of varied lengths has a
    new layout every step, and a per-sample loop here cost more than the forward pass of a
    small model on a GPU (0.25 s for 512 samples on one CPU core)."""
    B = len(grids)
    grid = torch.tensor(grids, dtype=torch.long).view(B, 3)
    img_n = grid.prod(1)
    cap_n = torch.tensor(list(cap_lens), dtype=torch.long)
    img_np, cap_np = padded_length(img_n), padded_length(cap_n)
    uni_n = img_np + cap_np
    Lx, Lc, Lu = int(img_np.max()), int(cap_np.max()), int(uni_n.max())
    batch = torch.arange(B)[:, None]

    # Gather indices: each row of a padded stream points at an embedded row or at the pad
    # token (the extra last row); batch padding reuses the pad row and is masked anyway.
    def gather(real, L):
        j = torch.arange(L)[None]
        start = (real.cumsum(0) - real)[:, None]
        return torch.where(j < real[:, None], start + j, real.sum()).flatten().to(device)

    # Positions (spec §2 steps 2-3): caption token j -> (1 + j, 0, 0) for its pads too;
    # image token (f, h, w) -> (cap_padded + 1 + f, h, w); image pads and batch padding -> 0.
    j = torch.arange(Lc)[None]
    cap_pos = torch.zeros(B, Lc, 3, dtype=torch.long)
    cap_pos[..., 0] = torch.where(j < cap_np[:, None], 1 + j, 0)
    j = torch.arange(Lx)[None]
    H, W = grid[:, 1:2], grid[:, 2:3]
    img_pos = torch.stack([j // (H * W) + cap_np[:, None] + 1, (j // W) % H, j % W], -1)
    img_pos = torch.where((j < img_n[:, None])[..., None], img_pos, 0)

    # Unified stream: per sample [img_np image rows, cap_np caption rows], then batch padding.
    j = torch.arange(Lu)[None]
    in_img, in_cap = j < img_np[:, None], j < uni_n[:, None]
    cap_j = (j - img_np[:, None]).clamp(0, Lc - 1)
    uni_pos = torch.where(in_img[..., None], img_pos[batch, j.clamp(max=Lx - 1)],
                          torch.where(in_cap[..., None], cap_pos[batch, cap_j], 0))
    if bool((img_np == Lx).all()) and bool((cap_np == Lc).all()):
        uni_gather = None  # every sample is [Lx image rows, Lc caption rows]: a plain concat
    else:
        rows = torch.where(in_img, batch * Lx + j, torch.where(in_cap, B * Lx + batch * Lc + cap_j, 0))
        uni_gather = rows.flatten().to(device)  # batch pad: any row, masked

    return _Layout(
        img_tokens=img_n.tolist(),
        img_grid=list(grids),
        img_gather=gather(img_n, Lx),
        cap_gather=gather(cap_n, Lc),
        uni_gather=uni_gather,
        img_rope=rope(img_pos.to(device)),
        cap_rope=rope(cap_pos.to(device)),
        uni_rope=rope(uni_pos.to(device)),
        img_mask=_key_mask(img_np.tolist(), device),
        cap_mask=_key_mask(cap_np.tolist(), device),
        uni_mask=_key_mask(uni_n.tolist(), device),
    )


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


class S3DiT(nn.Module):
    """The Z-Image transformer. ``model(x, t, cap_feats)`` is a drop-in for diffusers'
    ``ZImageTransformer2DModel(x, t, cap_feats).sample``.

    Args of ``forward``:
        x: list of (C, F, H, W) latents (sizes may differ), or a (B, C, F, H, W) tensor
           when all share a size (faster; then a tensor is returned).
        t: (B,) time in the Z-Image convention, t = 1 - sigma (0 = noise, 1 = clean).
        cap_feats: list of (L_i, cap_feat_dim) caption features, or a (B, L, cap_feat_dim)
           tensor when all captions have the same length.
    Returns the prediction x_data - x_noise in the type and shapes of ``x``.
    """

    _LAYOUT_CACHE_SIZE = 16
    config_class = S3DiTConfig

    def __init__(self, config: S3DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.all_x_embedder = nn.ModuleDict()
        self.all_final_layer = nn.ModuleDict()
        for p, pf in zip(cfg.all_patch_size, cfg.all_f_patch_size):
            patch_dim = pf * p * p * cfg.in_channels
            self.all_x_embedder[f"{p}-{pf}"] = nn.Linear(patch_dim, cfg.dim)
            self.all_final_layer[f"{p}-{pf}"] = FinalLayer(cfg.dim, cfg.adaln_dim, patch_dim)
        self.noise_refiner = nn.ModuleList([TransformerBlock(cfg, modulation=True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([TransformerBlock(cfg, modulation=False) for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        # Learned pad tokens, zero-initialised as in diffusers.
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.layers = nn.ModuleList([TransformerBlock(cfg, modulation=True) for _ in range(cfg.n_layers)])
        self.gradient_checkpointing = False
        self._rope: _RopeTables | None = None
        self._layouts: OrderedDict = OrderedDict()
        weights.register_hf_key_hooks(m for m in self.modules() if isinstance(m, TransformerBlock))

    # -- layout cache ---------------------------------------------------------------------

    def _layout(self, grids, cap_lens, device) -> _Layout:
        key = (tuple(grids), tuple(cap_lens), str(device))
        layout = self._layouts.get(key)
        if layout is None:
            if self._rope is None or self._rope.tables[0].device != torch.device(device):
                self._rope = _RopeTables(self.config, device)
            layout = build_layout(self.config, self._rope, grids, cap_lens, device)
            self._layouts[key] = layout
            if len(self._layouts) > self._LAYOUT_CACHE_SIZE:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return layout

    # -- patchify ---------------------------------------------------------------------------

    @staticmethod
    def patchify(x: torch.Tensor, p: int, pf: int) -> torch.Tensor:
        """(..., C, F, H, W) -> (..., F/pf * H/p * W/p, pf*p*p*C): tokens in (f, h, w)
        row-major order, features (pf, ph, pw, c) with channels fastest (not Flux's order)."""
        *lead, C, Fr, H, W = x.shape
        x = x.reshape(*lead, C, Fr // pf, pf, H // p, p, W // p, p)
        n = len(lead)
        x = x.permute(*range(n), n + 1, n + 3, n + 5, n + 2, n + 4, n + 6, n)
        return x.reshape(*lead, (Fr // pf) * (H // p) * (W // p), pf * p * p * C)

    @staticmethod
    def unpatchify(tokens: torch.Tensor, grid, p: int, pf: int, C: int) -> torch.Tensor:
        """Inverse of :meth:`patchify` for tokens (..., N, pf*p*p*C) on grid (F', H', W')."""
        *lead, _, _ = tokens.shape
        f, h, w = grid
        n = len(lead)
        x = tokens.reshape(*lead, f, h, w, pf, p, p, C)
        x = x.permute(*range(n), n + 6, n, n + 3, n + 1, n + 4, n + 2, n + 5)
        return x.reshape(*lead, C, f * pf, h * p, w * p)

    # -- forward ---------------------------------------------------------------------------

    def _check_inputs(self, x, t, cap_feats, p, pf):
        cfg = self.config
        if f"{p}-{pf}" not in self.all_x_embedder:
            raise ZImageKitError(f"patch size {p}-{pf} is not one of this model's {list(self.all_x_embedder)}")
        if len(x) != len(cap_feats) or len(x) != t.shape[0]:
            raise ZImageKitError(f"batch sizes differ: {len(x)} latents, {len(cap_feats)} captions, {t.shape[0]} timesteps")
        for xi in x:
            if xi.ndim != 4 or xi.shape[0] != cfg.in_channels:
                raise ZImageKitError(f"each latent must be ({cfg.in_channels}, F, H, W); got {tuple(xi.shape)}")
            if xi.shape[1] % pf or xi.shape[2] % p or xi.shape[3] % p:
                raise ZImageKitError(f"latent frames/height/width {tuple(xi.shape[1:])} must be multiples of the patch size {pf}x{p}x{p}")
        for ci in cap_feats:
            if ci.ndim != 2 or ci.shape[-1] != cfg.cap_feat_dim or ci.shape[0] == 0:
                raise ZImageKitError(f"each caption must be (L>0, {cfg.cap_feat_dim}); got {tuple(ci.shape)}")

    def repeated_blocks(self) -> list[nn.Module]:
        """The transformer blocks in execution order: the unit that FSDP2 shards and that
        :meth:`compile_repeated_blocks` compiles."""
        return [*self.noise_refiner, *self.context_refiner, *self.layers]

    def compile_repeated_blocks(self, **kwargs) -> None:
        """Regional compilation, like diffusers' method of this name: each block goes through
        ``torch.compile(**kwargs)`` on its own. The blocks of a type share one compiled graph,
        so compiling takes a small fraction of what compiling the whole model would."""
        for block in self.repeated_blocks():
            block.compile(**kwargs)

    def forward(self, x, t, cap_feats, patch_size: int | None = None, f_patch_size: int | None = None):
        """:meth:`embed`, :meth:`trunk`, :meth:`head`: a variant of the block structure (such as
        :class:`~zimagekit.dual_stream.DualStreamDiT`) replaces the trunk alone."""
        cfg = self.config
        p = cfg.all_patch_size[0] if patch_size is None else patch_size
        pf = cfg.all_f_patch_size[0] if f_patch_size is None else f_patch_size
        img, cap, c, lay = self.embed(x, t, cap_feats, p, pf)
        return self.head(self.trunk(img, cap, c, lay), c, lay, torch.is_tensor(x), p, pf)

    def embed(self, x, t, cap_feats, p: int, pf: int):
        """Check the inputs and lay out the batch; return the padded image stream (B, Lx, dim)
        and caption stream (B, Lc, dim), embedded, the timestep vector c and the layout."""
        cfg = self.config
        batched = torch.is_tensor(x)
        t = torch.as_tensor(t, device=(x if batched else x[0]).device)
        if t.ndim == 0:
            t = t.expand(len(x))
        self._check_inputs(x, t, cap_feats, p, pf)
        B = len(x)
        device, dtype = (x.device, x.dtype) if batched else (x[0].device, x[0].dtype)
        grids = [(xi.shape[1] // pf, xi.shape[2] // p, xi.shape[3] // p) for xi in x]
        lay = self._layout(grids, [ci.shape[0] for ci in cap_feats], device)
        c = self.t_embedder(t * cfg.t_scale).to(dtype)
        # Image stream: patchify, embed real rows, gather into the padded stream.
        patches = self.patchify(x, p, pf).flatten(0, 1) if batched else torch.cat([self.patchify(xi, p, pf) for xi in x])
        rows = torch.cat([self.all_x_embedder[f"{p}-{pf}"](patches), self.x_pad_token.to(dtype)])
        img = rows[lay.img_gather].view(B, -1, cfg.dim)
        # Caption stream: RMSNorm + Linear, pads become cap_pad_token.
        caps = cap_feats.flatten(0, 1) if torch.is_tensor(cap_feats) else torch.cat(list(cap_feats))
        rows = torch.cat([self.cap_embedder(caps), self.cap_pad_token.to(dtype)])
        cap = rows[lay.cap_gather].view(B, -1, cfg.dim)
        return img, cap, c, lay

    def trunk(self, img, cap, c, lay):
        """The noise refiner (modulated) on the image stream, the context refiner (unmodulated)
        on the caption stream, then the single stream over per-sample [image, caption] tokens;
        returns the image rows' hidden states (the caption outputs would be discarded)."""
        for block in self.noise_refiner:
            img = self._run(block, img, lay.img_rope, lay.img_mask, c)
        for block in self.context_refiner:
            cap = self._run(block, cap, lay.cap_rope, lay.cap_mask, None)
        B = len(lay.img_tokens)
        if lay.uni_gather is None:
            h = torch.cat([img, cap], dim=1)
        else:
            h = torch.cat([img.flatten(0, 1), cap.flatten(0, 1)])[lay.uni_gather].view(B, -1, self.config.dim)
        for block in self.layers:
            h = self._run(block, h, lay.uni_rope, lay.uni_mask, c)
        return h[:, : max(lay.img_tokens)]

    def head(self, h, c, lay, batched: bool, p: int, pf: int):
        """The final layer on the image rows, unpatchified to latents of the input's form."""
        out = self.all_final_layer[f"{p}-{pf}"](h, c)
        channels = self.config.in_channels
        if batched:
            return self.unpatchify(out, lay.img_grid[0], p, pf, channels)
        return [self.unpatchify(o[:n], g, p, pf, channels) for o, n, g in zip(out, lay.img_tokens, lay.img_grid)]

    def _run(self, block, h, rope, mask, c):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, rope, mask, c, use_reentrant=False)
        return block(h, rope, mask, c)

    # -- weights ---------------------------------------------------------------------------

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load Hugging Face-named weights strictly; a mismatch raises one
        :class:`ZImageKitError` listing missing, unexpected and wrong-shaped keys."""
        weights.check_state_dict(self, state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, config: S3DiTConfig | None = None):
        """Load a diffusers ``transformer/`` folder (config.json + safetensors, sharded or
        not), a ComfyUI single file (fused qkv, original names), or a GGUF file whose
        quantized weights stay quantized (:mod:`zimagekit.quantized`)."""
        if str(path).endswith(".gguf"):
            from .quantized import load_gguf

            return load_gguf(cls, Path(path), dtype=dtype, device=device, config=config)
        return weights.load_pretrained(cls, path, dtype=dtype, device=device, config=config)

    def save_pretrained(self, folder, max_shard_size: int = 10 * 2**30):
        """Write config.json + safetensors (sharded above ``max_shard_size`` bytes) in the
        layout diffusers' ``ZImageTransformer2DModel.from_pretrained`` reads."""
        from .quantized import QuantizedLinear

        if any(isinstance(m, QuantizedLinear) for m in self.modules()):
            raise ZImageKitError("this transformer holds quantized layers (GGUF or fp8), which a diffusers folder "
                                 "cannot store; save the model it was quantized from")
        weights.save_pretrained(self, folder, max_shard_size=max_shard_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_pad_token.dtype

    @property
    def device(self) -> torch.device:
        return self.x_pad_token.device


# ----------------------------------------------------------------------------------------
# Parameter counting
# ----------------------------------------------------------------------------------------


def parameter_breakdown(model: S3DiT) -> dict[str, int]:
    """Parameters by part, counted from the modules (works on the meta device).

    Keys: embedders (x, caption, timestep, pad tokens), the two refiners, the main blocks
    split into attention / FFN / adaLN / norms, the final layer, and ``total``.
    """
    def n(module_or_params) -> int:
        params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
        return sum(p.numel() for p in params)

    layers = model.layers
    out = {
        "x_embedder": n(model.all_x_embedder),
        "cap_embedder": n(model.cap_embedder),
        "t_embedder": n(model.t_embedder),
        "pad_tokens": model.x_pad_token.numel() + model.cap_pad_token.numel(),
        "noise_refiner": n(model.noise_refiner),
        "context_refiner": n(model.context_refiner),
        "layers.attention": sum(n(b.attention) for b in layers),
        "layers.feed_forward": sum(n(b.feed_forward) for b in layers),
        "layers.adaLN_modulation": sum(n(b.adaLN_modulation) for b in layers),
        "layers.norms": sum(n([b.attention_norm1.weight, b.attention_norm2.weight, b.ffn_norm1.weight, b.ffn_norm2.weight]) for b in layers),
        "final_layer": n(model.all_final_layer),
    }
    out["total"] = sum(out.values())
    assert out["total"] == n(model), "breakdown misses parameters"
    return out


def forward_flops(cfg: S3DiTConfig, img_tokens: list[int], cap_tokens: list[int]) -> float:
    """Forward FLOPs (2 per multiply-add) of the GEMMs and attention, counting the
    per-sample padded streams (pad tokens are computed) but not batch padding."""
    d, f = cfg.dim, cfg.ffn_dim

    def block(n, modulated=True):
        linear = 2 * n * (4 * d * d + 3 * d * f)
        attention = 2 * 2 * n * n * d  # QK^T and PV
        return linear + attention + (2 * cfg.adaln_dim * 4 * d if modulated else 0)

    total = 0.0
    patch_dim = cfg.all_patch_size[0] ** 2 * cfg.all_f_patch_size[0] * cfg.in_channels
    for ni, nc in zip(img_tokens, cap_tokens):
        xi, xc = padded_length(ni), padded_length(nc)
        total += 2 * ni * patch_dim * d + 2 * nc * cfg.cap_feat_dim * d  # embedders
        total += cfg.n_refiner_layers * (block(xi) + block(xc, modulated=False))
        total += cfg.n_layers * block(xi + xc)
        total += 2 * ni * d * patch_dim  # final layer on image tokens
    return total
