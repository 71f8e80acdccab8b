"""Flow-GRPO through ``zimagekit rl`` on a tiny random Z-Image folder (real Qwen3 tokenizer,
prompts from a text file): the run, its export, the on-policy identities before any update,
and bad input that stops a run in one line with its last checkpoint intact."""

import copy
import csv

import torch
import yaml

from zimagekit.algorithms import flow_grpo
from zimagekit.cli import rl as rl_cli

CALLS = {"n": 0}


class Brightness:
    """A stand-in reward: mean pixel value (the tiny folder's images are not shapes scenes)."""

    name = "brightness"

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class Constant:
    def __call__(self, images, prompts):
        return torch.full((len(images),), 0.5)


class NaNOnSecondCall:
    def __call__(self, images, prompts):
        CALLS["n"] += 1
        return torch.full((len(images),), float("nan") if CALLS["n"] >= 2 else 1.0)


def write_config(tmp_path, model_dir, **sections):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na cat\na castle at night\n")
    config = {
        "algorithm": "flow_grpo",
        "run": {"dir": str(tmp_path / "runs"), "name": "rl"},
        "data": {"model": str(model_dir), "prompts": str(prompts), "height": 32, "width": 32},
        "grpo": {"reward": "test_flow_grpo:Brightness", "group_size": 2, "sde_steps": 3, "lora_rank": 2,
                 "guidance_scale": 1.5},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "ckpt_every": 1, "progress": False},
        "ema": {"enabled": False},
        "optim": {"lr": 1.0e-2},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_rl_post_trains_a_tiny_zimage_folder_and_exports_one_diffusers_loads(tmp_path, tiny_model_dir):
    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    from zimagekit.s3dit import S3DiT

    assert rl_cli.main(["--config", str(write_config(tmp_path, tiny_model_dir))]) == 0
    run = tmp_path / "runs" / "rl"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/lora", "reward/mean", "reward/flat_groups", "kl", "ratio/max", "clip_fraction"} <= set(header)
    with (run / "metrics.csv").open() as fh:
        assert all(0 <= float(r["reward/flat_groups"]) <= 1 for r in csv.DictReader(fh))
    out = tmp_path / "policy"
    assert rl_cli.main(["export", str(run), str(out)]) == 0
    pipe = DiffusersZImagePipeline.from_pretrained(out, dtype=torch.float32)
    base = S3DiT.from_pretrained(tiny_model_dir / "transformer").state_dict()
    moved = max((pipe.transformer.state_dict()[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3  # the merged LoRA changed the weights
    image = pipe("a cat", height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def make_algorithm(zimage_pipe, tmp_path, tiny_model_dir, reward, **grpo):
    from zimagekit.runconfig import load_config

    cfg = load_config(flow_grpo.FlowGRPOConfig, write_config(tmp_path, tiny_model_dir, grpo=grpo))
    pipe = copy.copy(zimage_pipe)
    pipe.transformer = copy.deepcopy(zimage_pipe.transformer)
    return flow_grpo.FlowGRPO(pipe, cfg, reward)


def whole(parts):
    """The update's loss from its per-step parts (kept together here, unlike the trainer)."""
    return sum(parts)


def batch(pipe, prompts):
    return {"captions": pipe.encode_prompt(prompts), "prompts": prompts}


def test_before_any_update_the_ratio_is_one_and_the_kl_zero(zimage_pipe, tmp_path, tiny_model_dir):
    """The LoRA starts at zero, so the policy is the sampling policy and the reference: ρ = 1
    and KL = 0 exactly, and the loss is −mean(A) = 0 (advantages are centred per group)."""
    torch.manual_seed(0)
    algorithm = make_algorithm(zimage_pipe, tmp_path, tiny_model_dir, Brightness(), kl_beta=0.1)
    loss = whole(algorithm.training_step(batch(algorithm.pipe, ["a red circle", "a cat"]), 1)["lora"])
    metrics = algorithm.metrics()
    assert metrics["ratio/max"] == 1.0 and metrics["kl"] == 0.0 and metrics["clip_fraction"] == 0.0
    assert abs(loss.item()) < 1e-5 and metrics["reward/std"] > 0  # float32 sums of O(1) advantages
    loss.backward()
    assert sum(p.grad.abs().sum() for p in algorithm.lora.parameters() if p.grad is not None) > 0


def test_a_reward_that_never_varies_gives_zero_advantages_and_no_gradient(zimage_pipe, tmp_path, tiny_model_dir):
    torch.manual_seed(0)
    algorithm = make_algorithm(zimage_pipe, tmp_path, tiny_model_dir, Constant(), kl_beta=0.0)
    loss = whole(algorithm.training_step(batch(algorithm.pipe, ["a red circle", "a cat"]), 1)["lora"])
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in algorithm.lora.parameters())


def test_a_rollout_in_minibatches_goes_off_policy_after_the_first_update(zimage_pipe, tmp_path, tiny_model_dir):
    """updates_per_rollout = 2: the second minibatch is scored after an update, so its ratio
    moves off 1 (where clipping acts); both come from one rollout (one reward call)."""
    torch.manual_seed(0)
    calls = []
    reward = lambda images, prompts: calls.append(len(images)) or images.mean(dim=(1, 2, 3))  # noqa: E731
    algorithm = make_algorithm(zimage_pipe, tmp_path, tiny_model_dir, reward, updates_per_rollout=2)
    optimizer = torch.optim.SGD(algorithm.lora.parameters(), lr=10.0)
    b = batch(algorithm.pipe, ["a red circle", "a cat"])
    whole(algorithm.training_step(b, 1)["lora"]).backward()
    assert algorithm.metrics()["ratio/max"] == 1.0
    optimizer.step()
    whole(algorithm.training_step(b, 2)["lora"])
    assert algorithm.metrics()["ratio/max"] != 1.0 and calls == [4]


def test_bad_rl_configs_and_rewards_are_one_line_and_keep_the_last_checkpoint(tmp_path, tiny_model_dir, capsys):
    def error(argv):
        assert rl_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    config = str(write_config(tmp_path, tiny_model_dir))
    assert "unknown RL algorithm 'nope'" in error(["--config", config, "algorithm=nope"])
    assert "names no algorithm" in error(["train"])
    assert "grpo.group_size" in error(["--config", config, "grpo.group_size=1"])
    assert "has no Missing" in error(["--config", config, "grpo.reward=test_flow_grpo:Missing"])
    CALLS["n"] = 0
    err = error(["--config", config, "grpo.reward=test_flow_grpo:NaNOnSecondCall"])
    assert "returned nan for image 0" in err
    checkpoints = tmp_path / "runs" / "rl" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000001"
    CALLS["n"] = -10  # the reward recovers: the run resumes from step 1 and finishes
    assert rl_cli.main(["--config", config, "grpo.reward=test_flow_grpo:NaNOnSecondCall", "run.resume=true"]) == 0
    assert "from step 1" in capsys.readouterr().out
    assert (checkpoints / "latest").read_text().strip() == "step_0000002"
