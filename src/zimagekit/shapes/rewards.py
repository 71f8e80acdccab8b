"""Rewards in the shapes world, for ``zimagekit rl`` (interface: :mod:`zimagekit.rewards`).

* :class:`JudgeReward`: the judge's verdict, graded by how far an image gets through its
  checks (count, then shapes, then colours, then the relation): 0, 0.25, 0.5, 0.75, 1. The
  hard reward for GRPO and DPO, and the held-out metric is its 0/1 form.
* :class:`SoftColourReward`: a differentiable surrogate for ReFL: per named colour, how much of
  the expected pixel mass of that colour the image holds (soft palette masks, capped at the
  expected mass; objects without a colour draw on any colour), minus the coloured mass beyond
  what the prompt's objects cover. It sees colour and, through the mass, roughly count; it
  does not see shape or position.
* :class:`ColourMassReward`: hackable on purpose, for the reward-hacking control: the mean
  soft membership of the *named* colours over the whole canvas. An image is paid for every
  pixel of a named colour, so painting the canvas that colour beats drawing the scene.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import world
from .judge import judge_image

# How far an image got through the judge's checks (judge_image fails on the first of them).
JUDGE_STAGES = {"count": 0.0, "shape": 0.25, "color": 0.5, "position": 0.75}

_PALETTE = torch.tensor([world.COLORS[c] for c in world.COLORS], dtype=torch.float32) / 255
_BACKGROUND = torch.tensor(world.BACKGROUND, dtype=torch.float32) / 255
# A world object's area in pixels, by shape, at the mean box side of 16 px (boxes are 12-20).
_MEAN_AREA = {"circle": np.pi * 8**2, "square": 16.0**2, "triangle": 16.0**2 / 2}


def _expected_mass(prompt: str) -> tuple[dict[str, float], float]:
    """Expected pixel fraction of each colour the prompt names, and of its objects that name
    no colour."""
    named: dict[str, float] = {}
    anonymous = 0.0
    for obj in world.parse_prompt(prompt).objects:
        area = _MEAN_AREA[obj.shape] / world.CANVAS**2
        if obj.color is None:
            anonymous += area
        else:
            named[obj.color] = named.get(obj.color, 0.0) + area
    return named, anonymous


def _memberships(images: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """(B, colours, H, W) soft palette membership of each pixel: a softmax over the six colours
    and the background of −‖pixel − colour‖² / temperature (RGB in [0, 1])."""
    centres = torch.cat([_PALETTE, _BACKGROUND[None]]).to(images)  # (7, 3)
    distance = ((images[:, None] - centres[None, :, :, None, None]) ** 2).sum(2)  # (B, 7, H, W)
    return torch.softmax(-distance / temperature, dim=1)[:, :-1]


class JudgeReward:
    name = "judge"
    differentiable = False

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        scores = []
        for image, prompt in zip(pixels, prompts):
            verdict = judge_image(image, prompt)
            scores.append(1.0 if verdict.correct else JUDGE_STAGES[verdict.reason.split(":")[0].removeprefix("wrong ")])
        return torch.tensor(scores, device=images.device)


class SoftColourReward:
    name = "soft_colour"
    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        mass = _memberships(images.float()).mean(dim=(2, 3))  # (B, colours): fraction of the canvas
        names = list(world.COLORS)
        one = mass.new_tensor(1.0)
        scores = []
        for b, prompt in enumerate(prompts):
            named, anonymous = _expected_mass(prompt)
            terms = [torch.minimum(mass[b, names.index(c)] / e, one) for c, e in named.items()]
            if anonymous:
                pool = (mass[b].sum() - sum(mass[b, names.index(c)] for c in named)).clamp_min(0)
                terms.append(torch.minimum(pool / anonymous, one))
            expected = sum(named.values()) + anonymous
            excess = (mass[b].sum() - expected).clamp_min(0) / expected
            scores.append(torch.stack(terms).mean() - excess)
        return torch.stack(scores)


class ColourMassReward:
    name = "colour_mass"
    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        mass = _memberships(images.float()).mean(dim=(2, 3))
        names = list(world.COLORS)
        scores = []
        for b, prompt in enumerate(prompts):
            named = [names.index(c) for c in _expected_mass(prompt)[0]] or list(range(len(names)))
            scores.append(mass[b, named].sum())
        return torch.stack(scores)
