"""``zimagekit train`` on one process: the encoder cache, LoRA, the curriculum phases and the
memory levers, each checked against an independent computation."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from zimagekit import image_training as train
from zimagekit import parallel
from zimagekit.cli import train as train_cli
from zimagekit.datasets import ImageCaptionDataset, make_buckets
from zimagekit.enhancer import PromptEnhancer, load_enhancer

SHAPES_ENHANCER = "zimagekit.shapes.enhancer:ShapesTemplateEnhancer"
from zimagekit.errors import ZImageKitError
from zimagekit.latent_cache import build_cache, cache_key
from zimagekit.s3dit import S3DiT, S3DiTConfig

CAPTIONS = ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle", "a purple square"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(CAPTIONS[i % 4])
    return data


def encoders(folder):
    from diffusers import AutoencoderKL

    from zimagekit.pipeline import load_text_encoder

    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    return vae, load_text_encoder(folder, torch.float32, "cpu")


def cache_of(dataset_dir, model_dir, cache_dir, enhancer=PromptEnhancer(), calls=None):
    dataset = ImageCaptionDataset.open(dataset_dir)
    buckets = make_buckets(32, 16)
    key = cache_key(dataset, [model_dir / n for n in ("vae", "text_encoder", "tokenizer")], buckets, 32, enhancer.name)

    def load():
        if calls is not None:
            calls.append(1)
        return encoders(model_dir)

    return build_cache(dataset, cache_dir, key, load, enhancer, buckets, 32, "cpu")


def test_the_cache_holds_the_encoders_outputs_and_is_reused_until_an_input_changes(tmp_path, dataset_dir,
                                                                                   tiny_model_dir):
    calls = []
    cache = cache_of(dataset_dir, tiny_model_dir, tmp_path, calls=calls)
    vae, text = encoders(tiny_model_dir)
    with torch.no_grad():  # the reference: the VAE posterior mean, scaled as the pipeline scales it
        pixels = torch.from_numpy(np.array(Image.open(dataset_dir / "3.png"))).permute(2, 0, 1)[None].float() / 127.5 - 1
        z = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        caption = text.encode([CAPTIONS[3]], 32)[0]
    latent, features = cache[3]
    assert torch.allclose(latent, z[0].unsqueeze(1), atol=1e-5) and torch.allclose(features, caption, atol=1e-5)
    assert torch.allclose(cache.empty_caption(), text.encode([""], 32)[0], atol=1e-5)
    assert len(cache) == 8 and cache.skipped == 0 and calls == [1]

    again = cache_of(dataset_dir, tiny_model_dir, tmp_path, calls=calls)
    assert calls == [1] and again.folder == cache.folder  # reused: the encoders were not even loaded
    enhanced = cache_of(dataset_dir, tiny_model_dir, tmp_path, load_enhancer(SHAPES_ENHANCER), calls)
    assert calls == [1, 1] and enhanced.folder != cache.folder
    assert torch.allclose(enhanced[0][1], text.encode(load_enhancer(SHAPES_ENHANCER)([CAPTIONS[0]]), 32)[0], atol=1e-5)


def test_unreadable_images_are_skipped_and_counted(tmp_path, dataset_dir, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    for f in dataset_dir.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    (data / "8.png").write_bytes(b"not a png")
    (data / "8.txt").write_text("a red circle")
    cache = cache_of(data, tiny_model_dir, tmp_path / "cache")
    assert len(cache) == 8 and cache.skipped == 1


def run_config(tmp_path, dataset_dir, model_dir, *lines):
    config = tmp_path / "train.yaml"
    config.write_text("\n".join([
        f"pretrained: {model_dir}",
        f"run: {{dir: {tmp_path / 'runs'}, name: r}}",
        f"data: {{path: {dataset_dir}, resolution: 32, cache_dir: {tmp_path / 'cache'}, max_sequence_length: 32}}",
        "train: {steps: 2, batch_size: 2, log_every: 1, progress: false}",
        "optim: {lr: 1.0e-3}",
        *lines]))
    return config


def test_lora_training_leaves_the_base_and_writes_adapters_that_load(tmp_path, dataset_dir, tiny_model_dir):
    from zimagekit.lora import LoRA

    config = run_config(tmp_path, dataset_dir, tiny_model_dir, "lora: {rank: 2}", "ema: {enabled: false}")
    assert train_cli.main(["--config", str(config)]) == 0
    run = tmp_path / "runs" / "r"
    ckpt = run / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == ["lora.safetensors", "optimizer_state.safetensors",
                                                                   "trainer_state.safetensors"]  # no base weights
    model = S3DiT.from_pretrained(tiny_model_dir / "transformer")
    saved = load_file(str(run / "lora.safetensors"))
    trained = LoRA.create(copy.deepcopy(model), rank=2)
    trained.load_state_dict(load_file(str(ckpt / "lora.safetensors")))
    assert all(torch.allclose(saved[k], v) for k, v in trained.diffusers_state_dict().items())
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())  # B moved off zero
    LoRA.load(model, run / "lora.safetensors")  # the file generate --lora reads


def test_export_of_a_lora_run_is_the_folder_diffusers_gets_by_fusing_the_adapters(tmp_path, dataset_dir,
                                                                                 tiny_model_dir):
    """train export merges a LoRA run's (EMA) adapters: the exported transformer is what diffusers
    builds with load_lora_weights + fuse_lora on the base folder, and every other component is
    the base folder's, byte for byte."""
    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    config = run_config(tmp_path, dataset_dir, tiny_model_dir, "lora: {rank: 2}", "ema: {decay: 0.5}")
    assert train_cli.main(["--config", str(config), "optim.lr=0.3"]) == 0  # big steps: a visible merge
    run, out = tmp_path / "runs" / "r", tmp_path / "exported"
    assert train_cli.main(["export", str(run), str(out)]) == 0
    ref = DiffusersZImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base = {k: v.clone() for k, v in ref.transformer.state_dict().items()}
    ref.load_lora_weights(str(run / "lora.safetensors"))
    ref.fuse_lora()
    ref.unload_lora_weights()
    fused = ref.transformer.state_dict()
    ours = DiffusersZImagePipeline.from_pretrained(out, dtype=torch.float32).transformer.state_dict()
    assert set(ours) == set(fused)
    for k in ours:  # stored in bf16
        torch.testing.assert_close(ours[k], fused[k].to(torch.bfloat16).float(), rtol=1e-2, atol=1e-3)
    assert max((fused[k] - base[k]).abs().max() for k in base) > 0.05  # the adapters did change the weights
    for f in tiny_model_dir.rglob("*"):
        if f.is_file() and f.relative_to(tiny_model_dir).parts[0] != "transformer":
            assert (out / f.relative_to(tiny_model_dir)).read_bytes() == f.read_bytes(), f
    assert train_cli.main(["export", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_phases_run_in_order_each_from_the_previous_phases_weights(tmp_path, dataset_dir, tiny_model_dir):
    """Phase 2 runs one step at a negligible learning rate, so it must end where phase 1 ended."""
    config = run_config(tmp_path, dataset_dir, tiny_model_dir, "ema: {enabled: false}", "phases:",
                        "  - {name: low-res, steps: 2, max_aspect: 1.0}",
                        f"  - {{name: sft, steps: 1, lr: 1.0e-12, enhancer: \"{SHAPES_ENHANCER}\"}}")
    assert train_cli.main(["--config", str(config)]) == 0
    low, sft = tmp_path / "runs" / "r" / "1-low-res", tmp_path / "runs" / "r" / "2-sft"
    first = load_file(str(low / "checkpoints" / "step_0000002" / "transformer.safetensors"))
    second = load_file(str(sft / "checkpoints" / "step_0000001" / "transformer.safetensors"))
    start = S3DiT.from_pretrained(tiny_model_dir / "transformer").state_dict()
    assert any(not torch.allclose(first[k], start[k]) for k in first)
    assert all(torch.allclose(first[k], second[k], atol=1e-9) for k in first)
    with open(sft / "metrics.csv") as fh:
        assert [row["step"] for row in csv.DictReader(fh)] == ["1"]
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the enhancer changed the caption features


def test_gradient_checkpointing_gives_the_plain_models_gradients_and_compile_wraps_every_block(monkeypatch):
    torch.manual_seed(0)
    model = S3DiT(S3DiTConfig(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                              axes_dims=(4, 6, 6), axes_lens=(128, 16, 16)))
    plain = copy.deepcopy(model)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))  # inductor: ~80 s
    parallel.parallelize_s3dit(model, parallel.ParallelConfig(gradient_checkpointing=True, compile=True), "fp32")
    assert compiled == model.repeated_blocks()
    x, t, c = torch.randn(2, 16, 1, 4, 4), torch.rand(2), torch.randn(2, 5, 16)
    for m in (model, plain):
        m(x, t, c).square().mean().backward()
    assert all(torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6) for a, b in zip(model.parameters(), plain.parameters()))


def test_bad_training_configs_are_one_line_errors(tmp_path, dataset_dir, tiny_model_dir):
    with pytest.raises(ZImageKitError, match="'pretrained' is empty"):
        train.train(train.ZImageTrainConfig())
    with pytest.raises(ZImageKitError, match="multiple of 16"):
        train.DataSection(resolution=30)
    config = run_config(tmp_path, dataset_dir, tiny_model_dir, "init: scratch", "model: {cap_feat_dim: 64}")
    assert train_cli.main(["--config", str(config)]) == 2


@pytest.mark.parametrize("preload", [False, True])
def test_a_dataset_of_two_aspect_buckets_trains_from_files_and_preloaded(tmp_path, tiny_model_dir, preload):
    """Square and wide images fall in two buckets; every batch comes from one, whether the cache
    is read from its files or held in memory (each batch's latents stack to one shape)."""
    from zimagekit.latent_cache import LatentCache

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(2)
    for i in range(8):
        size = (64, 64) if i % 2 else (96, 48)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(CAPTIONS[i % 4])
    config = run_config(tmp_path, data, tiny_model_dir, "ema: {enabled: false}")
    assert train_cli.main(["--config", str(config), "data.resolution=64", "data.max_aspect=2.0",
                           f"data.preload={str(preload).lower()}"]) == 0
    cache = LatentCache(next((tmp_path / "cache").iterdir()))
    assert sorted(set(cache.bucket_ids())) == [0, 1]
    if preload:
        cache.preload("cpu")
    for bucket in (0, 1):
        members = [i for i, b in enumerate(cache.bucket_ids()) if b == bucket]
        batch = cache.batch(members, "cpu")
        assert torch.equal(batch["latents"], torch.stack([cache[i][0] for i in members]))
