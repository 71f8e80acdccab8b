"""DMDR over Decoupled-DMD on a tiny random S3-DiT: with λ_rl = 0 (and its other switches off)
it is Decoupled-DMD draw for draw; DynaDG's real score at scale 0 is the teacher; GRPO
reweights only the CA term; ReFL reaches the student through a differentiable reward; and the
command runs on a tiny Z-Image folder with prompts from a file, refusing a ReFL reward that has
no gradient."""

import copy

import pytest
import torch
import yaml

from zimagekit.algorithms import decoupled_dmd as dd
from zimagekit.algorithms import dmdr
from zimagekit.s3dit import S3DiT, S3DiTConfig
from zimagekit.sampling import ScheduleConfig

TINY = S3DiTConfig(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                   axes_dims=(4, 6, 6), axes_lens=(64, 16, 16))
LATENT = (4, 1, 4, 4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MeanPixel:
    differentiable = True

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def teacher():
    torch.manual_seed(0)
    return S3DiT(TINY)


def config(**dmdr_changes):
    cfg = dmdr.DMDRConfig(distill=dd.DistillSection(student_steps=4, schedule=ScheduleConfig(shift=3.0),
                                                    fake_updates_per_student=1, guidance_scale=2.0),
                          dmdr=dmdr.DMDRSection(**dmdr_changes))
    return cfg


def decode(latents):  # a stand-in VAE: latents (B, 4, 4, 4) -> "images" (B, 3, 4, 4) in [0, 1]
    return torch.sigmoid(latents[:, :3])


def batch(n=2):
    g = torch.Generator().manual_seed(1)
    return {"captions": [torch.randn(3 + i, 16, generator=g) for i in range(n)],
            "prompts": [f"prompt {i}" for i in range(n)]}


def train_steps(algorithm, steps=3):
    optimizers = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
                  for k, m in algorithm.modules().items()}
    for step in range(1, steps + 1):
        losses = algorithm.training_step(batch(), step)
        for group, loss in losses.items():
            optimizers[group].zero_grad()
            loss.backward(inputs=[p for p in algorithm.modules()[group].parameters() if p.requires_grad])
            optimizers[group].step()
    return {k: copy.deepcopy(m.state_dict()) for k, m in algorithm.modules().items()}


@pytest.mark.parametrize("rl", ["grpo", "refl"])
def test_rl_weight_zero_is_decoupled_dmd_bit_for_bit(rl):
    torch.manual_seed(5)
    ours = train_steps(dmdr.DMDR(teacher(), config(rl=rl, rl_weight=0.0), LATENT, torch.zeros(2, 16),
                                 MeanPixel(), decode))
    torch.manual_seed(5)
    reference = train_steps(dd.DecoupledDMD(teacher(), config().distill, LATENT, torch.zeros(2, 16)))
    for group in reference:
        assert all(torch.equal(ours[group][k], reference[group][k]) for k in reference[group])


def test_dynadg_real_score_at_scale_zero_is_the_teacher_and_the_fake_score_is_teacher_plus_lora():
    t = teacher()
    algorithm = dmdr.DMDR(t, config(dynadg=True, dynadg_steps=10, fake_scale=2.0), LATENT, torch.zeros(2, 16))
    with torch.no_grad():
        for b in algorithm.lora.B.values():
            b.normal_(0, 0.5)
    x, time, caps = torch.randn(2, *LATENT), torch.tensor([0.3, 0.6]), batch()["captions"]
    algorithm.step = 10  # γ_r(K) = 0
    assert torch.equal(algorithm.teacher(x, time, caps), t(x, time, caps))
    algorithm.step = 0  # γ_r(0) = 0.75: pulled toward the fake score
    assert not torch.allclose(algorithm.teacher(x, time, caps), t(x, time, caps))
    assert set(algorithm.modules()) == {"student", "fake_score"}
    assert all(p.requires_grad for p in algorithm.modules()["fake_score"].parameters())
    # the fake score is the teacher with the LoRA at 2.0: equal to merging 2x the adapters
    reference = copy.deepcopy(t)
    from zimagekit.lora import LoRA

    merged = LoRA.create(reference, algorithm.lora.A[next(iter(algorithm.lora.A))].shape[0])
    merged.load_state_dict(algorithm.lora.state_dict())
    merged.scale = 2.0
    torch.testing.assert_close(algorithm.fake_score(x, time, caps), reference(x, time, caps))


def test_grpo_weights_only_the_ca_term_by_one_plus_lambda_times_the_advantage():
    algorithm = dmdr.DMDR(teacher(), config(rl="grpo", rl_weight=0.5), LATENT, torch.zeros(2, 16), MeanPixel(),
                          decode)
    x = torch.randn(4, *LATENT)
    caps = batch(4)["captions"]
    draws = algorithm.draw_renoise(x, torch.full((4,), 0.4))
    weights = torch.tensor([1.5, 0.5, 1.0, 2.0])
    got = algorithm.weighted_direction(x, caps, draws, {"ca": weights})
    dm = algorithm.student_direction(x, caps, {"dm": draws["dm"]})
    ca = algorithm.student_direction(x, caps, {"ca": draws["ca"]})
    torch.testing.assert_close(got, dm + weights.view(-1, 1, 1, 1, 1) * ca)


def test_refl_sends_the_rewards_gradient_into_the_student():
    torch.manual_seed(0)
    algorithm = dmdr.DMDR(teacher(), config(rl="refl", rl_weight=1.0), LATENT, torch.zeros(2, 16), MeanPixel(),
                          decode)
    with_reward = algorithm.training_step(batch(), 1)["student"]
    torch.manual_seed(0)
    plain = dmdr.DMDR(teacher(), config(rl="refl", rl_weight=0.0), LATENT, torch.zeros(2, 16), MeanPixel(), decode)
    without = plain.training_step(batch(), 1)["student"]
    # the same draws; the difference is −λ·mean r of the student's prediction, a value < 0
    assert with_reward.item() < without.item()
    params = list(algorithm.student.parameters())
    assert sum(g.abs().sum() for g in torch.autograd.grad(with_reward, params, allow_unused=True) if g is not None) > 0


@pytest.mark.parametrize("rl", ["grpo", "dpo", "awr"])
def test_dmdr_runs_through_zimagekit_rl_and_refuses_refl_on_a_hard_reward(tmp_path, tiny_model_dir, capsys, rl):
    from zimagekit.cli import rl as rl_cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na cat\n")
    cfg = tmp_path / "dmdr.yaml"
    cfg.write_text(yaml.safe_dump({
        "algorithm": "dmdr",
        "run": {"dir": str(tmp_path / "runs"), "name": "dmdr"},
        "distill": {"student_steps": 2, "fake_updates_per_student": 1, "guidance_scale": 1.5},
        "dmdr": {"rl": rl, "group_size": 2, "reward": "test_dmdr:MeanPixel", "reward_tilt": True,
                 "dynadg": True, "fake_lora_rank": 2, "dynadg_steps": 2, "dynars": True, "dynars_steps": 2},
        "data": {"teacher": str(tiny_model_dir), "prompts": str(prompts), "height": 32, "width": 32},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "progress": False},
        "optim": {"lr": 1.0e-3},
    }))
    assert rl_cli.main(["--config", str(cfg)]) == 0
    header = (tmp_path / "runs" / "dmdr" / "metrics.csv").read_text().splitlines()[0]
    assert "reward/mean" in header and "real_scale" in header and "loss/fake_score" in header
    assert "reward/flat_groups" in header and (("awr_loss" in header) == (rl == "awr"))
    out = tmp_path / "student"
    assert rl_cli.main(["export", str(tmp_path / "runs" / "dmdr"), str(out)]) == 0
    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    DiffusersZImagePipeline.from_pretrained(out)
    assert rl_cli.main(["--config", str(cfg), "run.name=refl", "dmdr.rl=refl",
                        "dmdr.reward=zimagekit.shapes.rewards:JudgeReward"]) == 2
    assert "not differentiable" in capsys.readouterr().err


def test_without_distribution_matching_the_student_loss_is_the_reward_alone():
    """dm_weight = 0, the reward-hacking control: L_G = −λ·mean r(decode(x)), nothing else."""
    torch.manual_seed(0)
    algorithm = dmdr.DMDR(teacher(), config(rl="refl", rl_weight=2.0, dm_weight=0.0), LATENT, torch.zeros(2, 16),
                          MeanPixel(), decode)
    b = batch()
    torch.manual_seed(1)
    loss = algorithm.training_step(b, 1)["student"]
    torch.manual_seed(1)  # the same k, noise and student prediction, by hand
    k = int(torch.randint(4, ()))
    from zimagekit.sampling import cpu_randn

    z = dd.backward_simulation(algorithm.student, cpu_randn((2, *LATENT)), algorithm.sigmas, b["captions"], k)
    x = dd.denoise(algorithm.student, z, algorithm.sigmas[k].expand(2), b["captions"])
    torch.testing.assert_close(loss, -2.0 * decode(x.squeeze(2)).mean(dim=(1, 2, 3)).mean())
    with pytest.raises(Exception, match="needs dmdr.rl=refl or awr"):
        dmdr.DMDRSection(rl="grpo", dm_weight=0.0)
    with pytest.raises(Exception, match="must be > 0 with dmdr.dm_weight=0"):
        dmdr.DMDRSection(rl="awr", rl_weight=0.0, dm_weight=0.0)


def test_awr_without_distribution_matching_is_the_regression_alone():
    torch.manual_seed(0)
    algorithm = dmdr.DMDR(teacher(), config(rl="awr", rl_weight=2.0, dm_weight=0.0, group_size=2), LATENT,
                          torch.zeros(2, 16), MeanPixel(), decode)
    b = batch()
    torch.manual_seed(1)
    loss = algorithm.training_step(b, 1)["student"]
    torch.manual_seed(1)  # the same k, noise, prediction and rollouts, by hand
    k = int(torch.randint(4, ()))
    from zimagekit.sampling import cpu_randn

    caps = [c for c in b["captions"] for _ in range(2)]
    z = dd.backward_simulation(algorithm.student, cpu_randn((4, *LATENT)), algorithm.sigmas, caps, k)
    x = dd.denoise(algorithm.student, z, algorithm.sigmas[k].expand(4), caps)
    torch.rand(4), cpu_randn(x.shape)  # the fake score's draws come first
    finished = x
    if k + 1 < 4:
        rest = algorithm.sigmas[k + 1:]
        finished = dd.backward_simulation(algorithm.student, dd.add_noise(x, cpu_randn(x.shape), rest[0]), rest, caps,
                                          len(rest) - 1)
    rewards = decode(finished.squeeze(2)).mean(dim=(1, 2, 3))
    weights = dmdr.group_advantages(rewards, 2).clamp_min(0)
    assert k < 3 and loss.item() > 0  # a step before the last, so the regression has a target
    torch.testing.assert_close(loss, 2.0 * (weights * (x - finished).pow(2).flatten(1).mean(1)).mean())


def test_dmdr_dpo_starts_at_log_two_and_ignores_ties():
    import math

    algorithm = dmdr.DMDR(teacher(), config(rl="dpo", group_size=2), LATENT, torch.zeros(2, 16), MeanPixel(), decode)
    finished = torch.randn(4, *LATENT)
    caps = [c for c in batch()["captions"] for _ in range(2)]
    loss = algorithm.dpo_loss(finished, torch.tensor([0.2, 0.9, 0.5, 0.1]), caps)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # the student is still its reference
    tie = algorithm.dpo_loss(finished, torch.tensor([0.5, 0.5, 0.3, 0.3]), caps)
    assert tie.item() == 0.0


def test_awr_pulls_only_above_average_samples_toward_their_finished_rollouts():
    """mean_i max(A_i, 0)·mean((x_i − x0_i)²), A GRPO's advantage (global std), by hand."""
    algorithm = dmdr.DMDR(teacher(), config(rl="awr", group_size=2), LATENT, torch.zeros(2, 16), MeanPixel(), decode)
    x = torch.zeros(4, *LATENT, requires_grad=True)
    finished = torch.stack([torch.full(LATENT, v) for v in (1.0, 2.0, 3.0, 4.0)])
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5])  # group 1: the second sample is better; group 2 ties
    loss = algorithm.awr_loss(x, finished, rewards)
    a = 0.5 / (rewards.std().item() + 1e-4)  # the better sample's advantage; the worse one's is −a
    assert loss.item() == pytest.approx(a * 2.0**2 / 4, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad[[0, 2, 3]].abs().sum() == 0  # below average, or in a tied group: no pull
    torch.testing.assert_close(grad[1], torch.full(LATENT, -2 * a * 2.0 / (4 * x[1].numel())))
