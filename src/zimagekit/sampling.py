"""Flow-matching maths for Z-Image: one time convention, the schedule, the Euler step, CFG.

Conventions (stated once, used everywhere in zimagekit):

* PAPER eq. 1 interpolates data and noise with the *model time* ``t`` (t = 1 is clean):
  ``x_t = t·x0 + (1 − t)·ε`` and the S3-DiT predicts the velocity ``v = x0 − ε``.
* The sampler and the scheduler config work in ``σ = 1 − t`` (σ = 1 is pure noise), so a
  latent at noise level σ is ``x_σ = (1 − σ)·x0 + σ·ε``.  The DiT is always called with
  ``t = time_from_sigma(σ)``; nothing else converts between the two.
* Everything here is a pure function of tensors and numbers, so the pipeline, the trainers
  (SFT, Decoupled-DMD, DMDR, GRPO) and the tests share the same maths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "ScheduleConfig",
    "add_noise",
    "cfg_combine",
    "cfg_scales",
    "exponential_shift",
    "euler_step",
    "flux_mu",
    "get_sigmas",
    "img2img_start",
    "keep_unmasked",
    "noise_from_velocity",
    "gaussian_log_prob",
    "sample_euler",
    "sde_step",
    "shift_sigmas",
    "sigma_from_time",
    "time_from_sigma",
    "static_shift",
    "training_sigmas",
    "velocity",
    "x0_from_velocity",
]


# ---------------------------------------------------------------------------------------------
# Time convention and the x̂0 / ε / v conversions (PAPER eq. 1)
# ---------------------------------------------------------------------------------------------


def time_from_sigma(sigma):
    """Model time of a noise level: ``t = 1 − σ`` (t = 0 is noise; the S3-DiT's ``t`` input)."""
    return 1 - sigma


def sigma_from_time(t):
    """Noise level of a model time: ``σ = 1 − t`` (σ = 1 is noise; the scheduler's variable)."""
    return 1 - t


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Forward process at noise level σ: ``x_σ = (1 − σ)·x0 + σ·ε`` (PAPER eq. 1 with t = 1 − σ).

    Written as ``σ·ε + (1 − σ)·x0`` so img2img start latents match the reference bit for bit.
    """
    return sigma * noise + (1.0 - sigma) * x0


def keep_unmasked(x: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, sigma) -> torch.Tensor:
    """Inpainting's step: where ``mask`` is 0 the latent is replaced by the init image ``x0``
    noised to the step's σ with the starting noise (so it ends as ``x0`` at σ = 0); where it is
    1 the sampler's ``x`` stays. Written as diffusers' Z-Image inpaint pipeline writes it, so
    the latents agree bit for bit."""
    return (1 - mask) * add_noise(x0, noise, sigma) + mask * x


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The S3-DiT's regression target ``v = x0 − ε`` (PAPER eq. 1, d x_t / d t)."""
    return x0 - noise


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """Denoised estimate from a velocity: ``x̂0 = x_σ + σ·v``.

    From x_σ = (1 − σ)·x0 + σ·ε and v = x0 − ε.
    """
    return x + sigma * v


def noise_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """Noise estimate from a velocity: ``ε̂ = x_σ − (1 − σ)·v`` (same two equations as above)."""
    return x - (1 - sigma) * v


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------


def static_shift(sigma, shift: float):
    """Static resolution shift of a noise level: ``σ' = s·σ / (1 + (s − 1)·σ)``.

    Z-Image-Turbo uses s = 3 (scheduler_config.json); s > 1 spends more steps at high noise.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux-style log-shift ``μ``, linear in the number of image tokens (2×2 patches).

    Only used when the scheduler config sets ``use_dynamic_shifting`` (Turbo does not).
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def exponential_shift(sigma, mu: float):
    """Flux's exponential shift ``σ' = e^μ / (e^μ + (1/σ − 1))`` (``static_shift`` with s = e^μ)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


@dataclass
class ScheduleConfig:
    """The fields of a diffusers ``scheduler_config.json`` that decide Z-Image's σ schedule.

    Defaults are Z-Image-Turbo's: static shift 3 over 1000 training timesteps.
    ``num_train_timesteps`` does not enter the maths (the DiT scales t itself); it is kept so a
    saved folder round-trips.
    """

    shift: float = 3.0
    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    # Re-noise x̂0 with fresh noise at each step instead of an Euler step (few-step students).
    stochastic_sampling: bool = False


def get_sigmas(num_steps: int, config: ScheduleConfig, image_seq_len: int | None = None) -> torch.Tensor:
    """The σ schedule for ``num_steps`` transformer calls: ``shift(linspace(1, 1/N, N))`` then 0.

    N steps = N NFEs, as in the official sampler and diffusers ≥ 0.39 (earlier diffusers ended
    at σ = 0 and wasted one forward).  Returns a float32 CPU tensor of length N + 1, so per-step
    arithmetic on it never synchronises with an accelerator.  ``image_seq_len`` (the number of
    2×2 latent patches) is needed only with dynamic shifting.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    sigmas = shift_sigmas(torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float32), config, image_seq_len)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def shift_sigmas(sigmas, config: ScheduleConfig, image_seq_len: int | None = None):
    """Apply the config's shift: Flux's dynamic shift by token count when
    ``use_dynamic_shifting``, else ``static_shift``. Sampling and training share it,
    so a model is sampled with the noise levels it was trained on."""
    if not config.use_dynamic_shifting:
        return static_shift(sigmas, config.shift)
    if image_seq_len is None:
        raise ValueError("dynamic shifting needs image_seq_len")
    mu = flux_mu(image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    return exponential_shift(sigmas, mu)


def training_sigmas(
    batch: int,
    config: ScheduleConfig,
    image_seq_len: int | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise levels for flow-matching training: logit-normal ``σ = sigmoid(n)``,
    ``n ~ N(logit_mean, logit_std²)`` (SD3's sampling, which Z-Image pre-training uses),
    then the same shift as :func:`get_sigmas` (Z-Image trains with Flux-style dynamic
    shifting by resolution)."""
    n = torch.randn(batch, generator=generator) * logit_std + logit_mean
    return shift_sigmas(torch.sigmoid(n), config, image_seq_len)


def img2img_start(num_steps: int, strength: float) -> int:
    """Index of the first of the N scheduled steps that img2img runs (0 = all of them).

    Same arithmetic as diffusers' ``get_timesteps``: ``int(N − min(N·strength, N))`` steps are
    skipped, so strength 1 runs all N, strength 0.6 with N = 4 runs 3, and any strength > 0
    runs at least one.  The image is noised to the σ of the first step that runs.
    """
    init_steps = min(num_steps * strength, num_steps)
    return int(max(num_steps - init_steps, 0))


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the probability-flow ODE in σ: ``x ← x + (σ_next − σ)·(−v)``.

    dx/dσ = −v because x_σ = (1 − σ)·x0 + σ·ε gives dx/dσ = ε − x0 = −v.  Written with the
    reference's sign (it negates the DiT output, then adds dt times it) so results match
    diffusers to the last bit.
    """
    return x + (sigma_next - sigma) * (-v)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise_level: float,
    noise: torch.Tensor | None = None,
    sigma_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One step of the SDE whose marginals are the ODE's (Flow-GRPO, arXiv 2505.05470 §4.2),
    written in zimagekit's convention (v = x0 − ε, dt = σ_next − σ < 0).

    Flow-GRPO's mean, with its velocity ε − x0 = −v, is ``x + [−v + s²/(2σ)·(x − (1 − σ)·v)]·dt``;
    ``x − (1 − σ)·v`` is the noise estimate ε̂, so the mean is the Euler step plus
    ``s²/(2σ)·ε̂·dt``, the score term that keeps the marginals while noise of std
    ``s·√(−dt)`` is added, with ``s = noise_level·√(σ/(1 − σ))``. At σ = 1 that is infinite;
    as in Flow-GRPO the denominator then uses ``sigma_cap`` (the grid's second σ).
    With ``noise_level = 0`` the step is :func:`euler_step` exactly.

    Returns ``(x_next, mean, std)``; ``x_next = mean + std·noise`` (``noise`` drawn from the
    global RNG when None)."""
    dt = sigma_next - sigma
    std = 0.0
    mean = euler_step(x, v, sigma, sigma_next)
    if noise_level > 0:
        denominator = 1 - (sigma_cap if sigma >= 1 and sigma_cap is not None else sigma)
        if denominator <= 0:
            raise ValueError("sde_step at sigma = 1 needs sigma_cap < 1 (the grid's second sigma)")
        s = noise_level * math.sqrt(sigma / denominator)
        mean = mean + (s * s / (2 * sigma)) * noise_from_velocity(x, v, sigma) * dt
        std = s * math.sqrt(-dt)
    if noise is None:
        noise = torch.randn_like(x)
    return mean + std * noise, mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """``log N(x; mean, std²)`` per element, averaged over all but the first dimension: one
    value per sample. The mean (not the sum) over elements is Flow-GRPO's, and makes the
    policy ratio's scale independent of the latent size."""
    elementwise = -((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return elementwise.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance (Z-Image form)
# ---------------------------------------------------------------------------------------------


def cfg_scales(sigmas: torch.Tensor, guidance_scale: float, cfg_truncation: float = 1.0) -> list[float]:
    """Per-step guidance scale: ``w`` while ``t = 1 − σ ≤ cfg_truncation``, 0 afterwards.

    Computed on the host once per generation so the loop never reads a device value.
    """
    times = time_from_sigma(sigmas[:-1]).tolist()
    return [0.0 if t > cfg_truncation else float(guidance_scale) for t in times]


def cfg_combine(pos: torch.Tensor, neg: torch.Tensor, scale: float, normalization: float = 0.0) -> torch.Tensor:
    """Z-Image CFG: ``pred = pos + w·(pos − neg)`` (so w = 0 is no guidance; standard scale = w + 1).

    With ``normalization = c > 0`` each sample is rescaled so that ``‖pred‖ ≤ c·‖pos‖`` (norms
    over the whole latent of that sample).  The rescale is a ``torch.where`` rather than a Python
    ``if`` so it costs no host synchronisation.
    """
    pred = pos + scale * (pos - neg)
    if normalization > 0:
        dims = tuple(range(1, pred.ndim))
        pos_norm = torch.linalg.vector_norm(pos, dim=dims, keepdim=True)
        pred_norm = torch.linalg.vector_norm(pred, dim=dims, keepdim=True)
        max_norm = pos_norm * float(normalization)
        pred = torch.where(pred_norm > max_norm, pred * (max_norm / pred_norm), pred)
    return pred


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------

VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def cpu_randn(shape: tuple, generators=None, device=None) -> torch.Tensor:
    """Standard normal float32 noise drawn on the CPU, so a seed gives the same numbers on any
    device, then moved to ``device``. ``generators``: one ``torch.Generator``, a list with one
    per image (each image's noise then depends on its own seed alone), or None for torch's
    global RNG."""
    if isinstance(generators, list):
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])
    else:
        noise = torch.randn(shape, generator=generators)
    return noise if device is None else noise.to(device)


def sample_euler(
    model: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callable[[dict], None] | None = None,
    fresh_noise: Callable[[int], torch.Tensor] | None = None,
    after_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Euler sampler over ``sigmas`` (k-diffusion style, one NFE per step).

    ``model(x, sigma, i)`` returns the velocity v = x0 − ε at ``sigma = sigmas[i]`` (guidance
    already applied); ``i`` lets the caller look up per-step values it precomputed.  ``x`` is the
    latent at ``sigmas[0]`` and stays float32 throughout.  After each step
    ``callback({"i", "sigma", "sigma_next", "x", "velocity", "denoised"})`` is called with ``x``
    the latent *before* the step and ``denoised`` = x̂0; it drives progress bars and previews.

    With ``fresh_noise(i)`` the step is stochastic instead: ``x ← add_noise(x̂0, ε_i, σ_next)``,
    the few-step sampling DMD students are trained with (DMD2's backward simulation) and
    diffusers' ``stochastic_sampling``; it draws noise at every step, the last included, as
    diffusers does, so seeded runs agree.

    ``after_step(x_next, sigma_next)`` may replace each step's result (inpainting's
    :func:`keep_unmasked`).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = model(x, sigma, i)
        if fresh_noise is None:
            x_next = euler_step(x, v, sigma, sigma_next)
        else:
            x_next = add_noise(x0_from_velocity(x, v, sigma), fresh_noise(i), sigma_next)
        if after_step is not None:
            x_next = after_step(x_next, sigma_next)
        if callback is not None:
            callback(
                {
                    "i": i,
                    "sigma": sigma,
                    "sigma_next": sigma_next,
                    "x": x,
                    "velocity": v,
                    "denoised": x0_from_velocity(x, v, sigma),
                }
            )
        x = x_next
    return x
