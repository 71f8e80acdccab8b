"""The Z-Image ControlNet against diffusers: the model's hints in all three released layouts, the
pipeline against ZImageControlNetPipeline and ZImageControlNetInpaintPipeline on the tiny folder,
single files, and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_fixtures import TINY_TRANSFORMER
from s3dit_oracle import CONFIGS, oracle_and_ours
from zimagekit.controlnet import ZImageControlNet, controlled_forward
from zimagekit.errors import ZImageKitError
from zimagekit.pipeline import ZImagePipeline

# v1 (plain refiner blocks, 16 channels), 2.0 (the control blocks also steer the noise
# refiner, no refiner stack of its own), 2.1 (a control-block refiner stack), each scaled down.
LAYOUTS = {
    "v1": dict(add_control_noise_refiner=None, control_in_dim=16, control_refiner_layers_places=None),
    "2.0": dict(add_control_noise_refiner="control_layers", control_in_dim=33, control_refiner_layers_places=[0]),
    "2.1": dict(add_control_noise_refiner="control_noise_refiner", control_in_dim=33, control_refiner_layers_places=[0]),
}


def reference_controlnet(transformer_config: dict, layout: str, seed: int = 1):
    """diffusers' ZImageControlNetModel with every weight random (its projections start at
    zero, which would make the hints vanish)."""
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    net = ZImageControlNetModel(
        control_layers_places=[0, 1], dim=transformer_config["dim"], n_refiner_layers=transformer_config["n_refiner_layers"],
        n_heads=transformer_config["n_heads"], n_kv_heads=transformer_config["n_kv_heads"],
        norm_eps=transformer_config["norm_eps"], qk_norm=transformer_config["qk_norm"], **LAYOUTS[layout])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net.eval()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hints_equal_diffusers_in_every_layout(tmp_path, layout):
    cfg = CONFIGS["2heads"]
    ref, ours = oracle_and_ours(cfg)
    net = reference_controlnet(cfg.to_dict(), layout)
    net.save_pretrained(tmp_path / "cn")
    from diffusers import ZImageControlNetModel

    net = ZImageControlNetModel.from_transformer(net, ref)
    mine = ZImageControlNet.from_pretrained(tmp_path / "cn")
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, 8, 12, generator=g) for _ in range(2)]
    t = torch.tensor([0.3, 0.7])
    caps = [torch.randn(20, cfg.cap_feat_dim, generator=g), torch.randn(45, cfg.cap_feat_dim, generator=g)]
    control = torch.randn(2, net.config.control_in_dim, 1, 8, 12, generator=g)
    with torch.no_grad():
        samples = net(x, t, caps, list(control.unbind(0)), conditioning_scale=0.7)
        expected = ref(x, t, caps, controlnet_block_samples=samples).sample
        got = controlled_forward(ours, mine, x, t, caps, control, 0.7)
        plain = ours(x, t, caps)
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(got, plain)) > 1e-2  # the hints matter
    assert not any(name.startswith(("layers", "noise_refiner")) for name, _ in ours.named_modules()
                   if "hook" in name)  # no hooks left behind
    assert all(not layer._forward_hooks for layer in ours.layers)


def _images(width=96, height=64):
    rng = np.random.RandomState(3)
    control = Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8))
    image = Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[16:48, 40:88] = 255
    return control, image, Image.fromarray(mask)


@pytest.fixture(scope="module")
def controlnet_folders(tmp_path_factory):
    folders = {}
    for layout in ("v1", "2.1"):
        folder = tmp_path_factory.mktemp(f"cn-{layout}")
        reference_controlnet(TINY_TRANSFORMER, layout).save_pretrained(folder)
        folders[layout] = folder
    return folders


@pytest.mark.parametrize("layout,guidance", [("v1", 0.0), ("2.1", 2.0)])
def test_pipeline_equals_diffusers_controlnet_pipeline(tiny_model_dir, reference_pipe, controlnet_folders, layout,
                                                       guidance):
    from diffusers import ZImageControlNetModel, ZImageControlNetPipeline

    net = ZImageControlNetModel.from_pretrained(controlnet_folders[layout])
    reference = ZImageControlNetPipeline(**reference_pipe.components, controlnet=net)
    reference.set_progress_bar_config(disable=True)
    ours = ZImagePipeline.from_pretrained(tiny_model_dir, controlnet=controlnet_folders[layout])
    control, _, _ = _images()
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=3, guidance_scale=guidance,
                  controlnet_conditioning_scale=0.6, width=96, height=64)
    expected = reference(control_image=control, **kwargs, generator=torch.Generator().manual_seed(5),
                         output_type="pt").images
    got = ours(control_image=control, **kwargs, seed=5, output_type="pt", progress=False)
    assert got.shape == expected.shape == (1, 3, 64, 96)
    assert (got - expected).abs().max().item() < 1e-5
    plain = ours(prompt="a photo of a cat", num_inference_steps=3, guidance_scale=guidance, width=96, height=64, seed=5,
                 output_type="pt", progress=False)
    assert (got - plain).abs().max().item() > 1e-2


def test_controlnet_inpainting_equals_diffusers(tiny_model_dir, reference_pipe, controlnet_folders):
    from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetModel

    net = ZImageControlNetModel.from_pretrained(controlnet_folders["2.1"])
    reference = ZImageControlNetInpaintPipeline(**reference_pipe.components, controlnet=net)
    reference.set_progress_bar_config(disable=True)
    ours = ZImagePipeline.from_pretrained(tiny_model_dir, controlnet=controlnet_folders["2.1"])
    control, image, mask = _images()
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=3, guidance_scale=0.0, controlnet_conditioning_scale=0.8,
                  width=96, height=64)
    expected = reference(image=image, mask_image=mask, control_image=control, **kwargs,
                         generator=torch.Generator().manual_seed(2), output_type="pt").images
    got = ours(image=image, mask_image=mask, control_image=control, **kwargs, seed=2, output_type="pt", progress=False)
    assert (got - expected).abs().max().item() < 1e-5
    v1 = ZImagePipeline.from_pretrained(tiny_model_dir, controlnet=controlnet_folders["v1"])
    with pytest.raises(ZImageKitError, match="takes 16 input channels, not the 33 of inpainting"):
        v1(image=image, mask_image=mask, control_image=control, **kwargs, progress=False)
    with pytest.raises(ZImageKitError, match="strength does not apply to ControlNet inpainting"):
        ours(image=image, mask_image=mask, control_image=control, strength=0.5, **kwargs, progress=False)


def test_single_files_and_wrong_files(tiny_model_dir, controlnet_folders, tmp_path):
    """A released file carries no config: it is read from the keys and the transformer's."""
    from safetensors.torch import load_file, save_file

    from zimagekit.s3dit import S3DiTConfig

    base = S3DiTConfig.from_json(tiny_model_dir / "transformer" / "config.json")
    for layout, folder in controlnet_folders.items():
        state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        save_file(state, str(tmp_path / f"{layout}.safetensors"))
        single = ZImageControlNet.from_pretrained(tmp_path / f"{layout}.safetensors", base)
        assert single.config == ZImageControlNet.from_pretrained(folder).config
    # a 2.0 file without its (unused) refiner stack is still read as 2.0
    two = reference_controlnet(TINY_TRANSFORMER, "2.0")
    state = {k: v for k, v in two.state_dict().items() if not k.startswith("control_noise_refiner.")}
    save_file(state, str(tmp_path / "2.0-bare.safetensors"))
    assert ZImageControlNet.from_pretrained(tmp_path / "2.0-bare.safetensors", base).config.add_control_noise_refiner \
        == "control_layers"
    state = load_file(str(controlnet_folders["v1"] / "diffusion_pytorch_model.safetensors"))
    state["control_layers.0.after_proj.weight"] = state["control_layers.0.after_proj.weight"][:, :16].contiguous()
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ZImageKitError, match=r"does not fit this ControlNet config: .*control_layers.0.after_proj.weight"):
        ZImageControlNet.from_pretrained(tmp_path / "bad.safetensors", base)
    wide = reference_controlnet({**TINY_TRANSFORMER, "dim": 64}, "v1")
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ZImageKitError, match="is for a transformer of width 64 .* this one has 32"):
        ZImagePipeline.from_pretrained(tiny_model_dir, controlnet=tmp_path / "wide")
    with pytest.raises(ZImageKitError, match="control_image needs a ControlNet"):
        ZImagePipeline.from_pretrained(tiny_model_dir)("a cat", control_image=_images()[0], progress=False)


def test_generate_with_a_control_image(tiny_model_dir, controlnet_folders, tmp_path, capsys):
    from zimagekit.cli import main

    control, _, _ = _images()
    control.save(tmp_path / "control.png")
    out = tmp_path / "c.png"
    assert main(["generate", "a cat", "--model", str(tiny_model_dir), "--controlnet", str(controlnet_folders["v1"]),
                 "--control-image", str(tmp_path / "control.png"), "--control-scale", "0.6", "-s", "5", "--steps", "3",
                 "-W", "96", "-H", "64",
                 "--dtype", "fp32", "--no-progress", "-o", str(out)]) == 0
    ours = ZImagePipeline.from_pretrained(tiny_model_dir, controlnet=controlnet_folders["v1"])
    expected = ours("a cat", control_image=control, controlnet_conditioning_scale=0.6, num_inference_steps=3, seed=5,
                    width=96, height=64, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert "Control scale: 0.6" in Image.open(out).text["parameters"]
    capsys.readouterr()
    assert main(["generate", "a cat", "--model", str(tiny_model_dir), "--control-image", str(tmp_path / "control.png"),
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "--control-image needs --controlnet" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
