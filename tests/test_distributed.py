"""Data-parallel ``zimagekit train`` under torchrun: 2 CPU processes on gloo give the loss curve
of one process with the same global batch, resume exactly, and their checkpoints load back
on one process. The reference is always a single-process run of the same config."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from zimagekit.cli import train as train_cli

GLOBAL_BATCH = 4


def losses(run_dir) -> list[float]:
    with open(run_dir / "metrics.csv") as fh:
        return [float(v) for row in csv.DictReader(fh) for k, v in row.items() if k.startswith("loss/")]


def weights(run_dir, step: int, name: str = "transformer") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors"))


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dist")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # two aspect buckets at 32² px: 48x32 images and 32x32 ones
        w = 48 if i % 2 else 32
        Image.fromarray(rng.integers(0, 255, (32, w, 3), dtype=np.uint8)).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(" ".join(rng.choice(["red", "blue", "circle", "square"], 3)))
    config = root / "train.yaml"
    config.write_text(f"""
pretrained: {tiny_model_dir}
run: {{dir: {root / 'runs'}, name: single}}
data: {{path: {data}, resolution: 32, cache_dir: {root / 'cache'}, max_sequence_length: 32}}
train: {{steps: 4, batch_size: {GLOBAL_BATCH}, log_every: 1, ckpt_every: 2, progress: false}}
optim: {{lr: 1.0e-3, eps: 1.0e-4}}
ema: {{decay: 0.5}}
""")
    # One process with the whole global batch: the reference. It also fills the cache.
    assert train_cli.main(["--config", str(config)]) == 0
    return root, config


def torchrun(config, *overrides) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zimagekit",
           "train", "--config", str(config), f"train.batch_size={GLOBAL_BATCH // 2}", *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


# Adam turns fp-rounding differences of the gradient sum into tiny weight differences.
WEIGHT_TOL = 2e-5


def test_ddp_loss_curve_equals_one_process_with_the_same_global_batch(setup):
    root, config = setup
    torchrun(config, "run.name=ddp", "parallel.strategy=ddp")
    runs = root / "runs"
    assert losses(runs / "ddp") == pytest.approx(losses(runs / "single"), rel=1e-5)
    assert len(losses(runs / "single")) == 4
    assert_close(weights(runs / "ddp", 4), weights(runs / "single", 4), WEIGHT_TOL)
    assert_close(weights(runs / "ddp", 4, "transformer_ema"), weights(runs / "single", 4, "transformer_ema"),
                 WEIGHT_TOL)


def test_fsdp2_loss_curve_equals_one_process_and_a_resumed_run_continues_exactly(setup):
    root, config = setup
    runs = root / "runs"
    torchrun(config, "run.name=fsdp", "parallel.strategy=fsdp")
    assert losses(runs / "fsdp") == pytest.approx(losses(runs / "single"), rel=1e-5)
    assert_close(weights(runs / "fsdp", 4), weights(runs / "single", 4), WEIGHT_TOL)

    # The same run stopped after its step-2 checkpoint (what a killed job leaves), resumed
    # on 2 processes: steps 3-4 must be the uninterrupted run's, bit for bit.
    shutil.copytree(runs / "fsdp", runs / "fsdp-resumed")
    (runs / "fsdp-resumed" / "checkpoints" / "latest").write_text("step_0000002\n")
    torchrun(config, "run.name=fsdp-resumed", "parallel.strategy=fsdp", "run.resume=true")
    assert losses(runs / "fsdp-resumed") == losses(runs / "fsdp")
    for name in ("transformer", "transformer_ema"):
        resumed, uninterrupted = weights(runs / "fsdp-resumed", 4, name), weights(runs / "fsdp", 4, name)
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_an_fsdp2_checkpoint_resumes_on_one_process(setup):
    """Checkpoints hold full tensors: the 2-process run's step 2 continues on 1 process as
    the single-process run did (within fp tolerance; the first two steps were summed over
    2 processes)."""
    root, config = setup
    runs = root / "runs"
    if not (runs / "fsdp").is_dir():
        pytest.skip("needs the FSDP2 run of the previous test")
    shutil.copytree(runs / "fsdp", runs / "fsdp-on-one")
    (runs / "fsdp-on-one" / "checkpoints" / "latest").write_text("step_0000002\n")
    assert train_cli.main(["--config", str(config), "run.name=fsdp-on-one", "run.resume=true"]) == 0
    assert losses(runs / "fsdp-on-one") == pytest.approx(losses(runs / "single"), rel=1e-5)
    assert_close(weights(runs / "fsdp-on-one", 4), weights(runs / "single", 4), WEIGHT_TOL)


def test_lora_on_an_fsdp2_sharded_base_with_gradient_accumulation_equals_one_process(setup):
    """2 processes x 2 accumulated micro-batches of 1 against 1 process x 2 accumulated
    micro-batches of 2 (the same global micro-batches): the frozen base is sharded, the
    adapters' gradients are averaged over processes."""
    root, config = setup
    runs = root / "runs"
    lora = ["lora.rank=2", "ema.enabled=false", "train.grad_accum_steps=2"]
    assert train_cli.main(["--config", str(config), "run.name=lora-single", *lora,
                       f"train.batch_size={GLOBAL_BATCH // 2}"]) == 0
    torchrun(config, "run.name=lora-fsdp", "parallel.strategy=fsdp", *lora, f"train.batch_size={GLOBAL_BATCH // 4}")
    single, sharded = runs / "lora-single", runs / "lora-fsdp"
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-5)
    assert_close(load_file(str(sharded / "lora.safetensors")), load_file(str(single / "lora.safetensors")), WEIGHT_TOL)


def test_fsdp2_shards_every_block_and_the_root_with_bf16_params_and_fp32_gradients(tmp_path):
    """The wrapping itself, on a one-process gloo group: each transformer block and the root
    are FSDP modules, blocks compute with bf16 weights, gradients stay fp32."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from zimagekit import parallel
    from zimagekit.s3dit import S3DiT, S3DiTConfig

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = S3DiT(S3DiTConfig(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                  axes_dims=(4, 6, 6), axes_lens=(128, 16, 16)))
        parallel.parallelize_s3dit(model, parallel.ParallelConfig(strategy="fsdp"), precision="bf16")
        assert isinstance(model, FSDPModule)
        assert all(isinstance(b, FSDPModule) for b in model.repeated_blocks())
        seen = []
        model.layers[0].attention.qkv.register_forward_hook(lambda m, i, o: seen.append(m.weight.dtype))
        out = model(torch.randn(2, 16, 1, 4, 4), torch.rand(2), torch.randn(2, 5, 16))
        out.float().square().mean().backward()
        assert seen == [torch.bfloat16]
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    finally:
        dist.destroy_process_group()
