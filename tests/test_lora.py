"""LoRA: our adapters, saved in diffusers' key format, give diffusers the same model."""

import pytest
import torch

from s3dit_oracle import CONFIGS, max_rel_err, mixed_outputs, oracle_and_ours
from zimagekit.errors import ZImageKitError
from zimagekit.lora import TARGETS, LoRA

CFG = CONFIGS["2heads"]


def randomise(lora):
    with torch.no_grad():
        for p in lora.B.values():  # B starts at zero; give the adapters something to do
            p.normal_(0, 0.2)


def outputs(model):
    return mixed_outputs(model, CFG)


def test_a_fresh_lora_leaves_the_model_unchanged_and_trains_only_itself():
    _, ours = oracle_and_ours(CFG)
    before = outputs(ours)
    lora = LoRA.create(ours, rank=4)
    assert max_rel_err(outputs(ours), before) == 0
    assert not any(p.requires_grad for p in ours.parameters())
    assert all(p.requires_grad for p in lora.parameters())
    assert set(ours.state_dict()) == set(oracle_and_ours(CFG)[1].state_dict())  # base keys untouched


def test_diffusers_loads_our_lora_file_and_computes_the_same(tmp_path):
    from diffusers.loaders import ZImageLoraLoaderMixin  # needs peft, a test extra

    ref, ours = oracle_and_ours(CFG)
    lora = LoRA.create(ours, rank=4, alpha=8)
    randomise(lora)
    lora.save(tmp_path / "lora.safetensors")
    state = ZImageLoraLoaderMixin.lora_state_dict(str(tmp_path / "lora.safetensors"))
    ZImageLoraLoaderMixin.load_lora_into_transformer(state, transformer=ref)
    assert max_rel_err(outputs(ours), outputs(ref)) <= 1e-5


def test_loaded_lora_with_scale_merge_and_unmerge(tmp_path):
    _, ours = oracle_and_ours(CFG)
    base = outputs(ours)
    trained = LoRA.create(ours, rank=4, alpha=2)
    randomise(trained)
    full = outputs(ours)
    assert max_rel_err(full, base) > 1e-2  # the adapters really change the model
    trained.save(tmp_path / "l.safetensors")
    trained.detach_from_model()
    assert max_rel_err(outputs(ours), base) == 0

    lora = LoRA.load(ours, tmp_path / "l.safetensors", scale=1.0)
    assert max_rel_err(outputs(ours), full) <= 1e-6
    lora.merge()  # folded into the weights: same outputs, no adapter compute
    assert max_rel_err(outputs(ours), full) <= 1e-5
    lora.unmerge()
    lora.scale = 0.0
    assert max_rel_err(outputs(ours), base) <= 1e-6


def test_every_target_is_addressable_by_its_hugging_face_name(tmp_path):
    _, ours = oracle_and_ours(CFG)
    lora = LoRA.create(ours, rank=2)
    keys = set(lora.diffusers_state_dict())
    for target in TARGETS:
        assert f"transformer.layers.1.{target}.lora_A.weight" in keys
        assert f"transformer.noise_refiner.0.{target}.lora_B.weight" in keys


def test_bad_lora_files_get_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    _, ours = oracle_and_ours(CFG)
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2), "unet.down.lora_B.weight": torch.zeros(2, 2)},
              str(tmp_path / "sd.safetensors"))
    with pytest.raises(ZImageKitError, match="the model has no unet.down; this LoRA is for another model"):
        LoRA.load(ours, tmp_path / "sd.safetensors")
    save_file({"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 7),
               "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(64, 2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ZImageKitError, match="needs A"):
        LoRA.load(ours, tmp_path / "w.safetensors")
