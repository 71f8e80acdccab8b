"""The trainer's configuration: the run, optimizer, loop, EMA and sample-grid sections, and the
learning-rate schedule they define."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..runconfig import require_config


@dataclass
class RunConfig:
    dir: str = "runs"
    name: str = "run"  # the run lives in <dir>/<name>
    seed: int = 0  # seeds python, numpy and torch at the start of a fresh run
    # Continue from <dir>/<name>/checkpoints/latest if there is one, else start fresh there.
    # Without it an existing, non-empty run directory is an error: runs are never overwritten.
    resume: bool = False

    def __post_init__(self):
        require_config(bool(self.name.strip()), "run.name", "is empty; give the run a name")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    min_lr: float = 0.0  # where the cosine ends, at train.steps
    grad_clip: float | None = 1.0  # max global L2 norm per module group; null: no clipping

    def __post_init__(self):
        require_config(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        require_config(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must lie in [0, 1), got {list(self.betas)}")
        require_config(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        require_config(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require_config(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require_config(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must lie in [0, optim.lr], got {self.min_lr}")
        require_config(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "must be > 0 or null")


@dataclass
class LoopConfig:
    steps: int = 1000  # optimizer updates in the whole run
    batch_size: int = 8  # samples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per update: the update sees batch_size * this
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast forward, fp32 master weights
    log_every: int = 10
    ckpt_every: int = 500  # 0: only at the end; a checkpoint is always written at the end
    sample_every: int = 0  # 0: never
    keep_last_ckpts: int = 3  # older checkpoints keep weights and EMA only, not optimizer state
    progress: bool = True

    def __post_init__(self):
        for key in ("steps", "batch_size", "grad_accum_steps", "log_every", "keep_last_ckpts"):
            require_config(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("ckpt_every", "sample_every"):
            require_config(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0 (0 turns it off), got {getattr(self, key)}")


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    start_step: int = 0  # through this step the EMA copies the weights instead of averaging

    def __post_init__(self):
        require_config(0 <= self.decay <= 1, "ema.decay", f"must lie in [0, 1], got {self.decay}")
        require_config(self.start_step >= 0, "ema.start_step", f"must be >= 0, got {self.start_step}")


@dataclass
class SampleConfig:
    # The grid has one row per prompt and one column per seed, the same at every sampling
    # step, so successive grids show the same images evolving.
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    use_ema: bool = True  # sample with the EMA weights of the groups that keep one

    def __post_init__(self):
        require_config(bool(self.seeds), "sample.seeds", "is empty; list at least one seed")


@dataclass
class TrainConfig:
    """Everything the loop needs. An algorithm adds its own section by subclassing::

        @dataclass
        class FlowMatchingConfig(TrainConfig):
            flow: FlowSection = field(default_factory=FlowSection)
    """

    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # Peak FLOP/s of one device (e.g. 989e12 for an H100's dense bf16); null: MFU not logged.
    mfu_peak_flops: float | None = None

    def __post_init__(self):
        require_config(self.mfu_peak_flops is None or self.mfu_peak_flops > 0, "mfu_peak_flops", "must be > 0 or null")


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate of update ``step`` (from 1): ``lr * step / warmup_steps`` during warm-up,
    then ``lr`` (constant) or a half cosine from ``lr`` to ``min_lr`` at ``total_steps``.

    The rate is a pure function of the step, so resuming needs no scheduler state."""
    if step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))
