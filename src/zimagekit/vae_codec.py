"""Pixels ↔ VAE latents: the conversions every caller of a Flux-style ``AutoencoderKL`` needs,
written once. Pixels are uint8 (N, 3, H, W); the VAE takes and gives floats in [-1, 1]; the
transformer sees ``(z − shift_factor) · scaling_factor`` (the VAE config's two numbers)."""

from __future__ import annotations

import torch


def to_vae_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → float32 in [-1, 1], normalised as diffusers' image processor does
    (x / 255 · 2 − 1)."""
    return pixels.float() / 255.0 * 2 - 1


def from_vae_output(images: torch.Tensor) -> torch.Tensor:
    """The VAE's decoded [-1, 1] → float32 [0, 1], clamped."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor):
    """[0, 1] (N, 3, H, W) → uint8 numpy (N, H, W, 3), rounded: what a PNG stores."""
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def scale_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE posterior latents → the transformer's latent space."""
    return (z - vae_config.shift_factor) * vae_config.scaling_factor


def unscale_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """The transformer's latents → what the VAE decodes (the inverse of :func:`scale_latents`)."""
    return z / vae_config.scaling_factor + vae_config.shift_factor
