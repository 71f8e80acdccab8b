"""S3DiTConfig reads Hugging Face config files; the released preset has exactly 6,154,908,736 parameters."""

import json

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from zimagekit.errors import ZImageKitError
from zimagekit.s3dit import PRESETS, S3DiT, S3DiTConfig, parameter_breakdown

# transformer/config.json of Tongyi-MAI/Z-Image-Turbo as published (diffusers writes siglip_feat_dim null).
TURBO_CONFIG = {
    "_class_name": "ZImageTransformer2DModel", "_diffusers_version": "0.36.0.dev0",
    "all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30,
    "n_refiner_layers": 2, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "siglip_feat_dim": None,
    "t_scale": 1000.0,
}


def test_from_json_reads_the_turbo_config_and_equals_the_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TURBO_CONFIG))
    cfg = S3DiTConfig.from_json(path)
    assert cfg == S3DiTConfig.preset("z-image-turbo")
    assert cfg.axes_lens == (1536, 512, 512) and cfg.head_dim == 128 and cfg.ffn_dim == 10240


def test_from_json_rejects_unknown_fields_by_name(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TURBO_CONFIG, "n_layerz": 3}))
    with pytest.raises(ZImageKitError, match=r"unknown field\(s\) \['n_layerz'\]"):
        S3DiTConfig.from_json(path)


@pytest.mark.parametrize("field, value, words", [("dim", "256", 'must be an integer, got "256"'),
                                                  ("qk_norm", 1, "must be true or false, got 1"),
                                                  ("axes_lens", [1536, "512", 512], "must be a list of integers"),
                                                  ("rope_theta", "256", 'must be a number, got "256"')])
def test_from_json_names_a_field_of_the_wrong_type(tmp_path, field, value, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TURBO_CONFIG, field: value}))
    with pytest.raises(ZImageKitError, match=f"field '{field}' {words}"):
        S3DiTConfig.from_json(path)


def test_config_rejects_axes_that_do_not_fill_the_head():
    with pytest.raises(ZImageKitError, match="axes_dims"):
        S3DiTConfig(dim=64, n_heads=2, axes_dims=(8, 8, 8))


def test_presets_include_turbo_and_tiny():
    assert {"z-image-turbo", "tiny"} <= set(PRESETS)
    with pytest.raises(ZImageKitError, match="unknown preset"):
        S3DiTConfig.preset("nope")


def test_turbo_preset_on_meta_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = S3DiT(S3DiTConfig.preset("z-image-turbo"))
        oracle = ZImageTransformer2DModel(**S3DiTConfig.preset("z-image-turbo").to_dict())
    counts = parameter_breakdown(model)
    assert counts["total"] == 6_154_908_736 == sum(p.numel() for p in oracle.parameters())
    # Per main block (spec §1): attention 58,982,400 + QK-norm 256, FFN 117,964,800,
    # adaLN 3,947,520, four RMSNorms 15,360.
    assert counts["layers.attention"] == 30 * 58_982_656
    assert counts["layers.feed_forward"] == 30 * 117_964_800
    assert counts["layers.adaLN_modulation"] == 30 * 3_947_520
    assert counts["layers.norms"] == 30 * 15_360
    assert counts["noise_refiner"] == 361_820_672 and counts["context_refiner"] == 353_925_632
    assert counts["cap_embedder"] == 9_836_800 and counts["t_embedder"] == 525_568
    assert counts["x_embedder"] == 249_600 and counts["final_layer"] == 1_232_704 and counts["pad_tokens"] == 7_680


def test_bad_inputs_raise_clear_errors():
    model = S3DiT(S3DiTConfig.preset("tiny"))
    with pytest.raises(ZImageKitError, match="multiples of the patch size"):
        model([torch.zeros(16, 1, 5, 4)], torch.zeros(1), [torch.zeros(3, 64)])
    with pytest.raises(ZImageKitError, match="each caption must be"):
        model([torch.zeros(16, 1, 4, 4)], torch.zeros(1), [torch.zeros(3, 65)])
    with pytest.raises(ZImageKitError, match="batch sizes differ"):
        model([torch.zeros(16, 1, 4, 4)] * 2, torch.zeros(2), [torch.zeros(3, 64)])
    with pytest.raises(ZImageKitError, match="exceeds axes_lens"):
        model([torch.zeros(16, 1, 4, 4)], torch.zeros(1), [torch.zeros(1100, 64)])


def test_forward_flops_agree_with_torchs_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from zimagekit.s3dit import forward_flops

    cfg = S3DiTConfig(dim=128, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=64,
                      axes_dims=(16, 24, 24))
    model = S3DiT(cfg)
    x = [torch.zeros(16, 1, 12, 20)] * 2  # 60 image tokens, padded to 64
    caps = [torch.zeros(40, 64)] * 2  # 40 caption tokens, padded to 64
    # The math backend runs attention as counted bmm's (the CPU flash kernel is not counted);
    # equal lengths mean no batch padding, which the formula deliberately leaves out.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(2), caps)
    measured = counter.get_total_flops()
    # Left out of the formula: the timestep MLP and the final layer's adaLN (tiny GEMMs).
    assert abs(forward_flops(cfg, [60, 60], [40, 40]) - measured) / measured < 0.01


def test_image_tokens_are_latent_cells_over_the_patch():
    turbo = S3DiTConfig.preset("z-image-turbo")
    assert turbo.image_tokens(128, 128) == 4096  # 1024² px: 8x VAE, then 2x2 patches
    assert turbo.image_tokens(96, 160) == 48 * 80  # 768x1280 px
    assert turbo.image_tokens(8, 8, frames=3) == 3 * 16
