"""Pixels <-> VAE latents, against hand-worked values."""

from types import SimpleNamespace

import numpy as np
import torch

from zimagekit.vae_codec import from_vae_output, scale_latents, to_uint8, to_vae_input, unscale_latents


def test_pixels_map_to_the_vae_range_and_back():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    x = to_vae_input(pixels)
    assert x.dtype == torch.float32 and torch.allclose(x.flatten(), torch.tensor([-1.0, -0.6, 1.0]))
    assert np.array_equal(to_uint8(from_vae_output(x)), pixels.permute(0, 2, 3, 1).numpy())
    assert torch.equal(from_vae_output(torch.tensor([-3.0, 0.0, 3.0])), torch.tensor([0.0, 0.5, 1.0]))  # clamped


def test_latent_scaling_is_flux_vaes_shift_then_scale_and_its_inverse():
    config = SimpleNamespace(shift_factor=0.1159, scaling_factor=0.3611)  # Z-Image's (Flux) VAE
    z = torch.tensor([0.1159, 1.1159])
    assert torch.allclose(scale_latents(z, config), torch.tensor([0.0, 0.3611]))
    assert torch.allclose(unscale_latents(scale_latents(z, config), config), z)
