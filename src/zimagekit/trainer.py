"""The one training loop that every algorithm in zimagekit runs on.

An :class:`Algorithm` (flow matching, Decoupled-DMD, DPO, GRPO) says *what* is optimised:
the trained modules and the loss of each on a batch. The :class:`Trainer` does the rest,
once: AdamW per module, warm-up and cosine learning rates, gradient accumulation and
clipping, EMA, bf16 autocast, atomic checkpoints with bit-exact resume, CSV and TensorBoard
logs with throughput and MFU, a sample grid every K steps, and a hard stop on a
non-finite loss. Launch, single process::

    cfg = load_config(MyConfig, "configs/baby.yaml", sys.argv[1:])   # e.g. optim.lr=3e-4
    seed_everything(cfg.run.seed)      # before building models, so their init is reproducible
    Trainer(cfg, MyAlgorithm(cfg), IndexDataSource(make_batch, size, cfg.train.batch_size)).fit()

Step numbers count optimizer updates from 1: ``training_step(batch, step)`` computes update
``step``, the learning rate of update ``step`` is ``lr_at(step, ...)``, and
``checkpoints/step_000000k`` holds the state after update k.

Distributed training plugs in through ``Trainer(parallelize=...)``, applied to the trained
modules before the optimizers are built; models know nothing of it (torchtitan's split).
Both FSDP2's ``fully_shard`` and composable DDP's ``replicate`` wrap a module in place, so
algorithms keep calling their modules directly. Under ``torchrun`` every process runs the
same loop on its slice of each global batch (``IndexDataSource(rank=, world_size=)``);
the logged losses are means over processes, only rank 0 writes the run directory, and
checkpoints hold full tensors that load back on any number of processes
(:mod:`zimagekit.parallel`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, NoReturn, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import parallel
from .errors import ZImageKitError
from .runconfig import require_config, save_config
from .fileio import atomic_write

if TYPE_CHECKING:
    from PIL import Image

# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# What the loop drives: algorithms and data
# ----------------------------------------------------------------------------------------


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

    def modules(self) -> dict[str, nn.Module]:
        """The trained modules by group name (letters, digits, underscores), the same
        objects on every call."""
        raise NotImplementedError

    def training_step(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """Scalar loss per group to update on this step. Called ``grad_accum_steps`` times
        per update (once per micro-batch, same ``step``), under autocast when precision is
        bf16. Each loss is back-propagated into its own group's parameters only, so a loss
        may read another group's modules without pushing gradients into them."""
        raise NotImplementedError

    def optim_config(self, group: str, base: OptimConfig) -> OptimConfig:
        """The optimizer settings of ``group``; ``base`` is the config's ``optim`` section.
        Override to give a group its own lr or weight decay (``dataclasses.replace``)."""
        return base

    def flops_per_sample(self) -> float | None:
        """Training FLOPs (forward + backward) per sample, for MFU; None: not logged."""
        return None

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


class DataSource(Protocol):
    """Batches plus a resumable position: after ``load_state_dict(s)`` the source yields
    exactly the batches it yielded after ``s = state_dict()`` was taken."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class IndexDataSource:
    """Batches of a finite, indexable dataset, ``make_batch(indices)``, in a shuffled order.

    Epoch e visits the ``size`` indices in a permutation drawn from ``(seed, e)`` alone and
    yields ``size // batch_size`` batches (the short remainder is skipped), so the position
    is two integers and batch i is the same whenever and wherever it is drawn. Keep
    ``make_batch`` a deterministic function of the indices (a scene from
    ``shapes.world.sample_scene(index)``, say) and the whole data stream is reproducible.

    With ``buckets`` (a bucket id per index, e.g. an aspect-ratio bucket) every batch comes
    from one bucket: each bucket is shuffled and cut into full batches, and the batches of
    all buckets are shuffled together (a bucket smaller than a batch is never drawn).

    Data-parallel: with ``world_size`` processes the order is cut into global batches of
    ``batch_size * world_size`` items and process ``rank`` gets slice ``rank`` of each, so
    the processes together draw exactly what one process with the global batch would.
    """

    def __init__(self, make_batch: Callable[[list[int]], Any], size: int, batch_size: int, seed: int = 0,
                 buckets=None, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.global_batch = batch_size * world_size
        if batch_size < 1 or size < self.global_batch:
            raise ZImageKitError(f"a dataset of {size} items cannot give batches of {self.global_batch}; "
                                 f"lower train.batch_size or use more data")
        if seed < 0:
            raise ZImageKitError(f"data seed must be >= 0, got {seed}")
        self.make_batch, self.size, self.batch_size, self.seed = make_batch, size, batch_size, seed
        self.rank = rank
        self.buckets = None if buckets is None else np.asarray(buckets)
        if self.buckets is not None:
            if len(self.buckets) != size:
                raise ZImageKitError(f"{len(self.buckets)} bucket ids for {size} items; give one per item")
            if np.bincount(np.unique(self.buckets, return_inverse=True)[1]).max() < self.global_batch:
                raise ZImageKitError(f"no bucket holds a full batch of {self.global_batch}; lower train.batch_size")
        self.epoch, self.offset = 0, 0  # offset counts items drawn in this epoch (whole global batches)
        self._batches_epoch, self._batches = -1, None  # the batch list of epoch _batches_epoch

    def _epoch_batches(self) -> list[np.ndarray]:
        if self._batches_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            bs = self.global_batch
            if self.buckets is None:
                order = rng.permutation(self.size)
                self._batches = [order[i:i + bs] for i in range(0, self.size - bs + 1, bs)]
            else:
                batches = []
                for bucket in np.unique(self.buckets):
                    members = np.flatnonzero(self.buckets == bucket)
                    members = members[rng.permutation(len(members))]
                    batches += [members[i:i + bs] for i in range(0, len(members) - bs + 1, bs)]
                self._batches = [batches[i] for i in rng.permutation(len(batches))]
            self._batches_epoch = self.epoch
        return self._batches

    def next_batch(self) -> Any:
        if self.offset // self.global_batch >= len(self._epoch_batches()):
            self.epoch, self.offset = self.epoch + 1, 0
        batch = self._epoch_batches()[self.offset // self.global_batch]
        self.offset += self.global_batch
        return self.make_batch(batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist())

    def __iter__(self):
        while True:
            yield self.next_batch()

    def _bucket_key(self) -> int:
        return 0 if self.buckets is None else zlib.crc32(np.ascontiguousarray(self.buckets, dtype=np.int64).tobytes())

    def state_dict(self) -> dict:
        # The global batch, not this process's share: a position means the same on any
        # number of processes.
        return {"epoch": self.epoch, "offset": self.offset, "size": self.size, "batch_size": self.global_batch,
                "seed": self.seed, "buckets": self._bucket_key()}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("size", self.size), ("batch_size", self.global_batch), ("seed", self.seed),
                          ("buckets", self._bucket_key())):
            if state.get(key, 0) != mine:
                raise ZImageKitError(f"the checkpoint's data source had {key}={state.get(key)}, this one has {mine}; "
                                     "resume with the same data or start a new run")
        self.epoch, self.offset = state["epoch"], state["offset"]


# ----------------------------------------------------------------------------------------
# EMA and RNG state
# ----------------------------------------------------------------------------------------


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


def load_trained(run_dir: Path, group: str, module: nn.Module, use_ema: bool = True,
                 checkpoint: Path | None = None) -> Path:
    """Load group ``group`` of the run's latest checkpoint (or of ``checkpoint``, one of its
    ``step_*`` directories) into ``module`` (a fresh copy of the trained model): its EMA
    weights by default, else the raw ones. Returns the checkpoint."""
    ckpt = checkpoint
    if ckpt is None:
        ckpt_dir = Path(run_dir) / "checkpoints"
        if not (ckpt_dir / "latest").is_file():
            raise ZImageKitError(f"{run_dir}: no checkpoint to export (checkpoints/latest is missing)")
        ckpt = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    module.load_state_dict(load_file(str(ckpt / f"{group}.safetensors")))
    if use_ema:
        if not (ckpt / f"{group}_ema.safetensors").is_file():
            raise ZImageKitError(f"{ckpt} holds no {group} EMA (the run had ema.enabled=false); export the raw weights")
        ema = EMA(module, decay=0.0, start_step=0)
        ema.load_state_dict(load_file(str(ckpt / f"{group}_ema.safetensors")))
        with torch.no_grad():
            for name, p in ema.params.items():
                p.copy_(ema.shadow[name])
    return ckpt


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _rng_untouched():
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


# ----------------------------------------------------------------------------------------
# Checkpoint files: tensors in safetensors, everything else in JSON, never a pickle
# ----------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 2
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
# The optimizers' state (Adam's two moments: twice the weights) lives in its own file, which
# only the newest checkpoint keeps: older ones are for evaluation, and resume reads the newest.
OPTIMIZER_TENSORS = "optimizer_state.safetensors"


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    # A fresh CPU storage per tensor: safetensors refuses views that share one (fused
    # weights come back from state_dict hooks as chunks), and a GPU tensor must come home.
    return torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t.detach())


def _pack(obj, tensors: dict[str, torch.Tensor], key: str):
    """JSON-able form of a state tree; its tensors move into ``tensors`` under ``key`` paths.
    Tuples and dicts with non-string keys (optimizer states are keyed by int) are tagged so
    that :func:`_unpack` gives back exactly the same structure."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        if key in tensors:
            raise ValueError(f"two checkpoint tensors would share the name {key!r}")
        if isinstance(obj, np.ndarray):
            tensors[key] = torch.from_numpy(np.array(obj, copy=True, order="C"))
            return {"__ndarray__": key}
        tensors[key] = _host_copy(obj)
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _pack(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[_pack(k, tensors, f"{key}.key{i}"), _pack(v, tensors, f"{key}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {key!r} is a {type(obj).__name__}; use tensors, numbers, strings, "
                    f"lists, tuples and dicts")


def _unpack(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["__items__"]}
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    return obj


def _fsync(path: Path) -> None:
    # A rename is atomic against a crashed process; against a power cut the data must reach
    # the disk before the rename that publishes it does.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_STEP_DIR = re.compile(r"step_(\d+)")
_GROUP_NAME = re.compile(r"[A-Za-z0-9_]+")


# ----------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------


class _MetricLog:
    """metrics.csv, plus TensorBoard events when the tensorboard package is installed.

    On resume, rows and events after the resumed step (written by the run that crashed
    after its last checkpoint) are dropped, so the logs read as one uninterrupted run."""

    def __init__(self, run_dir: Path, columns: list[str], resumed_step: int):
        self.columns = columns
        path = run_dir / "metrics.csv"
        kept = []
        if path.exists():
            with path.open(newline="") as fh:
                kept = [row for row in csv.DictReader(fh) if int(row["step"]) <= resumed_step]
        # Rewritten atomically, then appended to: a crash now loses no earlier row.
        def write(tmp: Path):
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
        atomic_write(path, write)
        self._file = path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, columns)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, row: dict) -> None:
        self._csv.writerow({k: ("" if v is None else v) for k, v in row.items()})
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    from PIL import Image

    w = max(im.width for im in images)
    h = max(im.height for im in images)
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


# ----------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------


def _step_of(path: Path) -> int | None:
    """The step a ``step_*`` checkpoint directory is named for; None for any other name."""
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole published checkpoint: its state file parses and names its
    own step, and its tensors are there."""
    try:
        state = json.loads((path / STATE_JSON).read_text())
    except (OSError, ValueError):
        return False
    step = _step_of(path)
    return step is not None and isinstance(state, dict) and state.get("step") == step and \
        (path / STATE_TENSORS).is_file()


class _StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM while training: the first lets the update in flight finish,
    so the loop can save a checkpoint at that step and return; a second one interrupts at
    once. Handlers are installed only in the main thread, where Python runs them, and the old
    ones come back with :meth:`restore`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.name is not None:
            self.restore()
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any process was asked to stop (all processes must save together)."""
        return parallel.mean_over_ranks([float(self.name is not None)])[0] > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Trainer:
    """Runs ``algorithm`` on batches from ``data`` as ``cfg`` says, in ``<run.dir>/<run.name>``.

    Construction prepares everything: it checks the config against the algorithm, applies
    ``parallelize`` to the trained modules, builds one AdamW (and EMA) per group, and either
    resumes from the run's latest checkpoint (``run.resume``) or seeds a fresh run. Public
    state: ``step`` (updates done), ``optimizers`` and ``emas`` by group, ``run_dir``,
    ``last_checkpoint``.
    """

    def __init__(self, cfg: TrainConfig, algorithm: Algorithm, data: DataSource,
                 parallelize: Callable[[dict[str, nn.Module]], None] | None = None):
        self.cfg, self.algorithm, self.data = cfg, algorithm, data
        self.run_dir = Path(cfg.run.dir) / cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._sizes_logged = False  # the first checkpoint's sizes go into the log once

        self.modules = algorithm.modules()
        self._check_algorithm()
        if parallelize is not None:
            parallelize(self.modules)
        self.device = next(next(iter(self.modules.values())).parameters()).device
        self._trainable = {g: [p for p in m.parameters() if p.requires_grad] for g, m in self.modules.items()}
        self._optim_cfgs = {g: algorithm.optim_config(g, cfg.optim) for g in self.modules}
        self.optimizers = {
            g: torch.optim.AdamW(self._trainable[g], lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
            for g, o in self._optim_cfgs.items()
        }
        ema_groups = self.modules if algorithm.ema_groups is None else algorithm.ema_groups
        self.emas = {g: EMA(self.modules[g], cfg.ema.decay, cfg.ema.start_step)
                     for g in ema_groups} if cfg.ema.enabled else {}
        self._flops_per_sample = algorithm.flops_per_sample()
        self._open_run_dir()

    def _check_algorithm(self) -> None:
        name = type(self.algorithm).__name__
        if not self.modules:
            raise ValueError(f"{name}.modules() returned no modules to train")
        for group, module in self.modules.items():
            if not _GROUP_NAME.fullmatch(group):
                raise ValueError(f"{name}.modules() group {group!r} must be letters, digits and underscores")
            if not any(p.requires_grad for p in module.parameters()):
                raise ValueError(f"{name}.modules()[{group!r}] has no parameter that requires grad")
        unknown = set(self.algorithm.ema_groups or ()) - set(self.modules)
        if unknown:
            raise ValueError(f"{name}.ema_groups names {sorted(unknown)}, which modules() does not return")
        every = self.cfg.train.sample_every
        if every and type(self.algorithm).sample is Algorithm.sample:
            raise ZImageKitError(f"train.sample_every={every} but {name} cannot sample; set train.sample_every=0")
        # Checked here, not in the config, so that overrides may set the two in either order.
        if every and not self.cfg.sample.prompts:
            raise ZImageKitError(f"train.sample_every={every} but sample.prompts is empty; list prompts or set "
                                 f"train.sample_every=0")

    # -- run directory and checkpoints --------------------------------------------------

    def _open_run_dir(self) -> None:
        def find_latest() -> Path | None:
            exists = self.run_dir.is_dir() and any(self.run_dir.iterdir())
            if exists and not self.cfg.run.resume:
                raise ZImageKitError(f"run directory {self.run_dir} already exists; pass run.resume=true to "
                                     f"continue it or choose another run.name")
            return self._latest_checkpoint() if exists else None

        latest = parallel.on_main(find_latest)  # only rank 0 reads the run directory
        if latest is not None:
            self._load_checkpoint(latest)
            if parallel.is_main():
                tqdm.write(f"resuming {self.run_dir} from step {self.step} ({latest.name})")
        else:
            seed_everything(self.cfg.run.seed)
        if parallel.is_main():
            self._discard_unpublished()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")

    def _latest_checkpoint(self) -> Path | None:
        """The checkpoint ``latest`` names, or a newer complete one: a process killed after
        publishing a checkpoint's directory but before moving the pointer (or, at the first
        checkpoint, before there was one) leaves a complete directory the pointer lags behind."""
        pointer = self.ckpt_dir / "latest"
        named = None
        if pointer.is_file():
            named = self.ckpt_dir / pointer.read_text().strip()
            if _step_of(named) is None or not named.is_dir():
                raise ZImageKitError(f"{pointer} names {named.name}, which does not exist; point it at an existing "
                                     f"step_* directory or start a new run")
        newer = [p for p in self.ckpt_dir.glob("step_*")
                 if _is_complete(p) and (named is None or _step_of(p) > _step_of(named))]
        return max(newer, key=_step_of, default=named)

    def _discard_unpublished(self) -> None:
        """Remove temporary checkpoint directories and checkpoints newer than the one
        resumed from: both belong to a run that stopped before publishing them."""
        if not self.ckpt_dir.is_dir():
            return
        for path in self.ckpt_dir.iterdir():
            step = _step_of(path)
            if path.name.startswith(".tmp-") or (step is not None and step > self.step):
                shutil.rmtree(path)

    def _save_checkpoint(self) -> None:
        """Write everything resume needs into a temporary directory, publish it with one
        rename, then move the ``latest`` pointer: a crash at any point leaves ``latest``
        naming a complete checkpoint."""
        name = f"step_{self.step:07d}"
        self.last_checkpoint = self.ckpt_dir / name
        # Every rank helps gather the full tensors; rank 0 alone writes them.
        modules = {g: parallel.gather_to_main(m.state_dict()) for g, m in self.modules.items()}
        emas = {g: parallel.gather_to_main(ema.state_dict()) for g, ema in self.emas.items()}
        optimizers = {g: parallel.gather_to_main(o.state_dict()) for g, o in self.optimizers.items()}
        if not parallel.is_main():
            return
        tmp = self.ckpt_dir / f".tmp-{name}"
        tmp.mkdir(parents=True)
        for group, state in modules.items():
            save_file({k: _host_copy(v) for k, v in state.items()}, str(tmp / f"{group}.safetensors"))
        for group, state in emas.items():
            save_file({k: _host_copy(v) for k, v in state.items()}, str(tmp / f"{group}_ema.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        optimizer_tensors: dict[str, torch.Tensor] = {}
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "optimizers": {g: _pack(o, optimizer_tensors, f"optimizers.{g}") for g, o in optimizers.items()},
            "data": _pack(self.data.state_dict(), tensors, "data"),
            "algorithm": _pack(self.algorithm.state_dict(), tensors, "algorithm"),
            "rng": _pack(_rng_state(), tensors, "rng"),
        }
        save_file(tensors, str(tmp / STATE_TENSORS))
        save_file(optimizer_tensors, str(tmp / OPTIMIZER_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
        for path in tmp.iterdir():
            _fsync(path)
        os.replace(tmp, self.ckpt_dir / name)
        atomic_write(self.ckpt_dir / "latest", lambda p: p.write_text(name + "\n"))
        _fsync(self.ckpt_dir)
        steps = sorted((p for p in self.ckpt_dir.iterdir() if _step_of(p) is not None), key=_step_of)
        for old in steps[: -self.cfg.train.keep_last_ckpts]:
            shutil.rmtree(old)
        # Only now that the new one is published may the older ones lose their optimizer state.
        for old in steps[-self.cfg.train.keep_last_ckpts:-1]:
            (old / OPTIMIZER_TENSORS).unlink(missing_ok=True)
        if not self._sizes_logged:
            self._sizes_logged = True
            full = sum(f.stat().st_size for f in self.last_checkpoint.iterdir())
            kept = full - (self.last_checkpoint / OPTIMIZER_TENSORS).stat().st_size
            tqdm.write(f"checkpoints: {full / 2**20:.0f} MB the newest, {kept / 2**20:.0f} MB each older one "
                       f"(no optimizer state); train.keep_last_ckpts={self.cfg.train.keep_last_ckpts} keeps at most "
                       f"{(full + kept * (self.cfg.train.keep_last_ckpts - 1)) / 2**20:.0f} MB")

    def _load_checkpoint(self, path: Path) -> None:
        """Rank 0 reads the files; each rank receives its shards (see :mod:`zimagekit.parallel`)."""
        main = parallel.is_main()
        state = None

        def read() -> None:
            nonlocal state
            files = [STATE_JSON, STATE_TENSORS, *(f"{g}.safetensors" for g in self.modules),
                     *(f"{g}_ema.safetensors" for g in self.emas)]
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise ZImageKitError(f"checkpoint {path} lacks {', '.join(missing)} (the modules or ema.enabled "
                                     f"changed?); resume with the config it was written with or start a new run")
            saved = json.loads((path / STATE_JSON).read_text())
            if saved["format"] != CHECKPOINT_FORMAT:
                raise ZImageKitError(f"checkpoint {path} has format {saved['format']}; this zimagekit reads "
                                     f"format {CHECKPOINT_FORMAT}")
            if not (path / OPTIMIZER_TENSORS).is_file():
                raise ZImageKitError(f"checkpoint {path} keeps no optimizer state (only the newest checkpoint of a "
                                     f"run does); resume from the newest, or load its weights with load_trained")
            state = _unpack(saved, {**load_file(str(path / STATE_TENSORS)),
                                    **load_file(str(path / OPTIMIZER_TENSORS))})

        parallel.on_main(read)
        try:
            for group, module in self.modules.items():
                parallel.load_module_state(module, load_file(str(path / f"{group}.safetensors")) if main else None)
            for group, opt in self.optimizers.items():
                params = self._trainable[group]
                # Adam's moments have their parameter's shape, and take its shards.
                opt.load_state_dict(parallel.scatter_from_main(
                    state["optimizers"][group] if main else None,
                    lambda where: params[where[1]] if where[0] == "state" else None))
        except (RuntimeError, ValueError) as exc:  # torch's size/name mismatch messages
            first_line = str(exc).strip().splitlines()[0]
            raise ZImageKitError(f"checkpoint {path} does not fit the modules ({first_line}); resume with the "
                                 f"model config it was written with or start a new run") from None
        for group, ema in self.emas.items():
            ema.load_state_dict(parallel.scatter_from_main(
                load_file(str(path / f"{group}_ema.safetensors")) if main else None,
                lambda where: ema.shadow.get(where[0])))
        state = parallel.broadcast_object({k: state[k] for k in ("step", "data", "algorithm", "rng")} if main else None)
        self.data.load_state_dict(state["data"])
        self.algorithm.load_state_dict(state["algorithm"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        self.last_checkpoint = path

    # -- the loop -----------------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> None:
        """Train up to ``train.steps`` updates, or stop after update ``stop_at`` (with a
        checkpoint, as a job that runs out of time would), resumable later."""
        cfg = self.cfg.train
        last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        if self.step >= last:
            return
        groups = list(self.modules)
        columns = ["step", *(f"loss/{g}" for g in groups), *(f"lr/{g}" for g in groups),
                   *(f"grad_norm/{g}" for g in groups), "samples_per_s", "mfu"]
        main = parallel.is_main()
        log = _MetricLog(self.run_dir, columns, self.step) if main else None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and main), dynamic_ncols=True,
                   desc="train")
        world = parallel.world_size()
        samples_per_step = cfg.batch_size * cfg.grad_accum_steps * world  # the global batch
        busy, busy_steps = 0.0, 0  # time spent in updates since the last log line
        for module in self.modules.values():
            module.train()
        stop = _StopRequest()
        try:
            while self.step < last:
                if stop.agreed():
                    self._save_checkpoint()
                    if main:
                        tqdm.write(f"{stop.name or 'a stop request'} at step {self.step}: saved {self.last_checkpoint}; continue with "
                                   f"the same command and run.resume=true")
                    return
                started = time.perf_counter()
                losses, norms, lrs = self._update(self.step + 1)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                busy += time.perf_counter() - started
                busy_steps += 1
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    speed = busy_steps * samples_per_step / busy
                    mfu = None
                    if self._flops_per_sample is not None and self.cfg.mfu_peak_flops is not None:
                        mfu = self._flops_per_sample * speed / (self.cfg.mfu_peak_flops * world)
                    row = {"step": self.step, **{f"loss/{g}": v for g, v in losses.items()},
                           **{f"lr/{g}": v for g, v in lrs.items()}, **{f"grad_norm/{g}": v for g, v in norms.items()},
                           "samples_per_s": speed, "mfu": mfu}
                    if main:
                        log.write(row)
                        bar.set_postfix({g: f"{v:.4g}" for g, v in losses.items()})
                        tqdm.write(self._log_line(row, groups))
                    busy, busy_steps = 0.0, 0
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self._write_sample_grid()
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == last:
                    self._save_checkpoint()
        finally:
            stop.restore()
            bar.close()
            if log is not None:
                log.close()

    def _update(self, step: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """One optimizer update: ``grad_accum_steps`` forward/backward passes, then clip,
        step and EMA for each group that returned a loss."""
        accum = self.cfg.train.grad_accum_steps
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(accum):
            batch = self.data.next_batch()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16"):
                losses = self.algorithm.training_step(batch, step)
            self._check_losses(losses, step, totals if micro else None)
            # Means over processes: every rank logs the global batch's loss and stops together.
            values = parallel.mean_over_ranks([loss.detach().float().item() for loss in losses.values()])
            for i, ((group, loss), value) in enumerate(zip(losses.items(), values)):
                if not math.isfinite(value):
                    self._diverged(f"the {group} loss is {value}", step)
                totals[group] = totals.get(group, 0.0) + value
                # Into this group's parameters only: a loss that reads another group's
                # module must not update it. Only needed when several groups step this
                # update (a group without a loss does not step, and its gradients are
                # cleared first); a single loss is left unrestricted because FSDP2's sharded
                # parameters are not autograd leaves that inputs= could name. Mean over
                # micro-batches, hence the division.
                inputs = self._trainable[group] if len(losses) > 1 else None
                (loss / accum).backward(inputs=inputs, retain_graph=i < len(losses) - 1)
        norms = {}
        for group in totals:
            clip = self._optim_cfgs[group].grad_clip
            norm = torch.nn.utils.clip_grad_norm_(self._trainable[group], math.inf if clip is None else clip)
            norms[group] = parallel.full_tensor(norm).item()
            if not math.isfinite(norms[group]):
                self._diverged(f"the {group} gradient norm is {norms[group]}", step)
        lrs = {}
        for group in totals:
            lrs[group] = lr_at(step, self._optim_cfgs[group], self.cfg.train.steps)
            for param_group in self.optimizers[group].param_groups:
                param_group["lr"] = lrs[group]
            self.optimizers[group].step()
            if group in self.emas:
                self.emas[group].update(step)
        return {g: v / accum for g, v in totals.items()}, norms, lrs

    def _check_losses(self, losses, step: int, earlier: dict | None) -> None:
        name = type(self.algorithm).__name__
        if not isinstance(losses, dict) or not losses:
            raise ValueError(f"{name}.training_step must return a non-empty dict of group -> loss, got {losses!r}")
        for group, loss in losses.items():
            if group not in self.modules:
                raise ValueError(f"{name}.training_step returned a loss for {group!r}; its groups are {list(self.modules)}")
            if not (isinstance(loss, torch.Tensor) and loss.ndim == 0):
                raise ValueError(f"{name}.training_step loss {group!r} must be a scalar tensor")
        if earlier is not None and set(losses) != set(earlier):
            raise ValueError(f"{name}.training_step returned groups {sorted(losses)} at step {step} after "
                             f"{sorted(earlier)} in an earlier micro-batch of the same step")

    def _diverged(self, what: str, step: int) -> NoReturn:
        saved = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        raise TrainingDiverged(f"{what} at step {step}; stopped without saving, {saved}; resume from it with a "
                               f"lower optim.lr or a tighter optim.grad_clip")

    @staticmethod
    def _log_line(row: dict, groups: list[str]) -> str:
        parts = [f"step {row['step']}"]
        for g in groups:
            if row.get(f"loss/{g}") is not None:
                parts.append(f"{g}: loss {row[f'loss/{g}']:.4g} lr {row[f'lr/{g}']:.3g} "
                             f"grad_norm {row[f'grad_norm/{g}']:.3g}")
        parts.append(f"{row['samples_per_s']:.1f} samples/s")
        if row["mfu"] is not None:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        return " | ".join(parts)

    def _write_sample_grid(self) -> None:
        prompts = [p for p in self.cfg.sample.prompts for _ in self.cfg.sample.seeds]
        seeds = [s for _ in self.cfg.sample.prompts for s in self.cfg.sample.seeds]
        modes = {g: m.training for g, m in self.modules.items()}
        with _rng_untouched(), torch.no_grad(), contextlib.ExitStack() as stack:
            if self.cfg.sample.use_ema:
                for ema in self.emas.values():
                    stack.enter_context(ema.swapped_in())
            for module in self.modules.values():
                module.eval()
            try:
                images = self.algorithm.sample(prompts, seeds)
            finally:
                for g, module in self.modules.items():
                    module.train(modes[g])
        if len(images) != len(prompts):
            raise ValueError(f"{type(self.algorithm).__name__}.sample returned {len(images)} images for "
                             f"{len(prompts)} (prompt, seed) pairs")
        if not parallel.is_main():  # every rank sampled: sharded modules run collectively
            return
        grid = image_grid(images, cols=len(self.cfg.sample.seeds))
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))

