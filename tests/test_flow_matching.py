"""Flow-matching pre-training: the Z-Image convention, caption dropout, noise levels, and a real run."""

import dataclasses

import pytest
import torch
from torch import nn

from zimagekit.algorithms.flow_matching import FlowMatching, FlowMatchingConfig, FlowSection
from zimagekit.s3dit import S3DiT, S3DiTConfig
from zimagekit.sampling import ScheduleConfig, shift_sigmas, training_sigmas
from zimagekit.trainer import IndexDataSource, Trainer, seed_everything


class Recorder(nn.Module):
    """Stands in for the S3-DiT: records its inputs and predicts zero velocity."""

    config = S3DiTConfig.preset("tiny")

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, captions):
        self.calls.append((x.clone(), t.clone(), captions))
        return torch.zeros_like(x)


def test_noising_and_target_follow_paper_eq1():
    """With x0 = c constant: x_t = t·c + (1 − t)·ε, so ε = (x_t − t·c)/(1 − t), and the target
    is v = c − ε; a zero prediction must then cost exactly mean(v²)."""
    torch.manual_seed(0)
    c = 0.7
    x0 = torch.full((4, 16, 1, 4, 4), c)
    model = Recorder()
    algo = FlowMatching(model, FlowSection(caption_dropout=0.0), empty_caption=torch.zeros(3, 64))
    loss = algo.training_step({"latents": x0, "captions": [torch.ones(5, 64)] * 4}, step=1)["transformer"]
    x_t, t, _ = model.calls[0]
    assert ((t > 0) & (t < 1)).all()
    tt = t.view(-1, 1, 1, 1, 1)
    eps = (x_t - tt * c) / (1 - tt)
    assert eps.std().item() == pytest.approx(1.0, abs=0.1)  # it really is the unit Gaussian
    assert loss.item() == pytest.approx((c - eps).square().mean().item(), rel=1e-4)


def test_list_batches_use_the_same_convention():
    torch.manual_seed(1)
    c = -0.4
    x0 = [torch.full((16, 1, 4, 4), c), torch.full((16, 1, 6, 2), c)]
    model = Recorder()
    model.forward = lambda x, t, caps: model.calls.append((x, t, caps)) or [torch.zeros_like(xi) for xi in x]
    algo = FlowMatching(model, FlowSection(caption_dropout=0.0), empty_caption=torch.zeros(3, 64))
    loss = algo.training_step({"latents": x0, "captions": [torch.ones(5, 64)] * 2}, step=1)["transformer"]
    x_t, t, _ = model.calls[0]
    v = [c - (xi - ti * c) / (1 - ti) for xi, ti in zip(x_t, t.tolist())]
    assert loss.item() == pytest.approx(sum(vi.square().sum() for vi in v).item() / sum(vi.numel() for vi in v), rel=1e-4)


@pytest.mark.parametrize("p, expect_empty", [(0.0, False), (1.0, True)])
def test_caption_dropout_swaps_in_the_empty_prompt(p, expect_empty):
    model = Recorder()
    empty, caption = torch.zeros(3, 64), torch.ones(5, 64)
    algo = FlowMatching(model, FlowSection(caption_dropout=p), empty_caption=empty)
    algo.training_step({"latents": torch.zeros(3, 16, 1, 4, 4), "captions": [caption] * 3}, step=1)
    assert all((c is empty) == expect_empty for c in model.calls[0][2])


@pytest.mark.parametrize("schedule, seq", [(ScheduleConfig(shift=3.0), None), (ScheduleConfig(use_dynamic_shifting=True), 64)])
def test_training_noise_levels_are_shifted_logit_normal(schedule, seq):
    """sigmoid(N(0, 1)) has median 1/2; the shift is monotone, so the median of the training
    σ is shift(1/2) — the same shift the sampler applies."""
    sigma = training_sigmas(40_000, schedule, seq, generator=torch.Generator().manual_seed(0))
    assert sigma.median().item() == pytest.approx(float(shift_sigmas(torch.tensor(0.5), schedule, seq)), abs=0.01)
    assert ((sigma > 0) & (sigma < 1)).all()


def test_a_tiny_s3dit_learns_two_captioned_latents(tmp_path):
    """Two fixed latents, each with its own caption: flow matching must lower the loss."""
    seed_everything(0)
    cfg = FlowMatchingConfig(model=S3DiTConfig(dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                               cap_feat_dim=16, axes_dims=(8, 12, 12), axes_lens=(64, 16, 16)))
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(tmp_path), name="fm"),
                              train=dataclasses.replace(cfg.train, steps=120, batch_size=4, log_every=10, ckpt_every=120,
                                                        progress=False),
                              optim=dataclasses.replace(cfg.optim, lr=3e-3, warmup_steps=5))
    model = S3DiT(cfg.model)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 1, 4, 4, generator=g).sign()
    captions = [torch.randn(6, 16, generator=g), torch.randn(9, 16, generator=g)]
    algo = FlowMatching(model, cfg.flow, empty_caption=torch.zeros(2, 16))
    losses = []
    original = algo.training_step
    algo.training_step = lambda batch, step: (out := original(batch, step)) and losses.append(out["transformer"].item()) or out
    pairs = lambda idx: [i % 2 for i in idx]  # 8 items: each of the two (latent, caption) pairs 4 times
    data = IndexDataSource(lambda idx: {"latents": latents[pairs(idx)], "captions": [captions[i] for i in pairs(idx)]}, 8, 4)
    Trainer(cfg, algo, data).fit()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first
