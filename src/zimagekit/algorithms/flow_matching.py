"""Flow-matching pre-training of the S3-DiT (Z-Image §4.1; PAPER eq. 1).

    x_t = t·x + (1 − t)·ε,   v = x − ε,   L = E ‖S3DiT(x_t, t, c) − v‖²

with t = 1 − σ (0 is noise). σ is drawn logit-normal and shifted by the same rule the
sampler uses (:func:`zimagekit.sampling.training_sigmas`), and with probability
``caption_dropout`` a sample's caption features are replaced by those of the empty prompt,
which is what classifier-free guidance later contrasts against. All maths comes from
:mod:`zimagekit.sampling`; this file only wires it to the trainer.

A batch is ``{"latents": (B, C, 1, H, W) tensor or list of (C, 1, H, W), "captions": list of
(L_i, cap_feat_dim)}``: latents already VAE-encoded and scaled, captions already encoded
(both encoders are frozen, so datasets cache them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ZImageKitError
from ..s3dit import S3DiT, S3DiTConfig, forward_flops
from ..sampling import ScheduleConfig, add_noise, time_from_sigma, training_sigmas, velocity
from ..trainer import Algorithm, TrainConfig


@dataclass
class FlowSection:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    caption_dropout: float = 0.1
    # The shift applied to training noise levels; the exported model's scheduler gets the same.
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(use_dynamic_shifting=True))


@dataclass
class FlowMatchingConfig(TrainConfig):
    model: S3DiTConfig = field(default_factory=lambda: S3DiTConfig.preset("tiny"))
    flow: FlowSection = field(default_factory=FlowSection)


Sampler = Callable[[S3DiT, list[str], list[int]], list]


class FlowMatching(Algorithm):
    """Trains one module, ``transformer``. ``empty_caption`` is the (L, cap_feat_dim) feature
    of the empty prompt; ``sampler(model, prompts, seeds)`` draws the trainer's sample grid;
    ``tokens_per_sample`` = (image tokens, caption tokens) of a typical sample, for MFU.

    ``data_parallel`` = (rank, world size): this process trains slice ``rank`` of a global
    batch ``world size`` times its own (``IndexDataSource``'s split). Noise levels, caption
    dropout and noise are drawn for the whole global batch (every rank's RNG is the same)
    and sliced, so a run does not depend on how its global batch is split."""

    def __init__(self, model: S3DiT, flow: FlowSection, empty_caption: torch.Tensor, sampler: Sampler | None = None,
                 tokens_per_sample: tuple[int, int] | None = None, data_parallel: tuple[int, int] = (0, 1)):
        self.model = model
        self.flow = flow
        self.empty_caption = empty_caption
        self.sampler = sampler
        self.tokens_per_sample = tokens_per_sample
        self.data_parallel = data_parallel

    def modules(self):
        return {"transformer": self.model}

    def training_step(self, batch, step):
        x0, captions = batch["latents"], list(batch["captions"])
        tokens = lambda latent: self.model.config.image_tokens(*latent.shape[-2:], latent.shape[-3])  # (C, F, H, W)
        rank, world = self.data_parallel
        mine = slice(rank * len(x0), (rank + 1) * len(x0))
        if torch.is_tensor(x0):
            seq = [tokens(x0[0])] * len(x0)
            sigma = training_sigmas(world * len(x0), self.flow.schedule, seq[0], self.flow.logit_mean,
                                    self.flow.logit_std)[mine]
        else:  # mixed sizes (aspect buckets): each sample is shifted by its own token count
            if world > 1:
                raise ZImageKitError("a batch of mixed-size latents cannot be split over processes; give each "
                                     "batch one size (aspect buckets) for data-parallel training")
            seq = [tokens(xi) for xi in x0]
            sigma = torch.cat([training_sigmas(1, self.flow.schedule, n, self.flow.logit_mean, self.flow.logit_std) for n in seq])
        drop = (torch.rand(world * len(captions)) < self.flow.caption_dropout)[mine]
        captions = [self.empty_caption if d else c for c, d in zip(captions, drop.tolist())]

        def per_sample(values, like):  # noise levels are drawn on the CPU
            return values.to(like).view(-1, *([1] * (like.ndim - 1)))

        if torch.is_tensor(x0):
            noise = torch.randn((world * len(x0), *x0.shape[1:]), dtype=x0.dtype, device=x0.device)[mine]
            x_t = add_noise(x0, noise, per_sample(sigma, x0))
            pred = self.model(x_t, time_from_sigma(sigma), captions)
            loss = F.mse_loss(pred.float(), velocity(x0, noise).float())
        else:
            noise = [torch.randn_like(xi) for xi in x0]
            x_t = [add_noise(xi, ni, si) for xi, ni, si in zip(x0, noise, sigma.tolist())]
            pred = self.model(x_t, time_from_sigma(sigma), captions)
            # Mean over every latent element of the batch, as in the tensor case.
            sq = sum((pi.float() - velocity(xi, ni).float()).square().sum() for pi, xi, ni in zip(pred, x0, noise))
            loss = sq / sum(xi.numel() for xi in x0)
        return {"transformer": loss}

    def flops_per_sample(self):
        if self.tokens_per_sample is None:
            return None
        img, cap = self.tokens_per_sample
        return 3 * forward_flops(self.model.config, [img], [cap])  # forward + backward ≈ 3 forwards

    def sample(self, prompts, seeds):
        if self.sampler is None:
            return super().sample(prompts, seeds)
        return self.sampler(self.model, prompts, seeds)


class LoRAFlowMatching(FlowMatching):
    """Flow matching whose trained module is a LoRA on the (frozen) transformer."""

    def __init__(self, lora, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora = lora

    def modules(self):
        return {"lora": self.lora}

    def training_step(self, batch, step):
        return {"lora": super().training_step(batch, step)["transformer"]}
