"""The maths every RL algorithm in zimagekit shares, as pure functions of tensors: GRPO's
group-relative advantages and clipped surrogate (Shao et al. 2024; Flow-GRPO, Liu et al. 2025,
Eq. 6–8), the KL between two equal-variance Gaussian policies, Diffusion-DPO's loss for flow
models (Wallace et al. 2023, Eq. 14 with velocity errors), and DMDR's two annealing schedules
(Jiang et al. 2025, §3.3: DynaDG and DynaRS).

The algorithms (:mod:`.flow_grpo`, :mod:`.diffusion_dpo`, :mod:`.dmdr`) import these, and the
tests pin each one against a hand-worked case.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, group_size: int, global_std: bool = True, clip: float = 5.0,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage of each of ``B = groups × group_size`` rewards (samples of one prompt are
    consecutive): ``A_i = (r_i − mean of its group) / std``, with the std over the whole batch
    (Flow-GRPO's ``global_std``) or over the group, clipped to ``±clip``. A group whose rewards
    are all equal has zero advantages: it carries no signal about which sample was better."""
    if group_size < 2:
        raise ValueError(f"GRPO needs a group of at least 2 samples per prompt, got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    std = rewards.float().std() if global_std else grouped.std(dim=1, keepdim=True)
    return (centred / (std + eps)).clamp(-clip, clip).flatten()


def flat_groups(rewards: torch.Tensor, group_size: int) -> float:
    """The fraction of groups (``group_size`` consecutive rewards each) whose rewards are all
    equal: their GRPO advantages are zero and their best-vs-worst DPO pair is a tie, so they
    teach the policy nothing. Logged to see how much of a rollout a reward wastes."""
    grouped = rewards.float().view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1).float().mean().item()


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a loss: ``mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)))`` with
    ``ρ = exp(log π_θ − log π_old)``. Returns the loss and ρ (ρ = 1 before any update)."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    return loss.mean(), ratio


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: float) -> torch.Tensor:
    """KL between N(mean, std²) and N(ref_mean, std²) per element, ``(μ − μ_ref)² / (2 std²)``,
    averaged over all but the first dimension (as :func:`zimagekit.sampling.gaussian_log_prob`
    averages): Flow-GRPO's KL to the reference policy, one value per sample."""
    return ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).mean(1)


def diffusion_dpo_loss(error_w: torch.Tensor, error_l: torch.Tensor, ref_error_w: torch.Tensor,
                       ref_error_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO (Eq. 14) with flow-matching errors: each ``error`` is the per-sample mean
    squared velocity error of the policy (or the frozen reference) on the winner ``w`` or the
    loser ``l``, all at a shared noise level and noise. ``Δ = (e_w − e_w^ref) − (e_l − e_l^ref)``
    and ``L = −log σ(−β/2 · Δ)``: log 2 while the policy is the reference. Returns the mean
    loss and the implicit accuracy (the fraction of pairs with −β/2·Δ > 0)."""
    margin = -0.5 * beta * ((error_w - ref_error_w) - (error_l - ref_error_l))
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def dynadg_real_scale(step: int, anneal_steps: int, start: float = 0.75) -> float:
    """DynaDG: the LoRA scale of the *real* score (teacher + the fake score's LoRA) at update
    ``step``: ``start·½(1 + cos(π·step/K))`` for step < K, then 0, where it is the plain
    teacher and DMDR is plain DMD."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return 0.0
    return start * 0.5 * (1 + math.cos(math.pi * step / anneal_steps))


def dynars_beta(step: int, anneal_steps: int) -> tuple[float, float]:
    """DynaRS: the Beta(a, b) that re-noise levels σ are drawn from at update ``step``:
    ``c = ½(1 + cos(π·min(step/K, 1)))``, ``a = 1 + 3c``, ``b = 1 + 0.5c``; Beta(4, 1.5) (high
    noise, σ near 1) at the start, Beta(1, 1) (uniform) from K on."""
    c = 0.5 * (1 + math.cos(math.pi * min(step / anneal_steps, 1.0))) if anneal_steps > 0 else 0.0
    return 1 + 3 * c, 1 + 0.5 * c


def dynars_sigmas(step: int, anneal_steps: int, n: int) -> torch.Tensor:
    """``n`` re-noise levels σ from DynaRS's Beta at update ``step``, drawn from torch's global
    RNG (which the trainer checkpoints), on the CPU."""
    a, b = dynars_beta(step, anneal_steps)
    return torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).sample((n,))
