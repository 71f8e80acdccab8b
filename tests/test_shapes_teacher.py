"""The shapes teacher as a dataset and config of the general ``zimagekit train``, with tiny
random encoders: the scene dataset in the latent cache, training, export to a folder
diffusers loads, the dual-stream counterfactual, and the evaluate/curve/streams commands
(the evaluation itself is tested in test_shapes_evaluation.py)."""

import dataclasses

import numpy as np
import pytest
import torch

from zimagekit import image_training
from zimagekit.cli import train as train_cli
from zimagekit.errors import ZImageKitError
from zimagekit.s3dit import S3DiTConfig
from zimagekit.shapes import teacher, world

TINY = S3DiTConfig(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                   axes_dims=(4, 6, 6), axes_lens=(256, 32, 32))


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A VAE and a text encoder that are not the tiny folder's: the components a config swaps
    in (the VAE's folder; the text encoder sits beside it)."""
    from diffusers import AutoencoderKL
    from pipeline_fixtures import TINY_QWEN3, TINY_VAE
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(7)
    root = tmp_path_factory.mktemp("components")
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    Qwen3Model(Qwen3Config(**TINY_QWEN3)).save_pretrained(root / "text_encoder")
    return root / "vae"


def tiny_config(model_dir, vae_dir, root, **changes) -> image_training.ZImageTrainConfig:
    cfg = image_training.ZImageTrainConfig(
        pretrained=str(model_dir), init="scratch", model=TINY,
        components=image_training.ComponentsSection(vae=str(vae_dir), text_encoder=str(vae_dir.parent / "text_encoder")),
        data=image_training.DataSection(path="zimagekit.shapes.teacher:scenes", count=24, resolution=64, max_aspect=1.0,
                                        max_sequence_length=64, cache_dir=str(root / "cache"), preload=True))
    cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, dir=str(root / "runs"), name="teacher"),
        train=dataclasses.replace(cfg.train, steps=4, batch_size=4, ckpt_every=2, log_every=2, sample_every=4,
                                  progress=False),
        sample=dataclasses.replace(cfg.sample, prompts=["a red circle", "two blue squares"], seeds=[0, 1]))
    return dataclasses.replace(cfg, **changes)


def test_the_scene_cache_holds_the_encoders_outputs_once_per_caption_and_is_reused(tiny_model_dir, other_vae,
                                                                                  tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    from zimagekit.latent_cache import LatentCache
    from zimagekit.text_encoder import Qwen3TextEncoder

    cfg = tiny_config(tiny_model_dir, other_vae, tmp_path)
    folder = image_training.open_folder(cfg)
    cache = image_training.encoded_data(cfg, folder, "cpu")
    assert len(cache) == 24 and cache.skipped == 0
    # An independent encoding of scene 5, straight from the world and the two encoders (those
    # the config swapped in, not the folder's).
    scene = world.sample_scene(teacher.TEACHER_SCENES + 5)
    vae = AutoencoderKL.from_pretrained(other_vae)
    text = Qwen3TextEncoder.from_pretrained(other_vae.parent / "text_encoder", tiny_model_dir / "tokenizer")
    x = torch.from_numpy(world.render(scene)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    latent, features = cache[5]
    assert torch.allclose(latent, z[0].unsqueeze(1), atol=1e-4)  # batched convolutions round differently
    assert torch.allclose(features, text.encode([scene.caption], 64)[0], atol=1e-5)
    # Each distinct caption is stored once.
    captions = [world.sample_scene(teacher.TEACHER_SCENES + i).caption for i in range(24)]
    stored = [k for f in cache.folder.glob("captions-*.safetensors")
              for k in safe_open(str(f), "pt").keys() if k != "captions.empty"]
    assert len(stored) == cache.distinct_captions == len(set(captions)) < 24
    # Preloaded batches are the files' items.
    cache.preload("cpu")
    got, lazy = cache.batch([3, 7, 5], "cpu"), LatentCache(cache.folder)
    assert torch.equal(got["latents"], torch.stack([lazy[i][0] for i in (3, 7, 5)]))
    assert all(torch.equal(a, lazy[i][1]) for a, i in zip(got["captions"], (3, 7, 5)))
    # Reused: neither the dataset nor the encoders are touched again.
    monkeypatch.setattr(teacher, "render_scenes", lambda *a: pytest.fail("the scenes were drawn again"))
    monkeypatch.setattr(image_training, "_load_encoders", lambda *a: pytest.fail("the encoders were loaded again"))
    assert image_training.encoded_data(cfg, folder, "cpu").folder == cache.folder


@pytest.fixture(scope="module")
def trained(tiny_model_dir, other_vae, tmp_path_factory):
    """A 4-step run through `zimagekit shapes teacher train` (checkpoints at 2 and 4) and its export."""
    import yaml

    from zimagekit.runconfig import config_to_dict

    root = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(tiny_model_dir, other_vae, root)
    config = root / "teacher.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert teacher.main(["train", "--config", str(config)]) == 0
    out = root / "shapes-teacher"
    assert teacher.main(["export", str(root / "runs" / "teacher"), str(out)]) == 0
    return root / "runs" / "teacher", out, cfg


def test_train_export_and_evaluate(trained, tiny_model_dir, other_vae, tmp_path):
    from diffusers import ZImagePipeline as DiffusersZImagePipeline
    from safetensors import safe_open

    run_dir, out, _ = trained
    assert (run_dir / "samples" / "step_0000004.png").exists()
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # shipped at half the size
    for name in ("vae", "text_encoder"):  # the swapped-in components ship, byte for byte
        for f in (other_vae.parent / name).iterdir():
            assert (out / name / f.name).read_bytes() == f.read_bytes()
    assert (out / "model_index.json").read_bytes() == (tiny_model_dir / "model_index.json").read_bytes()
    pipe = DiffusersZImagePipeline.from_pretrained(out, dtype=torch.float32)  # a real Z-Image folder
    image = pipe("a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert teacher.main(["evaluate", str(out), "--steps", "1", "--cfg-scale", "0", "--images-per-prompt", "1",
                         "--out", str(tmp_path / "eval")]) == 0
    assert len((tmp_path / "eval" / "results.jsonl").read_text().splitlines()) == 108
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"results.jsonl", "summary.txt", "metrics.json",
                                                              "grid.png"}


def test_bad_scene_data_and_widths_are_one_line_errors(tiny_model_dir, other_vae, tmp_path, capsys):
    assert train_cli.main(["--config", "configs/shapes/teacher.yaml", "data.count=0", f"run.dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == "error: config key 'data.count' must be >= 1 or null, got 0"
    cfg = tiny_config(tiny_model_dir, other_vae, tmp_path, data=image_training.DataSection(
        path="zimagekit.shapes.teacher:scenes", resolution=64, cache_dir=str(tmp_path)))
    with pytest.raises(ZImageKitError, match=r"makes its images: give their count \(data.count\)"):
        image_training.train(cfg)
    cfg = tiny_config(tiny_model_dir, other_vae, tmp_path, model=dataclasses.replace(TINY, cap_feat_dim=32))
    with pytest.raises(ZImageKitError, match="model.cap_feat_dim=16"):
        image_training.train(cfg)
    cfg = tiny_config(tiny_model_dir, other_vae, tmp_path)
    cfg = dataclasses.replace(cfg, components=dataclasses.replace(cfg.components, vae=str(tmp_path / "nowhere")))
    with pytest.raises(ZImageKitError, match="vae folder .*nowhere does not exist"):
        image_training.train(cfg)


def test_curve_command_measures_every_kept_checkpoint(trained, tmp_path):
    import csv

    run_dir, out, _ = trained
    assert teacher.main(["curve", str(run_dir), str(out), "--steps", "1", "--cfg-scale", "0",
                         "--images-per-prompt", "2", "--out", str(tmp_path)]) == 0
    with (tmp_path / "curves.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2, 4] and {r["run"] for r in rows} == {run_dir.name}
    for r in rows:
        cats = [float(r[c]) for c in world.CATEGORIES]
        assert float(r["overall"]) == pytest.approx(sum(cats) / len(cats))
        assert float(r["diversity"]) >= 0 and 0 <= float(r["std"]) <= 0.5
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_run_continues_an_exported_teacher(trained, tmp_path):
    """How the GPU lease continues the shipped teacher: pretrained = its folder, init: pretrained."""
    from zimagekit.s3dit import S3DiT

    _, out, cfg = trained
    cfg = dataclasses.replace(cfg, pretrained=str(out), init="pretrained",
                              components=image_training.ComponentsSection())
    shipped = S3DiT.from_pretrained(out / "transformer").state_dict()
    started = image_training.build_transformer(cfg, image_training.open_folder(cfg)).state_dict()
    assert started.keys() == shipped.keys()
    assert all(torch.equal(started[k], shipped[k].float()) for k in shipped)


def test_dual_stream_run_trains_on_the_same_data_and_is_curved_not_exported(trained, tmp_path):
    from zimagekit.dual_stream import DualStreamDiT

    _, out, cfg = trained
    cfg = dataclasses.replace(cfg, architecture="dual_stream",
                              run=dataclasses.replace(cfg.run, dir=str(tmp_path), name="dual"),
                              train=dataclasses.replace(cfg.train, sample_every=0))
    assert isinstance(image_training.build_transformer(cfg, image_training.open_folder(cfg)), DualStreamDiT)
    with pytest.raises(ZImageKitError, match="dual_stream has no pretrained weights"):
        image_training.build_transformer(dataclasses.replace(cfg, init="pretrained"), image_training.open_folder(cfg))
    run_dir = image_training.train(cfg)
    assert train_cli.main(["export", str(run_dir), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    # Evaluated through the single-stream folder's encoders and schedule, beside the
    # single-stream run: two checkpoints of it, two of the dual-stream run.
    assert teacher.main(["streams", str(trained[0]), str(run_dir), "--model", str(out), "--steps", "1",
                         "--cfg-scale", "0", "--out", str(tmp_path / "streams")]) == 0
    table = (tmp_path / "streams" / "streams.md").read_text().splitlines()
    assert len(table) == 4 and "single_stream" in table[2] and "dual_stream" in table[3]
    assert (tmp_path / "streams" / "curves.csv").read_text().count("\n") == 5
    assert (tmp_path / "streams" / "accuracy_vs_flops.png").stat().st_size > 0


def test_training_flops_are_forward_plus_backward_of_the_closed_form_count(trained):
    from zimagekit.s3dit import forward_flops

    cfg = trained[2]
    measured = teacher.training_flops_per_sample(cfg, batch=4)
    batch = image_training.encoded_data(cfg, image_training.open_folder(cfg), "cpu").batch([0, 1, 2, 3], "cpu")
    img = [cfg.model.image_tokens(*batch["latents"].shape[-2:])] * 4
    forward = forward_flops(cfg.model, img, [len(c) for c in batch["captions"]]) / 4
    # A GEMM's backward is two GEMMs of its size (input and weight gradients), except that
    # no input gradient is taken for the embedders (latents, caption features, timestep
    # features need none): between 2.5 and 3 forwards even where, as here, embedders are
    # a large share of the work.
    assert 2.5 * forward < measured <= 3 * forward


def test_render_writes_the_worlds_scenes_as_an_image_folder(tmp_path):
    import json

    from PIL import Image

    from zimagekit.datasets import open_dataset

    data = tmp_path / "scenes"
    assert teacher.main(["render", str(data), "--scenes", "8", "--seed", "5"]) == 0
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    scene = world.sample_scene(5 + 7)
    assert rows[7]["text"] == scene.caption
    assert np.array_equal(np.asarray(Image.open(data / rows[7]["file_name"])), world.render(scene))
    # The same scenes as the function source gives them.
    made = teacher.SceneDataset(8, seed=5)
    image, caption = made.load(7)
    assert caption == scene.caption and np.array_equal(np.asarray(image), world.render(scene))
    assert open_dataset(str(data), count=3).captions() == made.captions()[:3]
    assert teacher.main(["render", str(tmp_path / "none"), "--scenes", "0"]) == 2


@pytest.mark.parametrize("name", ["teacher", "teacher_gpu", "dual_stream"])
def test_the_shipped_teacher_configs_load_and_find_their_components(name):
    from pathlib import Path

    from zimagekit.runconfig import load_config

    cfg = load_config(image_training.ZImageTrainConfig, Path(__file__).parents[1] / "configs" / "shapes" / f"{name}.yaml")
    assert cfg.data.path == "zimagekit.shapes.teacher:scenes" and cfg.data.preload
    folder = image_training.open_folder(cfg)  # every component there, widths consistent
    model = image_training.build_transformer(cfg, folder)  # scratch: its widths fit the encoders
    assert sum(p.numel() for p in model.parameters()) > 10_000_000
