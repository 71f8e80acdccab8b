"""The shapes VAE: training through the trainer, export to a folder diffusers loads with
factors that standardise its latents, and the shipped model judged on reconstructions."""

from pathlib import Path

import numpy as np
import pytest
import torch

from zimagekit.errors import ZImageKitError
from zimagekit.runconfig import load_config
from zimagekit.shapes import vae as shapes_vae
from zimagekit.shapes import world
from zimagekit.shapes.judge import judge_image
from zimagekit.trainer import seed_everything

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shapes-vae"
TINY = ["vae.block_out_channels=[8, 16]", "vae.norm_num_groups=4", "vae.scenes=32", "vae.factor_scenes=24",
        "train.batch_size=4", "train.steps=8", "train.log_every=4", "train.ckpt_every=0", "train.progress=false",
        "train.precision=fp32", "optim.lr=3e-3", "optim.warmup_steps=0", "ema.decay=0.5"]


def tiny_config(tmp_path, *extra):
    return load_config(shapes_vae.VAEConfig, None, [f"run.dir={tmp_path}", "run.name=vae", *TINY, *extra])


def renders(seeds) -> np.ndarray:
    return np.stack([world.render(world.sample_layout(s)) for s in seeds])


def pixel_error(vae, images) -> float:
    return float(np.abs(shapes_vae.reconstruct(vae, images).astype(np.float64) - images).mean())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("runs"), "train.sample_every=8",
                      'sample.prompts=["a red circle", "two blue squares"]', "sample.seeds=[0, 1, 2]")
    return cfg, shapes_vae.train(cfg)


def test_training_data_are_the_world_renders_in_minus_one_to_one(tmp_path):
    cfg = tiny_config(tmp_path, "vae.data_seed=7")
    batch = shapes_vae.data_source(cfg.vae, cfg.train.batch_size).make_batch([3, 5])
    expected = renders([10, 12]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    assert batch.dtype == torch.float32 and torch.equal(batch, torch.from_numpy(expected))


def test_a_few_training_steps_lower_the_reconstruction_error(tiny_run):
    cfg, run_dir = tiny_run
    seed_everything(cfg.run.seed)  # the initialisation train() starts from
    untrained = shapes_vae.build_vae(cfg.vae).eval()
    _, trained = shapes_vae.load_run(run_dir, use_ema=False)
    images = renders(range(cfg.vae.data_seed, cfg.vae.data_seed + 8))
    assert pixel_error(trained, images) < 0.5 * pixel_error(untrained, images)


def test_sample_grid_pairs_each_render_with_its_reconstruction(tiny_run):
    from PIL import Image

    _, run_dir = tiny_run
    with Image.open(run_dir / "samples" / "step_0000008.png") as grid:
        assert grid.size == (3 * 2 * world.CANVAS, 2 * world.CANVAS)  # 3 seeds x 2 prompts
        left = np.asarray(grid.convert("RGB"))[: world.CANVAS, : world.CANVAS]
    scene = world.scene_for_prompt(world.parse_prompt("a red circle"), 0, split="eval")
    assert np.array_equal(left, world.render(scene))


def test_latent_factors_standardise_a_fixed_batch():
    # Half the entries 0.25 - 2, half 0.25 + 2: mean 0.25 and population std 2 exactly.
    z = 0.25 + 2.0 * torch.tensor([-1.0, 1.0]).repeat(2 * 16 * 4 * 4 // 2).reshape(2, 16, 4, 4)
    shift, scale = shapes_vae.latent_factors(z)
    assert shift == pytest.approx(0.25, abs=1e-12) and scale == pytest.approx(0.5, abs=1e-12)


def test_export_writes_a_diffusers_folder_with_factors_of_its_latents(tiny_run, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    cfg, run_dir = tiny_run
    out = tmp_path / "vae"
    assert shapes_vae.main(["export", str(run_dir), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    vae = AutoencoderKL.from_pretrained(out, dtype=torch.float32)
    assert vae.config.latent_channels == 16
    assert not vae.config.use_quant_conv and not vae.config.use_post_quant_conv
    # Closed form on the factor scenes, encoded by the loaded model itself.
    images = renders(range(cfg.vae.data_seed, cfg.vae.data_seed + cfg.vae.factor_scenes))
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
    z = z.double().numpy()
    assert vae.config.shift_factor == pytest.approx(z.mean(), rel=1e-4, abs=1e-6)
    assert vae.config.scaling_factor == pytest.approx(1 / z.std(), rel=1e-4)


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ZImageKitError, match="norm_num_groups"):
        shapes_vae.build_vae(tiny_config(tmp_path, "vae.norm_num_groups=3").vae)
    with pytest.raises(ZImageKitError, match="at most 6"):
        tiny_config(tmp_path, "vae.block_out_channels=[8, 8, 8, 8, 8, 8, 8, 8]")
    assert shapes_vae.main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_shipped_vae_reconstructions_pass_the_judge():
    from diffusers import AutoencoderKL

    assert (SHIPPED / "config.json").is_file(), f"{SHIPPED} is missing; export it (see zimagekit.shapes.vae)"
    vae = AutoencoderKL.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    assert vae.config.latent_channels == 16 and not vae.config.use_quant_conv
    # Two prompts per category, held-out colour/shape combinations among them.
    prompts = world.eval_prompts()[:: world.EVAL_PER_CATEGORY // 2]
    rng = np.random.default_rng(1234)
    scenes = [world.scene_for_prompt(p, rng, split="eval") for p in prompts]
    recons = shapes_vae.reconstruct(vae, np.stack([world.render(s) for s in scenes]))
    failures = [(s.caption, j.reason) for s, im in zip(scenes, recons) if not (j := judge_image(im, s.prompt)).correct]
    assert not failures
