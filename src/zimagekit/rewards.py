"""Rewards for RL post-training, behind one interface.

A reward is any callable ``reward(images, prompts) -> tensor``: ``images`` is a ``(B, 3, H, W)``
float batch in [0, 1] on the model's device, ``prompts`` the B prompts, and the result is
``(B,)``, one score per image, higher is better. A reward that sets ``differentiable = True``
keeps its graph to the pixels, so ReFL can back-propagate through it; the others are called
under ``torch.no_grad``.

Configs name a reward as ``module:Name`` (a class, built with no arguments, or a function);
the shapes world's live in :mod:`zimagekit.shapes.rewards`. Models that score PIL images
(HPSv3, ImageReward, PickScore and the like) plug in through :class:`PILReward`.
:func:`score` calls a reward and checks what comes back, so a broken reward stops a run with
one line instead of training on NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .errors import ZImageKitError
from .runconfig import import_object


class Reward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


def load_reward(spec: str) -> Reward:
    """The reward ``module:Name`` names: an instance of the class, or the function itself."""
    target = import_object(spec, "reward")
    reward = target() if isinstance(target, type) else target
    if not callable(reward):
        raise ZImageKitError(f"reward {spec!r} is not callable; give a class or a function (images, prompts) -> scores")
    return reward


def reward_name(reward) -> str:
    return getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__


def score(reward: Reward, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """``reward(images, prompts)`` as a float tensor of shape ``(B,)`` on the images' device;
    a reward that returns anything else, or a NaN or infinite score, raises one
    :class:`ZImageKitError` naming the reward and the image."""
    out = reward(images, list(prompts))
    name = reward_name(reward)
    if not isinstance(out, torch.Tensor):
        try:
            out = torch.as_tensor(out, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ZImageKitError(f"reward {name} returned a {type(out).__name__}; return one number per image") from None
    if out.shape != (len(images),):
        raise ZImageKitError(f"reward {name} returned shape {tuple(out.shape)} for {len(images)} images; return a "
                             f"({len(images)},) tensor, one score per image")
    bad = (~torch.isfinite(out.detach())).nonzero().flatten().tolist()
    if bad:
        raise ZImageKitError(f"reward {name} returned {out[bad[0]].item()} for image {bad[0]} (prompt "
                             f"{prompts[bad[0]]!r}); a reward must be finite")
    return out.float().to(images.device)


class PILReward:
    """Adapter for a scorer of PIL images: ``fn(pil_images, prompts)`` returns one number per
    image (a list, array or tensor). Images go to it in batches of ``batch_size``, as 8-bit
    RGB, which is what such models' own preprocessing expects. Not differentiable."""

    differentiable = False

    def __init__(self, fn: Callable[[list, list[str]], Sequence[float]], batch_size: int = 16, name: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.fn, self.batch_size = fn, batch_size
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores = []
        for i in range(0, len(pixels), self.batch_size):
            batch = [Image.fromarray(p) for p in pixels[i:i + self.batch_size]]
            scores.append(torch.as_tensor(self.fn(batch, list(prompts[i:i + self.batch_size])), dtype=torch.float32)
                          .flatten())
        return torch.cat(scores).to(images.device)
