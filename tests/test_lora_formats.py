"""LoRA files in the layouts people share for Z-Image (kohya, ComfyUI/musubi, peft, fused qkv,
dotted factor names) read into exactly what diffusers' own Z-Image converter makes of them, and
apply to the model as the diffusers-format file does."""

import pytest
import torch
from safetensors.torch import save_file

from s3dit_oracle import CONFIGS, max_rel_err, mixed_outputs, oracle_and_ours
from zimagekit.errors import ZImageKitError
from zimagekit.lora import TARGETS, LoRA
from zimagekit.lora_formats import to_diffusers_lora

CFG = CONFIGS["2heads"]
RANK, ALPHA = 4, 3.0


def modules(model) -> dict[str, tuple[int, int]]:
    """Hugging Face name -> (out, in) of every block projection plus two other linears."""
    names = {}
    for kind in ("noise_refiner", "context_refiner", "layers"):
        for i, block in enumerate(getattr(model, kind)):
            for target, (internal, _, parts) in TARGETS.items():
                layer = block.get_submodule(internal)
                names[f"{kind}.{i}.{target}"] = (layer.out_features // parts, layer.in_features)
            if kind != "context_refiner":  # the context refiner has no modulation
                names[f"{kind}.{i}.adaLN_modulation.0"] = tuple(block.adaLN_modulation[0].weight.shape)
    names["t_embedder.mlp.0"] = tuple(model.t_embedder.mlp[0].weight.shape)
    return names


def factors(model, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (down, up) per module; q/k/v of each block share their down matrix, so the same
    adapter can also be written as one fused qkv."""
    g = torch.Generator().manual_seed(seed)
    out, shared = {}, {}
    for name, (n_out, n_in) in modules(model).items():
        block = name.split(".attention.")[0]
        down = torch.randn(RANK, n_in, generator=g) * 0.3
        if ".attention.to_" in name and name[-1] in "qkv":
            down = shared.setdefault(block, down)
        out[name] = (down, torch.randn(n_out, RANK, generator=g) * 0.3)
    return out


def layout(model, kind: str) -> dict[str, torch.Tensor]:
    """The same adapters (alpha 3, rank 4) written in one of the shared layouts."""
    sd = {}
    for name, (down, up) in factors(model).items():
        if kind == "kohya":
            stem, d, u = "lora_unet_" + name.replace(".", "_"), "lora_down", "lora_up"
        elif kind == "comfy":
            stem, d, u = "diffusion_model." + name, "lora_down", "lora_up"
        elif kind == "peft":
            stem, d, u = name, "lora_A.default", "lora_B.default"
        elif kind == "dots":
            stem, d, u = "diffusion_model." + name.replace("to_q", "to.q").replace("to_k", "to.k"), "lora.down", "lora.up"
        else:
            raise AssertionError(kind)
        # Dotted files name the alpha by the module's real name, as diffusers expects.
        alpha = "diffusion_model." + name if kind == "dots" else stem
        sd[f"{stem}.{d}.weight"], sd[f"{stem}.{u}.weight"], sd[f"{alpha}.alpha"] = down, up, torch.tensor(ALPHA)
    return sd


def fused_qkv(model) -> dict[str, torch.Tensor]:
    """kohya's layout over the original module tree: one qkv adapter and attention.out."""
    sd = {}
    by_name = factors(model)
    for name, (down, up) in by_name.items():
        block, _, target = name.partition(".attention.")
        if target in ("to_k", "to_v"):
            continue
        if target == "to_q":
            up = torch.cat([by_name[f"{block}.attention.to_{p}"][1] for p in "qkv"])
            name = f"{block}.attention.qkv"
        elif target == "to_out.0":
            name = f"{block}.attention.out"
        stem = "lora_unet_" + name.replace(".", "_")
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"], sd[f"{stem}.alpha"] = down, up, torch.tensor(ALPHA)
    return sd


def diffusers_conversion(sd):
    from diffusers.loaders import ZImageLoraLoaderMixin

    return ZImageLoraLoaderMixin.lora_state_dict(dict(sd))


@pytest.mark.parametrize("kind", ["kohya", "comfy", "peft", "dots", "fused_qkv"])
def test_each_layout_converts_exactly_as_diffusers_does(kind):
    _, model = oracle_and_ours(CFG)
    sd = fused_qkv(model) if kind == "fused_qkv" else layout(model, kind)
    expected = diffusers_conversion(sd)
    got = to_diffusers_lora(dict(sd))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("kind", ["kohya", "comfy", "fused_qkv", "peft_model"])
def test_each_layout_applies_as_the_diffusers_file_does(tmp_path, kind):
    _, model = oracle_and_ours(CFG)
    base = mixed_outputs(model, CFG)
    reference = tmp_path / "diffusers.safetensors"
    save_file(diffusers_conversion(layout(model, "comfy")), str(reference))
    lora = LoRA.load(model, reference, scale=0.7)
    expected = mixed_outputs(model, CFG)
    assert max_rel_err(expected, base) > 1e-2  # the adapters (adaLN and t_embedder included) do something
    lora.detach_from_model()

    if kind == "fused_qkv":
        sd = fused_qkv(model)
    elif kind == "peft_model":  # a whole saved peft model: base_model.model.<module>.lora_A.default.weight
        sd = {f"base_model.model.{k}": v for k, v in layout(model, "peft").items()}
    else:
        sd = layout(model, kind)
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.clone() for k, v in sd.items()}, str(path))  # shared q/k/v downs: own storage each
    LoRA.load(model, path, scale=0.7)
    assert max_rel_err(mixed_outputs(model, CFG), expected) <= 1e-5


def test_an_unknown_layout_names_its_keys(tmp_path):
    _, model = oracle_and_ours(CFG)
    sd = {"lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.zeros(2, 2)}
    with pytest.raises(ZImageKitError, match="LoKr/LoHa"):
        to_diffusers_lora(sd)
    path = tmp_path / "odd.safetensors"
    save_file({"layers.0.attention.to_q.weight_delta": torch.zeros(2), "something.else": torch.zeros(1)}, str(path))
    with pytest.raises(ZImageKitError, match=r"not a LoRA layout zimagekit reads: 'layers.0.attention.to_q.weight_delta'") as error:
        LoRA.load(model, path)
    assert "\n" not in str(error.value)
    save_file({"lora_unet_layers_0_attention_to_q.lora_down.weight": torch.zeros(4, 64)}, str(path))
    with pytest.raises(ZImageKitError, match="layers.0.attention.to_q has lora_A/down but not its partner"):
        LoRA.load(model, path)
    save_file({"lora_unet_layers_9_attention_to_q.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_layers_9_attention_to_q.lora_up.weight": torch.zeros(64, 4)}, str(path))
    with pytest.raises(ZImageKitError, match="the model has no layers.9.attention.to_q; this LoRA is for another model"):
        LoRA.load(model, path)


def test_a_non_positive_alpha_is_refused():
    """(diffusers' alpha split never ends on a negative alpha.)"""
    sd = {"lora_unet_layers_0_attention_to_q.lora_down.weight": torch.zeros(4, 64),
          "lora_unet_layers_0_attention_to_q.lora_up.weight": torch.zeros(64, 4),
          "lora_unet_layers_0_attention_to_q.alpha": torch.tensor(-8.0)}
    with pytest.raises(ZImageKitError, match="alpha -8.0 and rank 4; both must be positive"):
        to_diffusers_lora(sd)
