"""The Flux-style ``AutoencoderKL`` that Z-Image folders ship in ``vae/``, in plain PyTorch.

Same module tree, parameter names and arithmetic as diffusers' ``AutoencoderKL`` with
``DownEncoderBlock2D``/``UpDecoderBlock2D`` blocks (the only ones a Z-Image VAE uses), so a
``vae/`` folder loads into it unchanged and a saved one loads in diffusers.  It exists so that
generating an image does not import diffusers (about 0.4 s, and with it ``torch._dynamo``):
``tests/test_autoencoder.py`` holds it equal to diffusers' class on random weights.

Its interface is the part of diffusers' that callers use: ``encode(x).latent_dist`` (a
diagonal Gaussian with ``mean``, ``std``, ``sample``), ``decode(z).sample``, ``config``,
``dtype``, ``save_pretrained``, and ``enable_tiling()``: diffusers' tiled encode and decode
(tiles of ``config.sample_size`` pixels overlapping by a quarter, blended linearly), which
bounds the memory of a large image at the cost of faint seams.  A diffusers ``AutoencoderKL`` therefore works wherever this
one does (the shapes VAE trainer trains diffusers' class and hands it to the latent cache).

Structure (encoder; the decoder mirrors it with one more resnet per block and nearest 2×
upsampling): conv_in → per block, ``layers_per_block`` resnets then a stride-2 conv (not after
the last) → mid block (resnet, single-head self-attention over all pixels, resnet) →
GroupNorm, SiLU, conv_out to ``2·latent_channels`` (mean and log-variance).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ZImageKitError
from .fileio import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# diffusers builds every VAE GroupNorm with this epsilon, whatever the config says.
NORM_EPS = 1e-6


@dataclass(frozen=True)
class AutoencoderConfig:
    """The fields of a diffusers ``AutoencoderKL`` config.json this model reads (defaults are
    diffusers'); ``raw`` keeps the file's whole dict so saving writes it back unchanged."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    # diffusers' default is None, which its Z-Image pipeline would fail on; no shift is 0.
    shift_factor: float = 0.0
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 32  # the tile side in pixels, when tiling is enabled
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> AutoencoderConfig:
        """Check what the model cannot run with: block types other than the two above, a
        non-SiLU activation, wrong-typed numbers; each is one error naming the field."""
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            kinds = set(raw.get(key) or [allowed])
            if kinds != {allowed}:
                raise ZImageKitError(f"{source}: {key} {sorted(kinds)} is not supported (a Z-Image VAE uses only {allowed})")
        if raw.get("act_fn", "silu") != "silu":
            raise ZImageKitError(f"{source}: act_fn {raw['act_fn']!r} is not supported (a Z-Image VAE uses silu)")
        values = {}
        for name, kind in (("in_channels", int), ("out_channels", int), ("layers_per_block", int),
                           ("latent_channels", int), ("norm_num_groups", int), ("scaling_factor", float),
                           ("shift_factor", float), ("force_upcast", bool), ("use_quant_conv", bool),
                           ("use_post_quant_conv", bool), ("mid_block_add_attention", bool)):
            value = raw.get(name)
            if value is None:
                continue
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
            if not ok:
                raise ZImageKitError(f"{source}: {name} must be a {kind.__name__}, got {value!r}")
            values[name] = kind(value)
        channels = raw.get("block_out_channels", [64])
        if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ZImageKitError(f"{source}: block_out_channels must be a list of positive integers, got {channels!r}")
        values["block_out_channels"] = tuple(channels)
        size = raw.get("sample_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) and size else size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ZImageKitError(f"{source}: sample_size must be a positive integer, got {raw.get('sample_size')!r}")
        values["sample_size"] = size
        return cls(**values, raw=dict(raw))

    def to_dict(self) -> dict:
        return {"_class_name": "AutoencoderKL", **self.raw,
                **{k: v for k, v in self.__dict__.items() if k != "raw"},
                "block_out_channels": list(self.block_out_channels)}


# ---------------------------------------------------------------------------------------------
# Blocks (parameter names as in diffusers, so checkpoints load unchanged)
# ---------------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus the input (a 1×1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all H·W positions, with a GroupNorm in front and the
    input added back (the mid block's only global mixing)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        q, k, v = (proj(seq).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one zero row and column at the bottom/right (diffusers'
    ``padding=0`` form, which is not the symmetric ``padding=1``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(channels[max(i - 1, 0)], c, config.layers_per_block, groups, downsample=i < len(channels) - 1)
            for i, c in enumerate(channels)])
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpBlock(channels[max(i - 1, 0)], c, config.layers_per_block + 1, groups, upsample=i < len(channels) - 1)
            for i, c in enumerate(channels)])
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """The encoder's posterior: ``mean`` and ``logvar`` (clamped to [−30, 20] as diffusers
    does, so ``std`` never under- or overflows)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)


@dataclass
class Encoded:
    latent_dist: DiagonalGaussian


@dataclass
class Decoded:
    sample: torch.Tensor


class AutoencoderKL(nn.Module):
    """See the module docstring.  ``config.scaling_factor``/``shift_factor`` are applied by
    :mod:`zimagekit.vae_codec`, not here: ``decode`` takes the VAE's own latents."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c2 = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(c2, c2, 1) if config.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)
        # Tiling, off by default; the names and defaults are diffusers'.
        self.use_tiling = False
        self.tile_sample_min_size = config.sample_size
        self.tile_latent_min_size = config.sample_size // 2 ** (len(config.block_out_channels) - 1)
        self.tile_overlap_factor = 0.25

    def enable_tiling(self) -> None:
        """Encode and decode images larger than ``tile_sample_min_size`` pixels tile by tile."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)

    def encode(self, x: torch.Tensor) -> Encoded:
        """Pixels in [−1, 1], (N, 3, H, W) → the posterior over latents (N, C, H/f, W/f)."""
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return Encoded(DiagonalGaussian(self._tiled(self._moments, x, self.tile_sample_min_size,
                                                        self.tile_latent_min_size)))
        return Encoded(DiagonalGaussian(self._moments(x)))

    def decode(self, z: torch.Tensor) -> Decoded:
        """Latents (unscaled) → pixels in about [−1, 1]."""
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return Decoded(self._tiled(self._pixels, z, self.tile_latent_min_size, self.tile_sample_min_size))
        return Decoded(self._pixels(z))

    def _tiled(self, fn, x: torch.Tensor, tile_in: int, tile_out: int) -> torch.Tensor:
        """``fn`` over tiles of ``tile_in`` cells of ``x`` (each giving ``tile_out`` cells) that
        overlap by ``tile_overlap_factor``: each output tile is blended linearly into its upper
        and left neighbours over ``tile_out * overlap`` cells and cut to its stride. As
        diffusers' ``tiled_decode``/``_tiled_encode``, which the tests hold it equal to."""
        stride = int(tile_in * (1 - self.tile_overlap_factor))
        blend = int(tile_out * self.tile_overlap_factor)
        keep = tile_out - blend
        tiles = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
                 for i in range(0, x.shape[2], stride)]
        rows = []
        for i, row in enumerate(tiles):
            out = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = _blend(tiles[i - 1][j], tile, blend, dim=2)
                if j > 0:
                    tile = _blend(row[j - 1], tile, blend, dim=3)
                row[j] = tile  # the blended tile is the left neighbour of the next
                out.append(tile[:, :, :keep, :keep])
            rows.append(torch.cat(out, dim=3))
        return torch.cat(rows, dim=2)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> AutoencoderKL:
        """A diffusers ``vae/`` folder (config.json + safetensors; pickles are refused).  A key
        the model lacks or has in another shape is one error listing the first few."""
        from .weights import check_state_dict, read_folder_weights

        folder = Path(folder)
        path = folder / CONFIG_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ZImageKitError(f"{path} is missing; copy the model's vae/ folder again") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ZImageKitError(f"{path}: not valid JSON ({e}); copy the model's vae/ folder again") from None
        if not isinstance(raw, dict):
            raise ZImageKitError(f"{path}: expected a JSON object")
        config = AutoencoderConfig.from_dict(raw, str(path))
        state = read_folder_weights(folder)
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model, state, source=str(folder), what="this VAE")
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json (the loaded one, rewritten) and one safetensors file, each atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n"))


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """``b`` with its first ``extent`` rows (``dim`` 2) or columns (3) faded in from the last ones
    of ``a``: weight y / extent on ``b``'s row y. The weights are computed in float64 and
    rounded once, as diffusers' per-row Python scalars are."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    w = torch.arange(extent, dtype=torch.float64) / extent
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w_b = w.to(b.dtype).to(b.device).view(shape)
    w_a = (1 - w).to(b.dtype).to(b.device).view(shape)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * w_a + b.narrow(dim, 0, extent) * w_b
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)
