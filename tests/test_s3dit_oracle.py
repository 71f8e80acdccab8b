"""S3DiT equals diffusers' ZImageTransformer2DModel on the same random weights."""

import pytest
import torch

from s3dit_oracle import CONFIGS, max_rel_err, mixed_batch, oracle_and_ours
from zimagekit.s3dit import RowAlignedLinear

FP32_TOL = 1e-5  # max |ours - oracle| <= 1e-5 * max |oracle|


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_matches_oracle_on_mixed_sizes_and_times(name):
    ref, ours = oracle_and_ours(CONFIGS[name])
    x, t, caps = mixed_batch(CONFIGS[name])
    with torch.no_grad():
        expected = ref(x, t, caps).sample
        got = ours(x, t, caps)
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert max_rel_err(got, expected) <= FP32_TOL


@pytest.mark.parametrize("t", [0.0, 0.37, 1.0])
def test_cfg_batch_equal_images_unequal_captions(t):
    """The pipeline's CFG batch: one latent size, positive and negative captions of
    different lengths, so only the caption and unified streams need a batch mask."""
    cfg = CONFIGS["2heads"]
    ref, ours = oracle_and_ours(cfg)
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(1, cfg.in_channels, 1, 10, 6, generator=g).expand(2, -1, -1, -1, -1).contiguous()
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in (33, 9)]
    tt = torch.full((2,), t)
    with torch.no_grad():
        expected = ref(list(lat), tt, caps).sample
        got_list = ours(list(lat), tt, caps)
        got_batched = ours(lat, tt, caps)
    assert max_rel_err(got_list, expected) <= FP32_TOL
    assert max_rel_err(list(got_batched), expected) <= FP32_TOL


def test_single_sample_and_batched_tensor_entry_point():
    cfg = CONFIGS["4heads_2refiners"]
    ref, ours = oracle_and_ours(cfg)
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(2, cfg.in_channels, 1, 8, 12, generator=g)
    caps = torch.randn(2, 20, cfg.cap_feat_dim, generator=g)
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        expected = ref(list(lat), t, list(caps)).sample
        got = ours(lat, t, caps)
        one = ours([lat[0]], t[:1], [caps[0]])
    assert got.shape == lat.shape
    assert max_rel_err(list(got), expected) <= FP32_TOL
    assert max_rel_err(one, expected[:1]) <= FP32_TOL


def test_swiglu_projection_with_aligned_rows_computes_the_plain_product():
    """The fused w1/w3 width at dim 64 is 2 * 170 = 340, not a multiple of 16 floats, so
    without autograd its rows are padded to 352 in memory; the values must still be x W^T
    (checked in float64); with autograd it must still give the right gradient, and under
    autocast it must compute in bf16 like any Linear."""
    torch.manual_seed(6)
    layer = RowAlignedLinear(64, 340)
    x = torch.randn(3, 5, 64)
    exact = x.double() @ layer.weight.double().T
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (3, 5, 340) and got.stride()[-2:] == (352, 1)
    assert (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    xg = x.clone().requires_grad_()
    out = layer(xg)
    out.square().sum().backward()
    assert (out.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    expected_grad = 2 * exact @ layer.weight.double()
    assert (xg.grad.double() - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_input_and_parameter_gradients_match_oracle():
    cfg = CONFIGS["2heads"]
    ref, ours = oracle_and_ours(cfg)
    x, t, caps = mixed_batch(cfg)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(xi.shape, generator=g) for xi in x]

    def grads(model, run):
        xs = [xi.clone().requires_grad_() for xi in x]
        cs = [ci.clone().requires_grad_() for ci in caps]
        out = run(model, xs, cs)
        loss = sum((o * w).sum() for o, w in zip(out, weights))
        picked = [dict(model.named_parameters())[k] for k in PARAMS]
        return torch.autograd.grad(loss, xs + cs + picked)

    PARAMS = ["x_pad_token", "cap_pad_token", "layers.0.attention_norm2.weight", "cap_embedder.1.weight",
              "t_embedder.mlp.0.weight", "noise_refiner.0.adaLN_modulation.0.bias"]
    expected = grads(ref, lambda m, xs, cs: m(xs, t, cs).sample)
    got = grads(ours, lambda m, xs, cs: m(xs, t, cs))
    for name, e, o in zip(["x"] * 3 + ["caption"] * 3 + PARAMS, expected, got):
        assert (o - e).abs().max() <= FP32_TOL * e.abs().max(), name


def test_bf16_is_as_close_to_fp32_as_the_oracle_in_bf16():
    """bf16 tolerance, justified: bf16 keeps 8 mantissa bits, so the oracle itself moves
    by some error E when run in bf16. Ours may round differently (fused GEMMs, real RoPE),
    but must be no further from the exact fp32 answer than 1.5 E, and no further from the
    oracle's bf16 output than 2 E."""
    cfg = CONFIGS["2heads"]
    ref, ours = oracle_and_ours(cfg)
    x, t, caps = mixed_batch(cfg)
    with torch.no_grad():
        exact = ref(x, t, caps).sample
        ref_bf16 = ref.to(torch.bfloat16)(
            [xi.bfloat16() for xi in x], t, [ci.bfloat16() for ci in caps]).sample
        ours_bf16 = ours.to(torch.bfloat16)([xi.bfloat16() for xi in x], t, [ci.bfloat16() for ci in caps])
    oracle_err = max_rel_err(ref_bf16, exact)
    assert 1e-4 < oracle_err < 0.1  # bf16 really ran, and the test is meaningful
    assert all(o.dtype == torch.bfloat16 for o in ours_bf16)
    assert max_rel_err(ours_bf16, exact) <= 1.5 * oracle_err
    assert max_rel_err(ours_bf16, ref_bf16) <= 2 * oracle_err


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = CONFIGS["2heads"]
    _, ours = oracle_and_ours(cfg)
    x, t, caps = mixed_batch(cfg)

    def grad_of_x():
        xs = [xi.clone().requires_grad_() for xi in x]
        sum(o.square().sum() for o in ours(xs, t, caps)).backward()
        return [xi.grad for xi in xs]

    plain = grad_of_x()
    ours.gradient_checkpointing = True
    checkpointed = grad_of_x()
    assert max_rel_err(checkpointed, plain) <= 1e-6


def test_torch_compile_matches_eager():
    cfg = CONFIGS["1head_no_qknorm"]
    _, ours = oracle_and_ours(cfg)
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(2, cfg.in_channels, 1, 8, 8, generator=g)
    caps = torch.randn(2, 12, cfg.cap_feat_dim, generator=g)
    t = torch.tensor([0.3, 0.6])
    with torch.no_grad():
        eager = ours(lat, t, caps)
        compiled = torch.compile(ours)(lat, t, caps)
    assert max_rel_err([compiled], [eager]) <= FP32_TOL
