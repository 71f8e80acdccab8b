"""``zimagekit generate``: images equal diffusers' at the same settings, PNG metadata, output
naming, and a one-line error with exit status 2 (no traceback, no file) for each bad input."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zimagekit.cli import main
from zimagekit.errors import ZImageKitError

SIZE = ["-W", "96", "-H", "64", "--steps", "3"]


def run(argv, capsys):
    """Run the CLI in-process; returns (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: --help, bad flags
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def generate(model, *argv):
    return ["generate", "--model", model, "--dtype", "fp32", "--device", "cpu", "--no-progress", *SIZE, *argv]


def reference_pil(pipe, seed, **kwargs):
    kwargs = copy.deepcopy(kwargs)
    images = pipe(**kwargs, height=64, width=96, num_inference_steps=3, generator=torch.Generator().manual_seed(seed))
    return images.images


def assert_same_pixels(path, expected):
    got = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    assert np.abs(got - np.asarray(expected, dtype=int)).max() <= 1  # fp32 rounding to uint8


def assert_one_line_error(status, err, *fragments):
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


# -- images and metadata -----------------------------------------------------------------------


def test_generate_writes_the_reference_image_with_metadata(tiny_model_dir, reference_pipe, tmp_path, capsys):
    out = tmp_path / "cat.png"
    status, stdout, _ = run(
        generate(tiny_model_dir, "a photo of a cat", "-n", "blurry", "--cfg-scale", "2", "-s", "9", "-o", out), capsys
    )
    assert status == 0 and "seed: 9" in stdout and f"saved {out}" in stdout
    expected = reference_pil(reference_pipe, 9, prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=2.0)
    assert_same_pixels(out, expected[0])

    text = Image.open(out).text
    assert text["parameters"].splitlines()[:2] == ["a photo of a cat", "Negative prompt: blurry"]
    fields = dict(item.split(": ", 1) for item in text["parameters"].splitlines()[2].split(", "))
    assert fields["Steps"] == "3" and fields["CFG scale"] == "2" and fields["Seed"] == "9"
    assert fields["Size"] == "96x64" and fields["Model"] == tiny_model_dir.name and fields["Sampler"] == "Euler"
    params = json.loads(text["zimagekit"])
    assert params["prompt"] == "a photo of a cat" and params["seed"] == 9 and params["width"] == 96


def test_compile_flag_compiles_every_block_and_changes_no_pixel(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from zimagekit.s3dit import S3DiT

    compiled = []
    original = S3DiT.compile_repeated_blocks

    def aot_eager(self, **kwargs):  # inductor's code generation takes minutes on this CPU
        compiled.append(self)
        original(self, backend="aot_eager")

    monkeypatch.setattr(S3DiT, "compile_repeated_blocks", aot_eager)
    for name, flags in (("eager.png", ()), ("compiled.png", ("--compile",))):
        assert run(generate(tiny_model_dir, "a cat", "-s", "2", "--dtype", "fp32", "-o", tmp_path / name, *flags),
                   capsys)[0] == 0
    assert len(compiled) == 1
    assert np.array_equal(np.asarray(Image.open(tmp_path / "eager.png")), np.asarray(Image.open(tmp_path / "compiled.png")))


def test_vae_tiling_flag_decodes_as_diffusers_tiled_vae(tiny_model_dir, reference_pipe, tmp_path, capsys):
    out = tmp_path / "tiled.png"
    assert run(generate(tiny_model_dir, "a cat", "-s", "5", "-W", "128", "-H", "96", "--vae-tiling", "-o", out),
               capsys)[0] == 0
    vae = reference_pipe.vae
    vae.enable_tiling()  # tiles of the tiny VAE's 64 px sample_size: 2 x 2 tiles here
    try:
        expected = reference_pipe(prompt="a cat", guidance_scale=0.0, height=96, width=128, num_inference_steps=3,
                                  generator=torch.Generator().manual_seed(5)).images[0]
    finally:
        vae.disable_tiling()
    assert_same_pixels(out, expected)


def test_several_images_follow_the_pattern_and_use_consecutive_seeds(tiny_model_dir, reference_pipe, tmp_path, capsys):
    status, _, _ = run(
        generate(tiny_model_dir, "-p", "a dog", "--num-images", "2", "-s", "4", "-o", tmp_path / "dog_%03d.png"), capsys
    )
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog_000.png", "dog_001.png"]
    assert_same_pixels(
        tmp_path / "dog_001.png", reference_pil(reference_pipe, 5, prompt="a dog", guidance_scale=0.0)[0]
    )
    assert json.loads(Image.open(tmp_path / "dog_001.png").text["zimagekit"])["seed"] == 5


def test_prompt_file_gives_one_image_per_line_and_no_metadata_turns_it_off(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n", encoding="utf-8")
    status, _, _ = run(
        generate(tiny_model_dir, "--prompt-file", prompts, "-o", tmp_path / "out.png", "--no-metadata"), capsys
    )
    assert status == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["out_000.png", "out_001.png"]
    assert "parameters" not in Image.open(tmp_path / "out_001.png").info


def test_a_prompt_file_is_generated_in_batches_each_image_as_diffusers_draws_it_alone(
        tiny_model_dir, reference_pipe, tmp_path, capsys, monkeypatch):
    """3 prompts x 2 images in batches of 4: two pipeline calls, and every image equals diffusers'
    single-image output for its prompt and seed (seed + k for image k)."""
    from zimagekit.pipeline import ZImagePipeline

    calls = []
    call = ZImagePipeline.__call__
    monkeypatch.setattr(ZImagePipeline, "__call__", lambda self, *a, **k: calls.append(len(k["generator"])) or
                        call(self, *a, **k))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na red fox\n", encoding="utf-8")
    status, _, err = run(generate(tiny_model_dir, "--prompt-file", prompts, "-b", "2", "-s", "7", "--batch-size", "4",
                                  "-o", tmp_path / "o_%d.png"), capsys)
    assert status == 0, err
    assert calls == [4, 2]
    for k, prompt in enumerate(["a cat", "a cat", "a dog", "a dog", "a red fox", "a red fox"]):
        assert_same_pixels(tmp_path / f"o_{k}.png", reference_pil(reference_pipe, 7 + k, prompt=prompt,
                                                                  guidance_scale=0.0)[0])
    assert run(generate(tiny_model_dir, "a cat", "--batch-size", "0"), capsys)[0] == 2


def test_negative_seed_picks_one_prints_it_and_records_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r.png"
    status, stdout, _ = run(generate(tiny_model_dir, "a cat", "-s", "-1", "-o", out), capsys)
    seed = int(stdout.split("seed: ")[1].split()[0])
    assert status == 0 and seed >= 0
    assert json.loads(Image.open(out).text["zimagekit"])["seed"] == seed


def test_init_image_runs_img2img_like_the_reference(tiny_model_dir, tmp_path, capsys):
    from diffusers import ZImageImg2ImgPipeline

    source = Image.fromarray((np.random.RandomState(1).rand(64, 96, 3) * 255).astype(np.uint8))
    source.save(tmp_path / "in.png")
    out = tmp_path / "i2i.png"
    status, _, _ = run(
        generate(tiny_model_dir, "a cat", "--init-image", tmp_path / "in.png", "--strength", "0.6", "-o", out), capsys
    )
    assert status == 0
    reference = ZImageImg2ImgPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        prompt="a cat", image=source, strength=0.6, num_inference_steps=3, guidance_scale=0.0,
        generator=torch.Generator().manual_seed(42),
    ).images  # fmt: skip
    assert_same_pixels(out, expected[0])
    assert "Denoising strength: 0.6" in Image.open(out).text["parameters"]


def test_mask_inpaints_like_the_reference_and_a_wrong_mask_writes_nothing(tiny_model_dir, tmp_path, capsys):
    from diffusers import ZImageInpaintPipeline

    source = Image.fromarray((np.random.RandomState(1).rand(64, 96, 3) * 255).astype(np.uint8))
    source.save(tmp_path / "in.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 40:88] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "inpaint.png"
    status, _, err = run(generate(tiny_model_dir, "a cat", "-i", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                                  "-o", out), capsys)
    assert status == 0, err
    reference = ZImageInpaintPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    expected = reference(prompt="a cat", image=source, mask_image=Image.fromarray(mask), num_inference_steps=3,
                         guidance_scale=0.0, generator=torch.Generator().manual_seed(42)).images  # strength 1.0
    assert_same_pixels(out, expected[0])
    assert "Denoising strength: 1, Mask: mask.png" in Image.open(out).text["parameters"]
    capsys.readouterr()  # diffusers' loading bars

    Image.fromarray(mask[:, :48]).save(tmp_path / "small.png")
    bad = tmp_path / "bad.png"
    status, _, err = run(generate(tiny_model_dir, "a cat", "-i", tmp_path / "in.png", "--mask", tmp_path / "small.png",
                                  "-o", bad), capsys)
    assert_one_line_error(status, err, "the mask", "is 48x64 but the init image is 96x64")
    status, _, err = run(generate(tiny_model_dir, "a cat", "--mask", tmp_path / "mask.png", "-o", bad), capsys)
    assert_one_line_error(status, err, "--mask needs --init-image")
    assert not bad.exists()


def test_metadata_keeps_non_latin_prompts_and_quotes_separators(tmp_path):
    from zimagekit.pngmeta import GenerationInfo, png_info

    info = GenerationInfo("一只猫, 水彩", "", 8, 0.0, 1, 64, 64, "Z-Image-Turbo, bf16")
    Image.new("RGB", (8, 8)).save(tmp_path / "m.png", pnginfo=png_info(info))
    text = Image.open(tmp_path / "m.png").text
    assert text["parameters"].splitlines()[0] == "一只猫, 水彩"
    assert 'Model: "Z-Image-Turbo, bf16"' in text["parameters"]  # A1111 quotes values with commas
    assert json.loads(text["zimagekit"])["prompt"] == "一只猫, 水彩"


def test_help_explains_every_flag(capsys):
    status, stdout, _ = run(["generate", "--help"], capsys)
    assert status == 0
    for flag in [
        "-p TEXT, --prompt TEXT", "-n TEXT, --negative-prompt TEXT", "-o FILE, --output FILE", "-W PX", "-H PX",
        "-s N, --seed N", "--steps",
        "--cfg-scale", "--guidance-scale", "--num-images", "--prompt-file", "--model", "--dtype", "--device",
        "--init-image", "--mask", "--strength", "--offload", "--no-metadata", "--cfg-normalization",
        "--cfg-truncation", "--controlnet", "--control-image", "--control-scale", "--transformer", "--fp8",
    ]:  # fmt: skip
        assert flag in stdout, flag


def test_help_states_the_default_models_own_defaults(capsys, monkeypatch):
    """The shipped student records 64x64 and 8 steps; the teacher 50 steps with w = 3 (read from
    each folder's model_index.json), not Turbo's 1024x1024."""
    monkeypatch.delenv("ZIMAGEKIT_MODEL", raising=False)
    stdout = " ".join(run(["generate", "--help"], capsys)[1].split())
    assert "the default model, shapes-turbo, uses 8 steps, guidance 0, 64x64" in stdout
    assert "(default: the model's, 64 for shapes-turbo; or the init image's)" in stdout
    from zimagekit.shipped import SHIPPED_MODELS

    monkeypatch.setenv("ZIMAGEKIT_MODEL", str(SHIPPED_MODELS / "shapes-teacher"))
    stdout = " ".join(run(["generate", "--help"], capsys)[1].split())
    assert "shapes-teacher, uses 50 steps, guidance 3, 64x64" in stdout
    assert "(default: the model folder's, 3 for shapes-teacher; else 0)" in stdout


def test_a_size_other_than_the_recorded_one_is_allowed_with_a_note(tmp_path, capsys):
    from zimagekit.shipped import SHIPPED_MODELS

    out = tmp_path / "big.png"
    status, stdout, _ = run(["generate", "a red circle", "--model", SHIPPED_MODELS / "shapes-turbo", "-W", "96",
                             "--no-progress", "-o", out], capsys)
    assert status == 0 and Image.open(out).size == (96, 64)
    assert "note: shapes-turbo was trained at 64x64; at 96x64 expect worse images" in stdout
    status, stdout, _ = run(["generate", "a red circle", "--model", SHIPPED_MODELS / "shapes-turbo", "--no-progress",
                             "-o", out], capsys)
    assert status == 0 and "note:" not in stdout


# -- bad input: one line, status 2, no file ----------------------------------------------------


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["-W", "1000"], ["width 1000 is not a multiple of 16", "992 or 1008"]),
        (["-H", "70"], ["height 70 is not a multiple of 16", "64 or 80"]),
        (["--steps", "0"], ["--steps must be at least 1"]),
        (["--dtype", "int8"], ["unknown dtype 'int8'"]),
        (["--device", "gpu9"], ["unknown device 'gpu9'"]),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["is not available"]),
        (["--strength", "0.5"], ["--strength needs --init-image"]),
        (["--steps", "three"], ["invalid int value"]),
        (["-W", "0"], ["--width must be a positive number of pixels, got 0"]),
        (["--cfg-scale", "nan"], ["--cfg-scale must be a finite number, got nan"]),
        (["--cfg-truncation", "inf"], ["--cfg-truncation must be a finite number"]),
        (["-s", str(2**64 - 1), "-b", "2"], ["--seed 18446744073709551615 is too large", "seed + 1"]),
    ],
)
def test_bad_flags(tiny_model_dir, tmp_path, capsys, extra, fragments):
    out = tmp_path / "x.png"
    status, _, err = run(generate(tiny_model_dir, "a cat", "-o", out, *extra), capsys)
    assert_one_line_error(status, err, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("strength", ["0", "1.5", "-0.2"])
def test_strength_outside_0_1(tiny_model_dir, tmp_path, capsys, strength):
    Image.new("RGB", (96, 64)).save(tmp_path / "in.png")
    status, _, err = run(
        generate(
            tiny_model_dir,
            "a cat",
            "--init-image",
            tmp_path / "in.png",
            "--strength",
            strength,
            "-o",
            tmp_path / "x.png",
        ),
        capsys,
    )
    assert_one_line_error(status, err, "--strength must be in (0, 1]")


def test_a_prompt_file_with_a_prompt_too_long_for_the_model_writes_nothing(tiny_model_dir, tmp_path, capsys):
    """The tiny model's caption axis (axes_lens[0] = 256) places at most 224 padded caption
    tokens; the second line is far longer, so no image is drawn, not even the first."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n" + "a very long prompt " * 100 + "\n", encoding="utf-8")
    status, _, err = run(generate(tiny_model_dir, "--prompt-file", prompts, "-o", tmp_path / "o.png"), capsys)
    assert_one_line_error(status, err, "prompt 2 of 2", "tokens with the chat template", "at most 224")
    assert not list(tmp_path.glob("*.png"))


def test_a_batch_that_fails_midway_names_the_images_it_wrote(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import zimagekit.cli.generate as cli

    save = cli._save_image

    def save_once(image, path, metadata):
        if path.name.endswith("001.png"):
            raise ZImageKitError(f"cannot write {path}: disk full")
        save(image, path, metadata)

    monkeypatch.setattr(cli, "_save_image", save_once)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    status, _, err = run(generate(tiny_model_dir, "--prompt-file", prompts, "-o", tmp_path / "o.png"), capsys)
    assert status == 2
    assert err.splitlines() == [f"stopped after writing 1 of 2 images: {tmp_path / 'o_000.png'}",
                                f"error: cannot write {tmp_path / 'o_001.png'}: disk full"]


def test_empty_prompt_file(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n  \n", encoding="utf-8")
    status, _, err = run(generate(tiny_model_dir, "--prompt-file", tmp_path / "p.txt"), capsys)
    assert_one_line_error(status, err, "has no prompts")


def test_no_prompt_at_all(tiny_model_dir, capsys):
    status, _, err = run(generate(tiny_model_dir), capsys)
    assert_one_line_error(status, err, "no prompt")


def test_model_folder_missing(tmp_path, capsys):
    status, _, err = run(generate(tmp_path / "nowhere", "a cat", "-o", tmp_path / "x.png"), capsys)
    assert_one_line_error(status, err, "does not exist")


def test_model_folder_missing_a_component(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name != "text_encoder":
            (model / item.name).symlink_to(item)
    status, _, err = run(generate(model, "a cat", "-o", tmp_path / "x.png"), capsys)
    assert_one_line_error(status, err, "missing the text_encoder/ component")
    assert not (tmp_path / "x.png").exists()


def model_with_damaged(tiny_model_dir, tmp_path, component, damage):
    """A copy of the tiny folder (links, except the damaged component's weights file)."""
    model = tmp_path / "model"
    model.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name == component:
            shutil.copytree(item, model / component)
        else:
            (model / item.name).symlink_to(item)
    weights = next((model / component).glob("*.safetensors"))
    weights.write_bytes(damage(weights.read_bytes()))
    return model


@pytest.mark.parametrize(
    "component,damage",
    [
        ("transformer", lambda data: b"\x00garbage" * 64),
        ("vae", lambda data: data[: len(data) // 2]),
        ("text_encoder", lambda data: data[:-1000]),
    ],
    ids=["corrupt transformer", "truncated vae", "truncated text encoder"],
)
def test_damaged_weights_name_the_component(tiny_model_dir, tmp_path, capsys, component, damage):
    model = model_with_damaged(tiny_model_dir, tmp_path, component, damage)
    out = tmp_path / "x.png"
    status, _, err = run(generate(model, "a cat", "-o", out), capsys)
    assert_one_line_error(status, err, component)
    assert not out.exists()


@pytest.mark.parametrize("component", ["vae", "text_encoder"])
def test_pickled_weights_are_never_loaded(tiny_model_dir, tmp_path, capsys, component, monkeypatch):
    """A component whose only weights are a pickle (.bin) is refused in one line, and
    torch.load is never called on it."""
    import torch
    from safetensors.torch import load_file

    model = model_with_damaged(tiny_model_dir, tmp_path, component, lambda data: data)
    weights = next((model / component).glob("*.safetensors"))
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    out = tmp_path / "x.png"
    status, _, err = run(generate(model, "a cat", "-o", out), capsys)
    assert_one_line_error(status, err, component)
    assert not loads and not out.exists()


@pytest.mark.parametrize("change,fragment", [({"shift": 0}, "shift must be > 0"), ({"shift": -3.0}, "shift must be > 0"),
                                             ({"shift": "3"}, "shift must be a number")])
def test_a_degenerate_scheduler_config_is_refused(tiny_model_dir, tmp_path, capsys, change, fragment):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    out = tmp_path / "x.png"
    status, _, err = run(generate(model, "a cat", "-o", out), capsys)
    assert_one_line_error(status, err, "scheduler_config.json", fragment)
    assert not out.exists()


def test_unwritable_output_path(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    status, _, err = run(generate(tiny_model_dir, "a cat", "-o", tmp_path / "afile" / "x.png"), capsys)
    assert_one_line_error(status, err, "cannot write to", "not an existing folder")
    status, _, err = run(generate(tiny_model_dir, "a cat", "-o", tmp_path / "x.gif"), capsys)
    assert_one_line_error(status, err, "must end in one of")


def test_a_failed_write_leaves_no_file(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    status, _, err = run(generate(tiny_model_dir, "a cat", "-o", tmp_path / "x.png"), capsys)
    assert_one_line_error(status, err, "cannot write", "disk full")
    assert list(tmp_path.iterdir()) == []


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    script = Path(sys.executable).with_name("zimagekit")
    result = subprocess.run(
        [str(script), "generate", "a cat", "--model", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_eval_subcommand_judges_a_folder_of_ground_truth_renders(tmp_path, capsys):
    from zimagekit.shapes.world import eval_prompts, render, scene_for_prompt

    rows = []
    for i, prompt in enumerate(eval_prompts()[::9]):
        name = f"img_{i:03d}.png"
        Image.fromarray(render(scene_for_prompt(prompt, i))).save(tmp_path / name)
        rows.append(json.dumps({"file_name": name, "prompt": prompt.text}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["shapes", "judge", str(tmp_path)]) == 0
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(results) == len(rows) and all(r["correct"] for r in results)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["shapes", "judge", "--help"])
    assert e.value.code == 0 and "usage: zimagekit shapes judge" in capsys.readouterr().out


def test_folder_defaults_set_steps_guidance_and_size(tiny_model_dir, reference_pipe, tmp_path, capsys):
    """A folder may record its own sampling defaults (model_index.json "_zimagekit_defaults",
    as the shipped shapes models do); without flags, generate uses them."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_zimagekit_defaults"] = {"num_inference_steps": 2, "guidance_scale": 1.5, "height": 32, "width": 48}
    (folder / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "d.png"
    argv = ["generate", "--model", folder, "--dtype", "fp32", "--device", "cpu", "--no-progress", "a cat", "-s", "4", "-o", out]
    status, _, err = run(argv, capsys)
    assert status == 0, err
    expected = reference_pipe(prompt="a cat", height=32, width=48, num_inference_steps=2, guidance_scale=1.5,
                              generator=torch.Generator().manual_seed(4)).images[0]
    assert_same_pixels(out, expected)
    fields = dict(item.split(": ", 1) for item in Image.open(out).text["parameters"].splitlines()[-1].split(", "))
    assert fields["Steps"] == "2" and fields["CFG scale"] == "1.5" and fields["Size"] == "48x32"


def test_lora_flag_merges_the_adapter_like_diffusers(tiny_model_dir, tmp_path, capsys):
    """generate --lora FILE:SCALE gives the image diffusers makes after load_lora_weights."""
    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    from zimagekit.lora import LoRA
    from zimagekit.s3dit import S3DiT

    model = S3DiT.from_pretrained(tiny_model_dir / "transformer")
    lora = LoRA.create(model, rank=2)
    with torch.no_grad():
        for p in lora.B.values():
            p.normal_(0, 0.5)
    lora.save(tmp_path / "style.safetensors")
    out = tmp_path / "lora.png"
    status, _, err = run(generate(tiny_model_dir, "a cat", "-s", "3", "-o", out,
                                  "--lora", f"{tmp_path / 'style.safetensors'}:0.5"), capsys)
    assert status == 0, err
    ref = DiffusersZImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(tmp_path / "style.safetensors"))
    ref.set_adapters(ref.get_active_adapters(), adapter_weights=0.5)
    assert_same_pixels(out, reference_pil(ref, 3, prompt="a cat", guidance_scale=0.0)[0])
    plain = ref.__class__.from_pretrained(tiny_model_dir, dtype=torch.float32)
    without = reference_pil(plain, 3, prompt="a cat", guidance_scale=0.0)[0]
    assert np.abs(np.asarray(without, dtype=int) - np.asarray(Image.open(out), dtype=int)).max() > 1  # it did change
    assert 'LoRA: "style:0.5"' in Image.open(out).text["parameters"]
    assert run(generate(tiny_model_dir, "a cat", "--lora", tmp_path / "missing.safetensors"), capsys)[0] == 2
    status, _, err = run(generate(tiny_model_dir, "a cat", "--lora", f"{tmp_path / 'style.safetensors'}:abc"), capsys)
    assert status == 2 and "the scale after the last ':' must be a number, got 'abc'" in err
    assert len(err.strip().splitlines()) == 1


def test_shapes_dispatches_each_stage_to_its_module(tmp_path, capsys):
    from transformers import AutoTokenizer

    assert main(["shapes", "text", "tokenizer", str(tmp_path / "tok")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.convert_ids_to_tokens(tok("a red circle")["input_ids"]) == ["a", "Ġred", "Ġcircle"]
    assert run(["shapes", "nope"], capsys)[0] == 2
