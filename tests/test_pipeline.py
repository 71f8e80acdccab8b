"""ZImagePipeline against diffusers' ZImagePipeline / ZImageImg2ImgPipeline on the same tiny folder.

The oracle is diffusers 0.42 run on the folder it wrote itself (tests/pipeline_fixtures.py), with
the real Qwen3 tokenizer.  Images are compared as float tensors in [0, 1]; on this folder a
different prompt, seed or guidance setting moves pixels by 2e-2 or more, so 1e-5 separates a
match from a near-miss.
"""

import copy
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from zimagekit.errors import ZImageKitError
from zimagekit.pipeline import ZImagePipeline
from zimagekit.sampling import ScheduleConfig, get_sigmas
from zimagekit.text_encoder import Qwen3TextEncoder

ATOL = 1e-5
SMALL = dict(height=64, width=96, num_inference_steps=4)


def reference_images(pipe, seed=7, **kwargs):
    # deepcopy: diffusers rewrites a prompt list in place (spec addendum).
    kwargs = copy.deepcopy(kwargs)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="pt").images


def our_images(pipe, seed=7, **kwargs):
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="pt", progress=False)


def max_diff(a, b):
    return (a - b).abs().max().item()


# -- text path ---------------------------------------------------------------------------------


def test_chat_formatted_prompt_tokenizes_like_qwen3(zimage_pipe):
    ids = zimage_pipe.text_encoder.token_ids(["a photo of a cat"])
    assert ids == [[151644, 872, 198, 64, 6548, 315, 264, 8251, 151645, 198, 151644, 77091, 198]]


def test_text_encoder_runs_one_layer_fewer_and_no_final_norm(zimage_pipe, tiny_model_dir):
    config = json.loads((tiny_model_dir / "text_encoder" / "config.json").read_text())
    model = zimage_pipe.text_encoder.model
    assert len(model.layers) == config["num_hidden_layers"] - 1
    # Neither the last layer, the final norm nor lm_head is in memory.
    assert not [k for k in model.state_dict() if k.startswith(f"layers.{config['num_hidden_layers'] - 1}.") or "norm.weight" == k]


def test_prompt_features_equal_reference_hidden_states(zimage_pipe, reference_pipe):
    prompts = ["a photo of a cat", "a much longer prompt about a red bicycle leaning on a brick wall at dusk"]
    expected, _ = reference_pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False)
    got = zimage_pipe.encode_prompt(prompts)
    assert [g.shape for g in got] == [e.shape for e in expected]  # padding removed
    for g, e in zip(got, expected):
        assert max_diff(g, e) < 1e-6


def test_long_prompt_is_cut_at_max_sequence_length_with_a_warning(zimage_pipe, reference_pipe, caplog):
    prompt = "a cat " * 40
    with caplog.at_level(logging.WARNING, logger="zimagekit"):
        got = zimage_pipe.encode_prompt(prompt, max_sequence_length=32)
    assert "max_sequence_length" in caplog.text
    expected, _ = reference_pipe.encode_prompt([prompt], do_classifier_free_guidance=False, max_sequence_length=32)
    assert got[0].shape[0] == 32 and max_diff(got[0], expected[0]) < 1e-6


def test_qwen3_for_causal_lm_weights_load_too(zimage_pipe, reference_pipe, tiny_model_dir, tmp_path):
    from transformers import Qwen3ForCausalLM

    lm = Qwen3ForCausalLM(reference_pipe.text_encoder.config)
    lm.model.load_state_dict(reference_pipe.text_encoder.state_dict())
    lm.save_pretrained(tmp_path / "text_encoder")
    encoder = Qwen3TextEncoder.from_pretrained(tmp_path / "text_encoder", tiny_model_dir / "tokenizer")
    prompt = ["a photo of a cat"]
    assert max_diff(encoder.encode(prompt)[0], zimage_pipe.encode_prompt(prompt)[0]) == 0


# -- images equal the reference ----------------------------------------------------------------


CASES = {
    "guidance 0": dict(prompt="a photo of a cat", guidance_scale=0.0, **SMALL),
    "guidance 3 + negative": dict(
        prompt="a photo of a cat", guidance_scale=3.0, negative_prompt="blurry, low quality", **SMALL
    ),
    "cfg normalization + truncation": dict(
        prompt="a photo of a cat", guidance_scale=3.0, cfg_normalization=1.0, cfg_truncation=0.4, **SMALL
    ),
    "two prompts of different lengths": dict(
        prompt=["a photo of a cat", "a very long and detailed description of a red bicycle leaning on a wall"],
        guidance_scale=2.0,
        **SMALL,
    ),
    "non-square": dict(prompt="a dog", guidance_scale=0.0, height=96, width=48, num_inference_steps=3),
    "two images per prompt": dict(prompt=["a cat", "a dog"], guidance_scale=1.5, num_images_per_prompt=2, **SMALL),
}


@pytest.mark.parametrize("case", list(CASES))
def test_images_equal_reference(zimage_pipe, reference_pipe, case):
    expected = reference_images(reference_pipe, **CASES[case])
    got = our_images(zimage_pipe, **CASES[case])
    assert got.shape == expected.shape
    assert max_diff(got, expected) < ATOL


def test_latents_equal_reference(zimage_pipe, reference_pipe):
    kwargs = dict(prompt="a photo of a cat", guidance_scale=3.0, **SMALL)
    expected = reference_pipe(**kwargs, generator=torch.Generator().manual_seed(3), output_type="latent").images
    got = zimage_pipe(**kwargs, seed=3, output_type="latent", progress=False)
    assert max_diff(got, expected) < ATOL


def test_img2img_equals_reference(zimage_pipe, tiny_model_dir):
    from diffusers import ZImageImg2ImgPipeline

    reference = ZImageImg2ImgPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype(np.uint8))
    kwargs = dict(prompt="a photo of a cat", strength=0.6, num_inference_steps=4, guidance_scale=2.0)
    expected = reference_images(reference, image=image, **kwargs)
    got = our_images(zimage_pipe, init_image=image, **kwargs)
    assert max_diff(got, expected) < ATOL
    # strength matters: the whole point of img2img
    assert max_diff(our_images(zimage_pipe, init_image=image, **{**kwargs, "strength": 1.0}), got) > 1e-2


def _masks(width, height):
    """A rectangle and a ragged blob with soft (grey) edges, so the 0.5 threshold matters."""
    rect = np.zeros((height, width), np.uint8)
    rect[height // 4 : 3 * height // 4, width // 3 : width - 8] = 255
    yy, xx = np.mgrid[:height, :width]
    blob = np.clip(255 * (1.5 - np.hypot((xx - width * 0.3) / 20, (yy - height * 0.6) / 14)), 0, 255).astype(np.uint8)
    return {"rectangle": Image.fromarray(rect), "blob": Image.fromarray(blob)}


@pytest.fixture(scope="module")
def inpaint_reference(tiny_model_dir):
    from diffusers import ZImageInpaintPipeline

    reference = ZImageInpaintPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.parametrize("mask_name", ["rectangle", "blob"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_equals_reference(zimage_pipe, inpaint_reference, mask_name, strength):
    width, height = 96, 64  # non-square
    image = Image.fromarray((np.random.RandomState(1).rand(height, width, 3) * 255).astype(np.uint8))
    mask = _masks(width, height)[mask_name]
    kwargs = dict(prompt="a photo of a cat", strength=strength, num_inference_steps=4, guidance_scale=2.0)
    expected = reference_images(inpaint_reference, image=image, mask_image=mask, **kwargs)
    got = our_images(zimage_pipe, image=image, mask_image=mask, **kwargs)
    assert got.shape == expected.shape == (1, 3, height, width)
    assert max_diff(got, expected) < ATOL


def test_inpaint_keeps_the_unmasked_latents_and_checks_its_inputs(zimage_pipe):
    width, height = 96, 64
    image = Image.fromarray((np.random.RandomState(1).rand(height, width, 3) * 255).astype(np.uint8))
    mask = _masks(width, height)["rectangle"]
    latents = zimage_pipe("a cat", init_image=image, mask_image=mask, num_inference_steps=3, seed=1,
                          output_type="latent", progress=False)
    clean = zimage_pipe(
        "a cat", init_image=image, num_inference_steps=3, seed=1, strength=1.0, output_type="latent", progress=False)
    keep = (torch.nn.functional.interpolate(
        torch.from_numpy(np.array(mask) >= 128).float()[None, None], size=latents.shape[2:], mode="nearest") == 0)
    # Outside the mask the result is the init image's posterior sample itself; inside, generated.
    x0 = zimage_pipe._encode_images([image], width, height, 1, 1, torch.Generator().manual_seed(1))
    assert torch.equal(latents[keep.expand_as(latents)], x0[keep.expand_as(x0)])
    assert max_diff(latents, clean) > 1e-2
    with pytest.raises(ZImageKitError, match="the mask is 48x64 but the init image is 96x64"):
        zimage_pipe("a cat", init_image=image, mask_image=mask.resize((48, 64)), progress=False)
    with pytest.raises(ZImageKitError, match="mask_image needs init_image"):
        zimage_pipe("a cat", mask_image=mask, progress=False)


def test_caller_latents_equal_reference(zimage_pipe, reference_pipe):
    latents = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(11))
    kwargs = dict(prompt="a photo of a cat", guidance_scale=0.0, **SMALL)
    expected = reference_pipe(**kwargs, latents=latents.clone(), output_type="pt").images
    before = latents.clone()
    got = zimage_pipe(**kwargs, latents=latents, output_type="pt", progress=False)
    assert max_diff(got, expected) < ATOL
    assert torch.equal(latents, before)  # the caller's tensor is not touched


# -- behaviour ---------------------------------------------------------------------------------


def test_prompt_list_is_not_modified_and_repeat_calls_agree(zimage_pipe):
    prompts = ["a photo of a cat", "a dog"]
    first = our_images(zimage_pipe, prompt=prompts, **SMALL)
    assert prompts == ["a photo of a cat", "a dog"]
    assert max_diff(our_images(zimage_pipe, prompt=prompts, **SMALL), first) == 0


def test_a_generator_per_image_makes_each_image_reproducible_alone(zimage_pipe):
    both = zimage_pipe(
        prompt="a cat",
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
        output_type="pt",
        progress=False,
        **SMALL,
    )
    alone = zimage_pipe(prompt="a cat", seed=6, output_type="pt", progress=False, **SMALL)
    assert max_diff(both[1], alone[0]) < ATOL


def test_callback_is_called_once_per_step_with_the_schedule(zimage_pipe):
    seen = []
    zimage_pipe(prompt="a cat", callback=seen.append, output_type="latent", progress=False, **SMALL)
    sigmas = get_sigmas(4, ScheduleConfig(shift=3.0))
    assert [s["i"] for s in seen] == [0, 1, 2, 3]
    assert [float(s["sigma"]) for s in seen] == sigmas[:-1].tolist()


def test_pil_output_is_the_rounded_tensor_output(zimage_pipe, reference_pipe):
    images = zimage_pipe(prompt="a cat", guidance_scale=0.0, seed=1, progress=False, **SMALL)
    expected = reference_pipe(
        prompt="a cat", guidance_scale=0.0, generator=torch.Generator().manual_seed(1), **SMALL
    ).images
    assert len(images) == 1 and images[0].size == (96, 64)
    diff = np.abs(np.asarray(images[0], dtype=int) - np.asarray(expected[0], dtype=int))
    assert diff.max() <= 1


def test_freed_text_encoder_needs_prompt_embeds_and_still_saves(tiny_model_dir, tmp_path):
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, dtype="fp32", device="cpu")
    # One batch, as the pipeline encodes a prompt with its negative: encoding them apart pads
    # differently, and the matmuls' blocking (so the last bits) can change with the thread count.
    embeds, negative = pipe.encode_prompt(["a cat", ""])
    before = pipe(prompt="a cat", guidance_scale=2.0, seed=2, output_type="pt", progress=False, **SMALL)
    pipe.free_text_encoder()
    assert pipe.text_encoder.model is None
    with pytest.raises(ZImageKitError, match="freed"):
        pipe(prompt="a cat", **SMALL)
    after = pipe(
        prompt_embeds=[embeds], negative_prompt_embeds=[negative], guidance_scale=2.0, seed=2,
        output_type="pt", progress=False, **SMALL,
    )  # fmt: skip
    assert max_diff(after, before) == 0
    pipe.save_pretrained(tmp_path / "saved")  # the text encoder is copied from its folder
    weights = "text_encoder/model.safetensors"
    assert (tmp_path / "saved" / weights).read_bytes() == (tiny_model_dir / weights).read_bytes()


def test_pipeline_without_text_encoder_uses_given_embeddings(zimage_pipe, tiny_model_dir):
    pipe = ZImagePipeline.from_pretrained(
        tiny_model_dir, dtype="fp32", device="cpu", load_text_encoder=False, offload=True
    )
    assert pipe.text_encoder.model is None
    kwargs = dict(guidance_scale=2.0, seed=4, output_type="pt", progress=False, **SMALL)
    expected = zimage_pipe(prompt="a cat", **kwargs)
    embeds, negative = zimage_pipe.encode_prompt(["a cat", ""])  # batched as the pipeline does
    got = pipe(prompt_embeds=[embeds], negative_prompt_embeds=[negative], **kwargs)
    assert max_diff(got, expected) == 0


def test_save_pretrained_writes_a_folder_diffusers_loads(zimage_pipe, reference_pipe, tmp_path):
    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    zimage_pipe.save_pretrained(tmp_path / "saved")
    reloaded = DiffusersZImagePipeline.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    reloaded.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a photo of a cat", guidance_scale=2.0, **SMALL)
    assert max_diff(reference_images(reloaded, **kwargs), reference_images(reference_pipe, **kwargs)) == 0
    assert json.loads((tmp_path / "saved" / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0


def test_save_pretrained_stores_transformer_and_vae_in_the_dtype_asked(zimage_pipe, tmp_path):
    from safetensors.torch import load_file

    zimage_pipe.save_pretrained(tmp_path / "saved", torch.bfloat16)
    assert zimage_pipe.transformer.dtype == zimage_pipe.vae.dtype == torch.float32  # the pipeline is untouched
    for name, module in [("transformer", zimage_pipe.transformer), ("vae", zimage_pipe.vae)]:
        (weights,) = (tmp_path / "saved" / name).glob("*.safetensors")
        stored, params = load_file(weights), module.state_dict()
        assert stored.keys() == params.keys() and {t.dtype for t in stored.values()} == {torch.bfloat16}
        assert all(torch.equal(stored[k], params[k].to(torch.bfloat16)) for k in stored)  # round to nearest
    reloaded = ZImagePipeline.from_pretrained(tmp_path / "saved", dtype="fp32", device="cpu")
    assert reloaded.transformer.dtype == reloaded.vae.dtype == torch.float32


def test_bf16_pipeline_stays_close_to_fp32(tiny_model_dir, reference_pipe):
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, dtype="bf16", device="cpu")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32  # force_upcast
    kwargs = dict(prompt="a photo of a cat", guidance_scale=2.0, **SMALL)
    assert max_diff(our_images(pipe, **kwargs), reference_images(reference_pipe, **kwargs)) < 5e-2


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(width=100), "width 100 is not a multiple of 16; use 96 or 112"),
        (dict(height=8), "height 8 is not a multiple of 16; use 16"),
        (dict(num_inference_steps=0), "steps must be at least 1"),
        (dict(guidance_scale=-1.0), "guidance scale must be >= 0"),
        (dict(latents=torch.zeros(1, 16, 4, 4)), "latents have shape"),
        (dict(output_type="np"), "output_type"),
        (dict(negative_prompt=["a", "b"], guidance_scale=1.0), "2 negative prompts for 1 prompts"),
    ],
)
def test_bad_arguments_raise_one_line_errors(zimage_pipe, kwargs, message):
    with pytest.raises(ZImageKitError, match=message) as error:
        zimage_pipe(prompt="a cat", **{**SMALL, **kwargs})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_strength_outside_0_1_is_rejected(zimage_pipe, strength):
    image = Image.new("RGB", (96, 64))
    with pytest.raises(ZImageKitError, match=r"strength must be in \(0, 1\]"):
        zimage_pipe(prompt="a cat", init_image=image, strength=strength, **SMALL)


def test_missing_component_is_named(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m", ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ZImageKitError, match="missing the vae/ component"):
        ZImagePipeline.from_pretrained(tmp_path / "m")


def test_a_tokenizer_without_its_vocabulary_is_refused(tiny_model_dir, tmp_path):
    """Without tokenizer.json, transformers loads a tokenizer that encodes every prompt as
    nothing (two prompts would give the same image); loading refuses it by name."""
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ZImageKitError, match="the tokenizer has no vocabulary") as error:
        ZImagePipeline.from_pretrained(tmp_path / "m")
    assert "\n" not in str(error.value)


def test_truncated_vae_weights_are_named(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    weights = tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ZImageKitError, match=r"vae/diffusion_pytorch_model.safetensors: .*truncated") as error:
        ZImagePipeline.from_pretrained(tmp_path / "m")
    assert "\n" not in str(error.value)


def test_components_from_different_models_are_refused(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config_path = tmp_path / "m" / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "cap_feat_dim": 2560}))
    with pytest.raises(ZImageKitError, match="text_encoder hidden_size 16 != transformer cap_feat_dim 2560"):
        ZImagePipeline.from_pretrained(tmp_path / "m")


def test_folder_defaults_survive_save_and_diffusers_still_loads_the_folder(zimage_pipe, tmp_path):
    import json

    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    from zimagekit.pipeline import ZImagePipeline
    from zimagekit.shipped import TURBO_DEFAULTS

    zimage_pipe.defaults = {**TURBO_DEFAULTS, "num_inference_steps": 30, "guidance_scale": 3.0}
    try:
        zimage_pipe.save_pretrained(tmp_path)
    finally:
        zimage_pipe.defaults = dict(TURBO_DEFAULTS)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_zimagekit_defaults"] == {"num_inference_steps": 30, "guidance_scale": 3.0}
    assert ZImagePipeline.from_pretrained(tmp_path).defaults["num_inference_steps"] == 30
    DiffusersZImagePipeline.from_pretrained(tmp_path)  # diffusers ignores the underscore key


def test_stochastic_sampling_matches_diffusers(tiny_model_dir, tmp_path):
    """scheduler_config stochastic_sampling: x̂0 re-noised with fresh noise each step (how
    DMD students sample). diffusers draws that noise from the global RNG (its pipeline does not
    pass the generator to the scheduler), so a seed does not reproduce its image; ours draws
    from the image's generator. To compare, diffusers gets our initial noise and a global RNG
    in the state our generator has after drawing it."""
    import json
    import shutil

    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    from zimagekit.pipeline import ZImagePipeline

    folder = tmp_path / "stochastic"
    shutil.copytree(tiny_model_dir, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "stochastic_sampling": True}))
    ref = DiffusersZImagePipeline.from_pretrained(folder, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(height=64, width=96, num_inference_steps=3, guidance_scale=0.0, output_type="pt")
    g = torch.Generator().manual_seed(5)
    initial = torch.randn(1, 16, 8, 12, generator=g)
    torch.set_rng_state(g.get_state())
    expected = ref(prompt="a cat", latents=initial, **kwargs).images
    ours = ZImagePipeline.from_pretrained(folder)
    got = ours("a cat", generator=torch.Generator().manual_seed(5), progress=False, **kwargs)
    deterministic = ZImagePipeline.from_pretrained(tiny_model_dir)("a cat", seed=5, progress=False, **kwargs)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - deterministic).abs().max() > 1e-3  # it really sampled differently


def test_the_sampling_loop_never_waits_for_the_device(zimage_pipe):
    """Every read of a tensor's value by the host waits for the device (a sync on a GPU).
    Once a layout has been seen, a call with 6 steps reads exactly as many values in
    zimagekit's code as a call with 2: none inside the loop."""
    import sys

    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__bool__", "__int__")}

    def counting(name):
        def read(self, *a, **k):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("zimagekit"):
                reads.append(name)
            return originals[name](self, *a, **k)
        return read

    def count(steps: int) -> int:
        reads.clear()
        zimage_pipe("a red circle", height=64, width=96, num_inference_steps=steps, guidance_scale=2.0, seed=0,
                    output_type="latent", progress=False)
        return len(reads)

    count(2)  # the first call of a layout fills the RoPE and mask caches
    with pytest.MonkeyPatch.context() as mp:
        for name in originals:
            mp.setattr(torch.Tensor, name, counting(name))
        assert count(6) == count(2)


def test_regionally_compiled_blocks_give_the_eager_images(zimage_pipe, tiny_model_dir):
    """compile_repeated_blocks (here with the aot_eager backend: dynamo's capture of every block
    without inductor's minutes of code generation on this CPU) changes no image."""
    compiled = ZImagePipeline.from_pretrained(tiny_model_dir, dtype="fp32", device="cpu")
    compiled.transformer.compile_repeated_blocks(backend="aot_eager")
    blocks = compiled.transformer.repeated_blocks()
    assert len(blocks) == 2 * compiled.transformer.config.n_refiner_layers + compiled.transformer.config.n_layers
    assert all(b._compiled_call_impl is not None for b in blocks)
    for guidance in (0.0, 2.0):
        kwargs = dict(height=64, width=96, num_inference_steps=2, guidance_scale=guidance, seed=3, output_type="pt",
                      progress=False)
        torch.testing.assert_close(compiled("a red circle", **kwargs), zimage_pipe("a red circle", **kwargs),
                                   rtol=0, atol=1e-6)
