"""What the loop drives: an :class:`Algorithm` names the trained modules and the loss of each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ZImageKitError
from .config import OptimConfig

if TYPE_CHECKING:
    from PIL import Image


class TrainingDiverged(ZImageKitError):
    """A loss or gradient became NaN or infinite; nothing was saved after it."""


class Algorithm:
    """A training method: the modules it trains and the loss of each.

    Module groups are the unit of optimisation: each name in :meth:`modules` gets its own
    AdamW, learning rate, gradient clipping and (optionally) EMA. A plain method has one
    group; Decoupled-DMD has two, ``student`` and ``fake_score``, and its two-time-scale
    rule is just which losses :meth:`training_step` returns: ``{"fake_score": l}`` on most
    steps, both on every k-th. Frozen modules (the teacher, a reward model) are not groups;
    the algorithm keeps them with ``requires_grad`` off.
    """

    # Groups that keep an EMA when ema.enabled; None: all of them. DMD keeps one for the
    # student only: the fake score's EMA would never be used.
    ema_groups: tuple[str, ...] | None = None
    # Extra columns of the metric log (e.g. an RL run's mean reward), filled from metrics().
    metric_names: tuple[str, ...] = ()

    def modules(self) -> dict[str, nn.Module]:
        """The trained modules by group name (letters, digits, underscores), the same
        objects on every call."""
        raise NotImplementedError

    def training_step(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """Scalar loss per group to update on this step. Called ``grad_accum_steps`` times
        per update (once per micro-batch, same ``step``), under autocast when precision is
        bf16. Each loss is back-propagated into its own group's parameters only, so a loss
        may read another group's modules without pushing gradients into them.

        A group's loss may instead be an iterable (a generator) of scalar parts whose sum is
        the loss: the trainer back-propagates each part as soon as it is produced, so only one
        part's graph is in memory at a time (Flow-GRPO's step-by-step backward). Parts are
        summed into the logged loss; a non-finite sum stops the run before the optimizer step."""
        raise NotImplementedError

    def optim_config(self, group: str, base: OptimConfig) -> OptimConfig:
        """The optimizer settings of ``group``; ``base`` is the config's ``optim`` section.
        Override to give a group its own lr or weight decay (``dataclasses.replace``)."""
        return base

    def flops_per_sample(self) -> float | None:
        """Training FLOPs (forward + backward) per sample, for MFU; None: not logged."""
        return None

    def metrics(self) -> dict[str, float]:
        """The latest value of each of ``metric_names`` (a subset is fine, the same on every
        process: missing ones stay empty in that row), read at every log step; the logged
        value is the mean over processes."""
        return {}

    def sample(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """One image per (prompt, seed) pair, in order; used for the sample grid. Runs
        under ``torch.no_grad`` with modules in eval mode; it may draw from the global RNGs,
        which the trainer restores afterwards so sampling never changes training."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Extra state to checkpoint (e.g. ``{"gen": g.get_state()}`` for a torch.Generator
        the algorithm owns): tensors, numbers, strings, lists, tuples and dicts."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
