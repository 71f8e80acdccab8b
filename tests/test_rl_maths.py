"""The RL maths against closed forms and hand-worked cases: the SDE step (Euler at zero noise,
the ODE's marginals on a Gaussian, an exact Gaussian log-probability), GRPO's advantages and
ratio, the Gaussian KL, Diffusion-DPO at policy = reference, and DMDR's schedules."""

import math

import pytest
import torch

from zimagekit.algorithms.rl_maths import (
    clipped_surrogate,
    diffusion_dpo_loss,
    dynadg_real_scale,
    dynars_beta,
    dynars_sigmas,
    flat_groups,
    gaussian_kl,
    group_advantages,
)
from zimagekit.sampling import euler_step, gaussian_log_prob, sde_step


def test_the_sde_step_without_noise_is_the_euler_step():
    x, v = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    x_next, mean, std = sde_step(x, v, 0.7, 0.5, noise_level=0.0)
    assert std == 0 and torch.equal(mean, euler_step(x, v, 0.7, 0.5)) and torch.equal(x_next, mean)


def test_the_sde_step_by_hand():
    """σ = 0.5 → 0.25, a = 0.7: s = 0.7·√(0.5/0.5) = 0.7, dt = −0.25, std = 0.7·0.5 = 0.35.
    x = 1, v = 2: Euler 1 + 0.5 = 1.5; ε̂ = x − (1 − σ)v = 0; so the mean is 1.5. With x = 2:
    Euler 2.5, ε̂ = 1, correction 0.49/1 · 1 · (−0.25) = −0.1225, mean 2.3775."""
    x, v = torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [2.0]])
    noise = torch.tensor([[1.0], [-2.0]])
    x_next, mean, std = sde_step(x, v, 0.5, 0.25, noise_level=0.7, noise=noise)
    assert std == pytest.approx(0.35)
    assert mean[:, 0].tolist() == pytest.approx([1.5, 2.3775])
    assert x_next[:, 0].tolist() == pytest.approx([1.5 + 0.35, 2.3775 - 0.7])


def test_the_sde_keeps_the_odes_marginals_on_gaussian_data():
    """x0 ~ N(0, c²): the exact velocity is linear in x_σ, and x_σ ~ N(0, (1 − σ)²c² + σ²) at
    every σ. 200 SDE steps with a = 0.7 from pure noise must keep that variance."""
    torch.manual_seed(0)
    c2 = 0.25
    var = lambda s: (1 - s) ** 2 * c2 + s**2  # noqa: E731

    def exact_velocity(x, s):  # E[x0 | x] − E[ε | x]
        return ((1 - s) * c2 - s) / var(s) * x

    sigmas = torch.linspace(1, 0.05, 201).tolist()
    x = torch.randn(40_000, 1)
    checked = []
    for i in range(200):
        x, _, _ = sde_step(x, exact_velocity(x, sigmas[i]), sigmas[i], sigmas[i + 1], 0.7, sigma_cap=sigmas[1])
        if (i + 1) % 50 == 0:
            checked.append(x.var().item() / var(sigmas[i + 1]))
    assert checked == pytest.approx([1.0] * 4, rel=0.05)


def test_the_log_probability_is_the_gaussian_density_averaged_over_elements():
    x, mean = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 0.0]])
    density = lambda v, s: math.exp(-v * v / (2 * s * s)) / (s * math.sqrt(2 * math.pi))  # noqa: E731
    by_hand = sum(math.log(density(v, 0.3)) for v in (0.5, -1.0)) / 2
    assert gaussian_log_prob(x, mean, 0.3).item() == pytest.approx(by_hand, rel=1e-6)


def test_group_advantages_by_hand_and_zero_for_a_group_of_equal_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])  # two groups of 2
    std = rewards.std().item()  # over the whole batch
    adv = group_advantages(rewards, 2, eps=0.0)
    assert adv.tolist() == pytest.approx([0.5 / std, -0.5 / std, 0.0, 0.0])
    assert torch.equal(group_advantages(torch.full((6,), 0.3), 3), torch.zeros(6))
    assert group_advantages(torch.tensor([0.0, 100.0]), 2, global_std=False, clip=0.5).tolist() == [-0.5, 0.5]
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, 1)


def test_the_clipped_surrogate_is_minus_the_mean_advantage_at_ratio_one_and_clips():
    logp = torch.tensor([-1.0, -2.0])
    adv = torch.tensor([1.0, -3.0])
    loss, ratio = clipped_surrogate(logp, logp.clone(), adv, 0.2)
    assert torch.equal(ratio, torch.ones(2)) and loss.item() == pytest.approx(1.0)  # −mean(A)
    # ρ = e > 1 + ε for a positive advantage: clipped at 1.2 (the max picks −A·1.2)
    loss, _ = clipped_surrogate(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([1.0]), 0.2)
    assert loss.item() == pytest.approx(-1.2)


def test_the_kl_of_equal_policies_is_zero_and_matches_the_closed_form():
    mean = torch.randn(2, 3)
    assert torch.equal(gaussian_kl(mean, mean.clone(), 0.5), torch.zeros(2))
    kl = gaussian_kl(torch.tensor([[1.0]]), torch.tensor([[0.0]]), 0.5).item()
    # KL(N(1, .25) || N(0, .25)) = (1 − 0)² / (2·0.25)
    assert kl == pytest.approx(2.0)


def test_diffusion_dpo_is_log_two_when_the_policy_is_the_reference():
    e_w, e_l = torch.rand(5), torch.rand(5)
    loss, accuracy = diffusion_dpo_loss(e_w, e_l, e_w.clone(), e_l.clone(), beta=100.0)
    assert loss.item() == pytest.approx(math.log(2)) and accuracy.item() == 0.0
    # The policy improves on the winner by 0.01 over the reference: margin = −50·(−0.01) = 0.5.
    loss, accuracy = diffusion_dpo_loss(torch.tensor([0.09]), torch.tensor([0.2]), torch.tensor([0.1]),
                                        torch.tensor([0.2]), beta=100.0)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5)))) and accuracy.item() == 1.0


def test_dynadg_anneals_from_its_start_to_zero_and_stays_there():
    assert dynadg_real_scale(0, 100) == pytest.approx(0.75)
    assert dynadg_real_scale(50, 100) == pytest.approx(0.375)
    assert dynadg_real_scale(100, 100) == 0.0 and dynadg_real_scale(10**6, 100) == 0.0
    assert dynadg_real_scale(0, 0) == 0.0  # no annealing: the plain teacher from the start


def test_dynars_starts_at_beta_4_1_5_and_ends_uniform():
    assert dynars_beta(0, 1000) == pytest.approx((4.0, 1.5))
    assert dynars_beta(1000, 1000) == (1.0, 1.0) and dynars_beta(5000, 1000) == (1.0, 1.0)
    torch.manual_seed(0)
    late, _ = dynars_sigmas(1000, 1000, 20_000).sort()
    # Kolmogorov–Smirnov against U(0, 1): the 1 % critical value is 1.63/√n.
    grid = torch.arange(1, 20_001) / 20_000
    assert (late - grid).abs().max() < 1.63 / math.sqrt(20_000)
    early = dynars_sigmas(0, 1000, 20_000)
    # Beta(4, 1.5): mean a/(a + b) = 0.7273, variance ab/((a + b)²(a + b + 1)) = 0.03051
    assert early.mean().item() == pytest.approx(4 / 5.5, abs=0.005)
    assert early.var().item() == pytest.approx(6 / (5.5**2 * 6.5), rel=0.05)


def test_flat_groups_counts_the_groups_with_one_reward():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.25, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    assert flat_groups(rewards, 4) == pytest.approx(2 / 3)
    assert flat_groups(rewards, 2) == pytest.approx(5 / 6)  # (1,1) (1,1) (0,.25) (0,0) (.5,.5) (.5,.5)
    # Exactly the groups whose GRPO advantages all vanish.
    zero = group_advantages(rewards, 4).view(-1, 4).abs().amax(dim=1) == 0
    assert zero.float().mean().item() == pytest.approx(flat_groups(rewards, 4))
