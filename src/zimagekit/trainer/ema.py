"""The exponential moving average of a module's weights."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ZImageKitError


class EMA:
    """Exponential moving average of a module's parameters, as DiT keeps in every checkpoint.

    ``update(step)`` after update ``step``: ``ema <- decay * ema + (1 - decay) * param``,
    except through ``start_step``, where it copies the weights (early weights are far from
    the final ones and would only drag the average)."""

    def __init__(self, module: nn.Module, decay: float, start_step: int):
        self.decay, self.start_step = decay, start_step
        self.params = dict(module.named_parameters())
        self.shadow = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        for name, p in self.params.items():
            if step <= self.start_step:
                self.shadow[name].copy_(p)
            else:
                self.shadow[name].lerp_(p, 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The module holds the EMA weights inside the block, its own weights after."""
        with torch.no_grad():
            backup = {name: p.detach().clone() for name, p in self.params.items()}
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ZImageKitError("the checkpoint's EMA names other parameters than the model; resume with the "
                                 "same model config or start a new run")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
