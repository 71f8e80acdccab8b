"""The shapes teacher's plumbing with tiny random encoders: cached data, training through the
trainer, export to a folder diffusers loads, and its evaluate/curve commands (the evaluation
itself is tested in test_shapes_evaluation.py)."""

import dataclasses

import pytest
import torch

from zimagekit.errors import ZImageKitError
from zimagekit.s3dit import S3DiTConfig
from zimagekit.shapes import teacher


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, qwen3_tokenizer):
    from diffusers import AutoencoderKL
    from pipeline_fixtures import TINY_QWEN3, TINY_VAE
    from transformers import Qwen3Config, Qwen3Model

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    Qwen3Model(Qwen3Config(**TINY_QWEN3)).save_pretrained(root / "text_encoder")
    qwen3_tokenizer.save_pretrained(root / "tokenizer")
    return teacher.SceneData(vae=str(root / "vae"), text_encoder=str(root / "text_encoder"),
                               tokenizer=str(root / "tokenizer"), scenes=24, cache_dir=str(root / "cache"))


def tiny_config(data, run_dir):
    cfg = teacher.TeacherConfig(
        model=S3DiTConfig(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                          axes_dims=(4, 6, 6), axes_lens=(256, 32, 32)),
        data=data, teacher=teacher.TeacherSection(steps=2, guidance_scale=1.0))
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir), name="teacher"),
        train=dataclasses.replace(cfg.train, steps=4, batch_size=4, ckpt_every=4, log_every=2, sample_every=4,
                                  progress=False),
        sample=dataclasses.replace(cfg.sample, prompts=["a red circle", "two blue squares"], seeds=[0, 1]))


def test_scene_cache_matches_a_fresh_encoding_and_is_reused(encoders):
    vae, text = teacher.load_encoders(encoders)
    first = teacher.encode_scenes(encoders, vae, text)
    assert first["latents"].shape == (24, 16, 8, 8)  # the tiny VAE downsamples 64 px by 8
    # An independent encoding of scene 5, straight from the world and the two encoders.
    from zimagekit.shapes import world

    scene = world.sample_scene(encoders.seed + 5)
    x = torch.from_numpy(world.render(scene)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    expected = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert torch.allclose(first["latents"][5], expected[0], atol=1e-5)
    feats = first["caption_features"].split(first["caption_lengths"].tolist())[int(first["caption_index"][5])]
    assert torch.allclose(feats, text.encode([scene.caption])[0], atol=1e-5)
    again = teacher.encode_scenes(encoders, vae, text)
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.fixture(scope="module")
def trained(encoders, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, and its export."""
    tmp_path = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(encoders, tmp_path)
    run_dir = teacher.train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ckpt_every=2)))
    out = tmp_path / "shapes-teacher"
    teacher.export(run_dir, out)
    return run_dir, out


def test_train_export_and_evaluate(trained, tmp_path):
    from diffusers import ZImagePipeline as DiffusersZImagePipeline
    from safetensors import safe_open

    from zimagekit.pipeline import ZImagePipeline

    run_dir, out = trained
    assert (run_dir / "samples" / "step_0000004.png").exists()
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # shipped at half the size
    ours = ZImagePipeline.from_pretrained(out)
    assert ours.defaults == {"num_inference_steps": 2, "guidance_scale": 1.0, "height": 64, "width": 64}
    DiffusersZImagePipeline.from_pretrained(out)  # the exported folder is a real Z-Image folder
    assert teacher.main(["evaluate", str(out), "--steps", "1", "--cfg-scale", "0", "--images-per-prompt", "1",
                         "--out", str(tmp_path / "eval")]) == 0
    assert len((tmp_path / "eval" / "results.jsonl").read_text().splitlines()) == 108
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"results.jsonl", "summary.txt", "metrics.json",
                                                              "grid.png"}


def test_no_scenes_is_a_one_line_error(tmp_path, capsys):
    assert teacher.main(["train", "data.scenes=0", f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: data.scenes must be >= 1 and data.seed >= 0, got 0 and 0"


def test_mismatched_caption_width_is_named(encoders, tmp_path):
    cfg = tiny_config(encoders, tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cap_feat_dim=32))
    with pytest.raises(ZImageKitError, match="model.cap_feat_dim=16"):
        teacher.train(cfg)


def test_curve_command_measures_every_kept_checkpoint(trained, tmp_path):
    import csv

    run_dir, out = trained
    assert teacher.main(["curve", str(run_dir), str(out), "--steps", "1", "--cfg-scale", "0",
                         "--images-per-prompt", "2", "--out", str(tmp_path)]) == 0
    with (tmp_path / "curves.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2, 4] and {r["run"] for r in rows} == {run_dir.name}
    for r in rows:
        cats = [float(r[c]) for c in teacher.world.CATEGORIES]
        assert float(r["overall"]) == pytest.approx(sum(cats) / len(cats))
        assert float(r["diversity"]) >= 0 and 0 <= float(r["std"]) <= 0.5
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_init_starts_a_run_from_an_exported_teacher(trained, encoders, tmp_path):
    from zimagekit.s3dit import S3DiT

    _, out = trained
    cfg = tiny_config(encoders, tmp_path)
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, init=str(out)))
    shipped = S3DiT.from_pretrained(out / "transformer").state_dict()
    started = teacher.build_transformer(cfg).state_dict()
    assert started.keys() == shipped.keys()
    assert all(torch.equal(started[k], shipped[k].float()) for k in shipped)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=64, axes_dims=(8, 12, 12)))
    with pytest.raises(ZImageKitError, match="teacher.init"):
        teacher.build_transformer(wider)


def test_dual_stream_run_trains_on_the_same_data_and_is_curved_not_exported(trained, encoders, tmp_path):
    from zimagekit.dual_stream import DualStreamDiT

    cfg = tiny_config(encoders, tmp_path)
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, architecture="dual_stream"),
                              train=dataclasses.replace(cfg.train, sample_every=0))
    assert isinstance(teacher.build_transformer(cfg), DualStreamDiT)
    run_dir = teacher.train(cfg)
    with pytest.raises(ZImageKitError, match="no Z-Image folder"):
        teacher.export(run_dir, tmp_path / "out")
    # Evaluated through the single-stream folder's encoders and schedule, beside the
    # single-stream run: two checkpoints of it, one of the dual-stream run.
    assert teacher.main(["streams", str(trained[0]), str(run_dir), "--model", str(trained[1]), "--steps", "1",
                         "--cfg-scale", "0", "--out", str(tmp_path / "streams")]) == 0
    table = (tmp_path / "streams" / "streams.md").read_text().splitlines()
    assert len(table) == 4 and "single_stream" in table[2] and "dual_stream" in table[3]
    assert (tmp_path / "streams" / "curves.csv").read_text().count("\n") == 4
    assert (tmp_path / "streams" / "accuracy_vs_flops.png").stat().st_size > 0


def test_training_flops_are_forward_plus_backward_of_the_closed_form_count(trained, encoders):
    from zimagekit.s3dit import forward_flops

    cfg = tiny_config(encoders, trained[0].parent)
    vae, text = teacher.load_encoders(encoders)
    encoded = teacher.encode_scenes(encoders, vae, text)
    measured = teacher.training_flops_per_sample(cfg, encoded, batch=4)
    batch = teacher.data_source(encoded, 4, 0).make_batch([0, 1, 2, 3])
    img = [encoded["latents"].shape[-1] * encoded["latents"].shape[-2] // 4] * 4
    forward = forward_flops(cfg.model, img, [len(c) for c in batch["captions"]]) / 4
    # A GEMM's backward is two GEMMs of its size (input and weight gradients), except that
    # no input gradient is taken for the embedders (latents, caption features, timestep
    # features need none): between 2.5 and 3 forwards even where, as here, embedders are
    # a large share of the work.
    assert 2.5 * forward < measured <= 3 * forward


def test_the_world_rendered_as_a_dataset_trains_a_teacher_through_zimagekit_train(tmp_path, tiny_model_dir):
    """render -> zimagekit train (from scratch, with a sample grid) -> train export: the shapes
    world as one dataset of the general path. The rendered files are the world's scenes, and
    the exported folder generates with diffusers."""
    import json

    import numpy as np
    import yaml
    from diffusers import ZImagePipeline as DiffusersZImagePipeline
    from PIL import Image

    from zimagekit.cli import train as train_cli
    from zimagekit.shapes import world

    data = tmp_path / "scenes"
    assert teacher.main(["render", str(data), "--scenes", "8", "--seed", "5"]) == 0
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    scene = world.sample_scene(5 + 7)
    assert rows[7]["text"] == scene.caption
    assert np.array_equal(np.asarray(Image.open(data / rows[7]["file_name"])), world.render(scene))
    assert teacher.main(["render", str(tmp_path / "none"), "--scenes", "0"]) == 2

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "pretrained": str(tiny_model_dir), "init": "scratch",
        "model": {"dim": 32, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 16,
                  "axes_dims": [4, 6, 6], "axes_lens": [256, 32, 32]},
        "run": {"dir": str(tmp_path / "runs"), "name": "t"},
        "data": {"path": str(data), "resolution": 64, "max_aspect": 1.0, "max_sequence_length": 64,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "sample_every": 2, "progress": False},
        "sample": {"prompts": ["a red circle"], "seeds": [0, 1]},
    }))
    assert train_cli.main(["--config", str(config)]) == 0
    grid = Image.open(tmp_path / "runs" / "t" / "samples" / "step_0000002.png")
    assert grid.size == (2 * 64, 64)  # one row of two seeds, at the training resolution
    out = tmp_path / "exported"
    assert train_cli.main(["export", str(tmp_path / "runs" / "t"), str(out)]) == 0
    pipe = DiffusersZImagePipeline.from_pretrained(out, dtype=torch.float32)
    assert pipe.transformer.config.dim == 32
    image = pipe("a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
