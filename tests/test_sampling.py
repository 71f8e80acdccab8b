"""The flow-matching maths against closed forms, hand-worked cases and diffusers' scheduler."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageImg2ImgPipeline

from zimagekit.sampling import (
    ScheduleConfig,
    add_noise,
    cfg_combine,
    cfg_scales,
    euler_step,
    flux_mu,
    get_sigmas,
    img2img_start,
    noise_from_velocity,
    sample_euler,
    sigma_from_time,
    time_from_sigma,
    static_shift,
    velocity,
    x0_from_velocity,
)


def reference_sigmas(num_steps, **scheduler_kwargs):
    """diffusers 0.42's Z-Image schedule: linspace(1, 1/N, N) through the scheduler."""
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_kwargs)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / num_steps, num_steps).tolist())
    return scheduler


# -- time convention ---------------------------------------------------------------------------


def test_model_time_is_one_minus_sigma():
    assert time_from_sigma(0.25) == 0.75
    assert sigma_from_time(0.75) == 0.25
    assert time_from_sigma(1.0) == 0.0  # pure noise is t = 0 for the DiT


def test_conversions_between_velocity_x0_and_noise_invert_each_other():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    sigma = 0.3
    x = add_noise(x0, noise, sigma)
    torch.testing.assert_close(x, 0.7 * x0 + 0.3 * noise)  # PAPER eq. 1 with t = 0.7
    v = velocity(x0, noise)
    torch.testing.assert_close(x0_from_velocity(x, v, sigma), x0)
    torch.testing.assert_close(noise_from_velocity(x, v, sigma), noise)


def test_add_noise_matches_the_reference_scale_noise():
    scheduler = reference_sigmas(4, shift=3.0)
    scheduler.set_begin_index(1)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    expected = scheduler.scale_noise(x0, scheduler.timesteps[1:2], noise)
    assert torch.equal(add_noise(x0, noise, scheduler.sigmas[1]), expected)


# -- schedule ----------------------------------------------------------------------------------


def test_time_shift_closed_form():
    assert static_shift(0.5, 3.0) == pytest.approx(0.75)  # 1.5 / 2
    assert static_shift(1.0, 3.0) == 1.0 and static_shift(0.0, 3.0) == 0.0
    assert static_shift(0.3, 1.0) == pytest.approx(0.3)


def test_turbo_eight_step_schedule_is_the_published_one():
    # spec §4: Turbo σ' for 8 NFEs.
    expected = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]
    assert get_sigmas(8, ScheduleConfig()).tolist() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("num_steps", [1, 4, 8, 50])
def test_static_shift_schedule_equals_diffusers(num_steps):
    scheduler = reference_sigmas(num_steps, shift=3.0)
    assert torch.equal(get_sigmas(num_steps, ScheduleConfig(shift=3.0)), scheduler.sigmas)


def test_n_steps_are_n_transformer_calls():
    sigmas = get_sigmas(8, ScheduleConfig())
    assert len(sigmas) == 9 and sigmas[-1] == 0 and (sigmas[:-1] > 0).all()


def test_flux_mu_endpoints():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)


def test_dynamic_shift_schedule_equals_diffusers():
    seq_len = 1024
    mu = flux_mu(seq_len)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / 6, 6).tolist(), mu=mu)
    ours = get_sigmas(6, ScheduleConfig(use_dynamic_shifting=True), image_seq_len=seq_len)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_steps,strength", [(4, 0.6), (4, 1.0), (25, 0.56), (8, 0.05), (50, 0.33)])
def test_img2img_start_equals_diffusers_get_timesteps(num_steps, strength):
    scheduler = reference_sigmas(num_steps, shift=3.0)
    _, steps_run = ZImageImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), num_steps, strength, "cpu")
    assert num_steps - img2img_start(num_steps, strength) == steps_run


def test_img2img_strength_hand_worked():
    assert img2img_start(4, 0.6) == 1  # 4·0.6 = 2.4 → skip int(1.6) = 1, run 3
    assert img2img_start(4, 1.0) == 0
    # float arithmetic as in diffusers: 25·0.56 = 14.000000000000002 → skip int(10.99…) = 10, run 15
    assert img2img_start(25, 0.56) == 10


# -- Euler step and sampler --------------------------------------------------------------------


def test_euler_step_equals_the_reference_scheduler_step():
    scheduler = reference_sigmas(4, shift=3.0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 4, 4, generator=g)
    sigmas = get_sigmas(4, ScheduleConfig())
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(1, 16, 4, 4, generator=g)
        expected = scheduler.step(-v, t, x, return_dict=False)[0]  # the reference negates the DiT output
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        assert torch.equal(x, expected)


def test_sampler_follows_a_straight_path_exactly_to_the_data():
    # For one data point the true velocity is the constant x0 − ε, so Euler is exact.
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    calls = []
    out = sample_euler(
        lambda x, sigma, i: calls.append(i) or velocity(x0, noise), noise, get_sigmas(5, ScheduleConfig())
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    assert calls == [0, 1, 2, 3, 4]


def test_callback_sees_every_step_with_sigma_and_denoised():
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(1, 16, 2, 2, generator=g), torch.randn(1, 16, 2, 2, generator=g)
    sigmas = get_sigmas(3, ScheduleConfig())
    seen = []
    sample_euler(lambda x, sigma, i: velocity(x0, noise), noise, sigmas, callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2]
    assert [float(s["sigma"]) for s in seen] == sigmas[:-1].tolist()
    assert [float(s["sigma_next"]) for s in seen] == sigmas[1:].tolist()
    torch.testing.assert_close(seen[0]["x"], noise)
    for step in seen:  # on a straight path every step's x̂0 is the data point
        torch.testing.assert_close(step["denoised"], x0, rtol=0, atol=1e-5)


# -- guidance ----------------------------------------------------------------------------------


def test_cfg_is_pos_plus_w_times_difference():
    pos, neg = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.0]])
    torch.testing.assert_close(cfg_combine(pos, neg, 2.0), torch.tensor([[2.0, 6.0]]))
    torch.testing.assert_close(cfg_combine(pos, neg, 0.0), pos)


def test_cfg_normalization_caps_the_norm_per_sample():
    pos = torch.tensor([[3.0, 4.0], [3.0, 4.0]])  # ‖pos‖ = 5
    neg = torch.tensor([[0.0, 0.0], [2.9, 3.9]])
    out = cfg_combine(pos, neg, 1.0, normalization=1.0)
    # sample 0: pred = (6, 8), ‖·‖ = 10 > 5 → rescaled to (3, 4); sample 1: (3.1, 4.1) ≈ 5.14 > 5 → capped too
    torch.testing.assert_close(out[0], torch.tensor([3.0, 4.0]))
    assert torch.linalg.vector_norm(out[1]).item() == pytest.approx(5.0)
    # a generous cap leaves the prediction alone
    torch.testing.assert_close(cfg_combine(pos, neg, 1.0, normalization=3.0), cfg_combine(pos, neg, 1.0))


def test_cfg_truncation_turns_guidance_off_late():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0])  # t = 0, 0.25, 0.5
    assert cfg_scales(sigmas, 4.0, cfg_truncation=0.3) == [4.0, 4.0, 0.0]
    assert cfg_scales(sigmas, 4.0, cfg_truncation=1.0) == [4.0, 4.0, 4.0]
