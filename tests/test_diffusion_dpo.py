"""Diffusion-DPO through ``zimagekit rl`` on a tiny random Z-Image folder: pairs from a file (the
first update's loss is log 2, the policy being the reference), on-policy pairs ranked by a
reward, ties left out, and bad pair files as one-line errors."""

import csv
import json
import math

import numpy as np
import torch
import yaml
from PIL import Image

from zimagekit.cli import rl as rl_cli


class Brightness:
    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class Constant:
    def __call__(self, images, prompts):
        return torch.zeros(len(images))


def write_config(tmp_path, model_dir, **dpo):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na cat\n")
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({
        "algorithm": "diffusion_dpo",
        "run": {"dir": str(tmp_path / "runs"), "name": "dpo"},
        "data": {"model": str(model_dir), "prompts": str(prompts), "height": 32, "width": 32},
        "dpo": {"lora_rank": 2, "sample_steps": 2, "group_size": 3, "guidance_scale": 0.0,
                "reward": "test_diffusion_dpo:Brightness", **dpo},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "progress": False},
        "ema": {"enabled": False},
        "optim": {"lr": 1.0e-2},
    }))
    return config


def metrics(tmp_path):
    with open(tmp_path / "runs" / "dpo" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_pairs_from_a_file_start_at_log_two_and_the_policy_exports(tmp_path, tiny_model_dir):
    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    rng = np.random.default_rng(0)
    rows = []
    for i, prompt in enumerate(["a red circle", "a cat", "a dog", "a boat"]):
        for kind in ("chosen", "rejected"):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{kind}{i}.png")
        rows.append({"prompt": prompt, "chosen": f"chosen{i}.png", "rejected": f"rejected{i}.png"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = write_config(tmp_path, tiny_model_dir, pairs=str(tmp_path / "pairs.jsonl"))
    assert rl_cli.main(["--config", str(config)]) == 0
    first, second = metrics(tmp_path)
    assert abs(float(first["loss/lora"]) - math.log(2)) < 1e-6
    assert float(second["loss/lora"]) != float(first["loss/lora"])  # the policy moved off the reference
    out = tmp_path / "policy"
    assert rl_cli.main(["export", str(tmp_path / "runs" / "dpo"), str(out)]) == 0
    DiffusersZImagePipeline.from_pretrained(out)


def test_on_policy_pairs_are_the_best_and_worst_of_a_group_and_ties_carry_no_loss(tmp_path, tiny_model_dir):
    assert rl_cli.main(["--config", str(write_config(tmp_path, tiny_model_dir))]) == 0
    rows = metrics(tmp_path)
    assert [r["pairs"] for r in rows] == ["2.0", "2.0"]
    assert float(rows[0]["reward/best"]) > float(rows[0]["reward/worst"])
    assert abs(float(rows[0]["loss/lora"]) - math.log(2)) < 1e-6

    from zimagekit.algorithms.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
    from zimagekit.pipeline import ZImagePipeline
    from zimagekit.runconfig import load_config

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
    algorithm = DiffusionDPO(pipe, load_config(DiffusionDPOConfig, write_config(tmp_path, tiny_model_dir)), Constant())
    loss = algorithm.training_step({"captions": pipe.encode_prompt(["a cat"]), "prompts": ["a cat"]}, 1)["lora"]
    loss.backward()
    assert loss.item() == 0.0 and algorithm.metrics()["pairs"] == 0.0
    assert all(p.grad is None or not p.grad.any() for p in algorithm.policy.lora.parameters())


def test_bad_pair_files_are_one_line_errors(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat", "chosen": "x.png"}\n')
    for pairs, message in ((tmp_path / "missing.jsonl", "no file"), (tmp_path / "bad.jsonl", "line 1")):
        assert rl_cli.main(["--config", str(write_config(tmp_path, tiny_model_dir, pairs=str(pairs)))]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
