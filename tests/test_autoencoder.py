"""Our AutoencoderKL against diffusers' on random weights: same posterior, same decoded pixels,
same gradients, folders readable both ways, and one-line errors for what it cannot run."""

from __future__ import annotations

import json

import pytest
import torch

from zimagekit.autoencoder import AutoencoderKL
from zimagekit.errors import ZImageKitError

CONFIGS = {
    # The Z-Image layout: 4 blocks, no quant convs, 16 latent channels, mid-block attention.
    "flux-like": dict(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16], layers_per_block=1, latent_channels=16, norm_num_groups=4,
        scaling_factor=0.36, shift_factor=0.11, use_quant_conv=False, use_post_quant_conv=False,
    ),
    # SD-style: quant convs, two resnets per block, no mid-block attention.
    "sd-like": dict(
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[8, 16, 16], layers_per_block=2, latent_channels=4, norm_num_groups=4,
        mid_block_add_attention=False,
    ),
}  # fmt: skip


def reference_folder(tmp_path, name):
    from diffusers import AutoencoderKL as Reference

    torch.manual_seed(0)
    reference = Reference(**CONFIGS[name]).eval()
    with torch.no_grad():  # move off the default init so every parameter matters
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path / name)
    return reference, tmp_path / name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_and_decode_equal_diffusers(tmp_path, name):
    reference, folder = reference_folder(tmp_path, name)
    ours = AutoencoderKL.from_pretrained(folder)
    x = torch.rand(2, 3, 48, 80) * 2 - 1  # non-square
    with torch.no_grad():
        expected, got = reference.encode(x).latent_dist, ours.encode(x).latent_dist
        torch.testing.assert_close(got.mean, expected.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.std, expected.std, rtol=1e-5, atol=1e-5)
        drawn = [d.sample(torch.Generator().manual_seed(7)) for d in (expected, got)]
        torch.testing.assert_close(drawn[1], drawn[0], rtol=1e-5, atol=1e-5)
        z = torch.randn_like(expected.mean)
        torch.testing.assert_close(ours.decode(z).sample, reference.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_gradients_through_decode_equal_diffusers(tmp_path):
    """ReFL and DMDR back-propagate a reward through the decoder."""
    reference, folder = reference_folder(tmp_path, "flux-like")
    ours = AutoencoderKL.from_pretrained(folder)
    grads = []
    for model in (reference, ours):
        z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
        model.decode(z).sample.square().mean().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_saved_folder_loads_in_diffusers_unchanged(tmp_path):
    from diffusers import AutoencoderKL as Reference

    reference, folder = reference_folder(tmp_path, "flux-like")
    AutoencoderKL.from_pretrained(folder).save_pretrained(tmp_path / "ours")
    again = Reference.from_pretrained(tmp_path / "ours")
    assert again.config.scaling_factor == 0.36 and again.config.shift_factor == 0.11
    for (k, a), (k2, b) in zip(reference.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_config_fields_and_keys_are_named(tmp_path):
    _, folder = reference_folder(tmp_path, "flux-like")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": "0.36"}))
    with pytest.raises(ZImageKitError, match="scaling_factor must be a float, got '0.36'"):
        AutoencoderKL.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "up_block_types": ["AttnUpDecoderBlock2D"] * 4}))
    with pytest.raises(ZImageKitError, match="up_block_types .*AttnUpDecoderBlock2D.* is not supported"):
        AutoencoderKL.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 8, 16, 32]}))
    with pytest.raises(ZImageKitError, match=r"does not fit this VAE: .*wrong-shaped") as error:
        AutoencoderKL.from_pretrained(folder)
    assert "\n" not in str(error.value)


def test_pickled_weights_are_never_loaded(tmp_path):
    _, folder = reference_folder(tmp_path, "flux-like")
    weights = folder / "diffusion_pytorch_model.safetensors"
    torch.save({}, folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ZImageKitError, match="no diffusion_pytorch_model.safetensors"):
        AutoencoderKL.from_pretrained(folder)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiled_encode_and_decode_equal_diffusers(tmp_path, name):
    """enable_tiling: tiles of sample_size pixels overlapping by a quarter, blended as diffusers
    blends them (an image of 2 x 3 tiles and a ragged edge)."""
    reference, folder = reference_folder(tmp_path, name)
    ours = AutoencoderKL.from_pretrained(folder)
    for vae in (reference, ours):
        vae.enable_tiling()
        vae.tile_sample_min_size = 32  # diffusers reads config.sample_size once, at construction
        vae.tile_latent_min_size = 32 // 2 ** (len(CONFIGS[name]["block_out_channels"]) - 1)
    x = torch.rand(1, 3, 56, 88) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean,
                                   rtol=1e-5, atol=1e-5)
        z = torch.randn(1, CONFIGS[name]["latent_channels"], 14, 22)
        tiled = ours.decode(z).sample
        torch.testing.assert_close(tiled, reference.decode(z).sample, rtol=1e-5, atol=1e-5)
        ours.disable_tiling()
        whole = ours.decode(z).sample
    assert tiled.shape == whole.shape and not torch.allclose(tiled, whole, atol=1e-3)  # tiles see less context
    assert AutoencoderKL.from_pretrained(folder).tile_sample_min_size == reference.config.sample_size
