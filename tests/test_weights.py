"""Weights speak Hugging Face names, load strictly, and round-trip with diffusers and ComfyUI files."""

import json

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from safetensors.torch import save_file

from s3dit_oracle import CONFIGS, max_rel_err, mixed_outputs, oracle_and_ours
from zimagekit.errors import ZImageKitError
from zimagekit.s3dit import S3DiT, S3DiTConfig

CFG = CONFIGS["2heads"]


def outputs(model, cfg=CFG):
    return mixed_outputs(model, cfg)


def test_state_dict_has_exactly_the_diffusers_keys_and_shapes():
    ref, ours = oracle_and_ours(CFG)
    expected = {k: v.shape for k, v in ref.state_dict().items()}
    got = {k: v.shape for k, v in ours.state_dict().items()}
    assert got == expected
    assert "layers.0.attention.to_q.weight" in got and "all_x_embedder.2-1.weight" in got


def test_state_dict_round_trips_values():
    ref, ours = oracle_and_ours(CFG)
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_load_state_dict_names_missing_unexpected_and_wrong_shaped_keys():
    ref, ours = oracle_and_ours(CFG)
    sd = dict(ref.state_dict())
    del sd["layers.1.attention.to_k.weight"]
    sd["layers.9.mystery.weight"] = torch.zeros(3)
    sd["cap_embedder.1.weight"] = torch.zeros(5, 5)
    with pytest.raises(ZImageKitError) as e:
        ours.load_state_dict(sd)
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing (layers.1.attention.to_k.weight)" in msg
    assert "1 unexpected (layers.9.mystery.weight)" in msg
    assert "1 wrong-shaped (cap_embedder.1.weight (5, 5) vs (64, 32))" in msg


def test_a_failed_load_changes_nothing():
    ref, ours = oracle_and_ours(CFG)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    sd = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
    del sd["x_pad_token"]
    with pytest.raises(ZImageKitError):
        ours.load_state_dict(sd)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_save_pretrained_loads_in_diffusers(tmp_path):
    _, ours = oracle_and_ours(CFG)
    ours.save_pretrained(tmp_path)
    theirs = ZImageTransformer2DModel.from_pretrained(tmp_path).eval()
    assert max_rel_err(outputs(theirs), outputs(ours)) <= 1e-6


def test_sharded_save_writes_an_index_that_diffusers_and_we_load(tmp_path):
    _, ours = oracle_and_ours(CFG)
    ours.save_pretrained(tmp_path, max_shard_size=100_000)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    theirs = ZImageTransformer2DModel.from_pretrained(tmp_path).eval()
    again = S3DiT.from_pretrained(tmp_path)
    assert max_rel_err(outputs(theirs), outputs(ours)) <= 1e-6
    assert max_rel_err(outputs(again), outputs(ours)) == 0


def test_from_pretrained_reads_a_diffusers_folder_sharded_or_not(tmp_path):
    ref, _ = oracle_and_ours(CFG)
    ref.save_pretrained(tmp_path / "single")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    for sub in ("single", "sharded"):
        ours = S3DiT.from_pretrained(tmp_path / sub)
        assert ours.config == CFG
        assert max_rel_err(outputs(ours), outputs(ref)) <= 1e-5


def test_from_pretrained_casts_dtype(tmp_path):
    ref, _ = oracle_and_ours(CFG)
    ref.save_pretrained(tmp_path)
    assert S3DiT.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def comfy_file(ref, path, prefix="model.diffusion_model."):
    """Write ref's weights the way ComfyUI / the original repo store them."""
    sd, out = ref.state_dict(), {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            stem = k.split("attention.to_q.")[0]
            v = torch.cat([sd[f"{stem}attention.to_{n}.weight"] for n in "qkv"])
            k = f"{stem}attention.qkv.weight"
        k = (k.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
             .replace("attention.to_out.0.", "attention.out.").replace("attention.norm_q.", "attention.q_norm.")
             .replace("attention.norm_k.", "attention.k_norm."))
        out[prefix + k] = v.contiguous()
    out[prefix + "norm_final.weight"] = torch.ones(ref.config.dim)  # present in some exports; unused
    save_file(out, str(path))


def test_comfyui_single_file_loads_and_infers_the_released_layout(tmp_path):
    # head_dim 128 like the released model, so the config is inferred from the shapes alone.
    cfg = S3DiTConfig(dim=128, n_layers=2, n_refiner_layers=1, n_heads=1, n_kv_heads=1, cap_feat_dim=32)
    ref, _ = oracle_and_ours(cfg)
    comfy_file(ref, tmp_path / "z_image_turbo_bf16.safetensors")
    ours = S3DiT.from_pretrained(tmp_path / "z_image_turbo_bf16.safetensors")
    assert (ours.config.dim, ours.config.n_layers, ours.config.n_refiner_layers, ours.config.axes_dims) == (128, 2, 1, (32, 48, 48))
    assert max_rel_err(outputs(ours, cfg), outputs(ref, cfg)) <= 1e-5


def test_comfyui_file_without_prefix_and_with_explicit_config(tmp_path):
    ref, _ = oracle_and_ours(CFG)
    comfy_file(ref, tmp_path / "m.safetensors", prefix="")
    ours = S3DiT.from_pretrained(tmp_path / "m.safetensors", config=CFG)
    assert max_rel_err(outputs(ours), outputs(ref)) <= 1e-5


def test_truncated_safetensors_gives_one_clear_error(tmp_path):
    _, ours = oracle_and_ours(CFG)
    ours.save_pretrained(tmp_path)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ZImageKitError, match="truncated or corrupt"):
        S3DiT.from_pretrained(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"not even opened")
    with pytest.raises(ZImageKitError, match="pickle"):
        S3DiT.from_pretrained(f)


def test_pipeline_root_gets_a_hint(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ZImageKitError, match="transformer/ subfolder"):
        S3DiT.from_pretrained(tmp_path)


def test_saving_again_in_one_file_removes_the_old_shards(tmp_path):
    _, ours = oracle_and_ours(CFG)
    ours.save_pretrained(tmp_path, max_shard_size=100_000)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
