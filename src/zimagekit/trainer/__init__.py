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

The package, one idea per module: :mod:`.config` (sections and the learning-rate schedule),
:mod:`.algorithm` (the protocol), :mod:`.data` (resumable batch sources), :mod:`.ema`,
:mod:`.rng`, :mod:`.checkpoint` (the file format), :mod:`.logs` (metrics and grids) and
:mod:`.loop` (the :class:`Trainer`).
"""

from .algorithm import Algorithm, TrainingDiverged
from .checkpoint import load_trained
from .config import EMAConfig, LoopConfig, OptimConfig, RunConfig, SampleConfig, TrainConfig, lr_at
from .data import DataSource, IndexDataSource
from .ema import EMA
from .logs import image_grid
from .loop import Trainer
from .rng import seed_everything

__all__ = ["Algorithm", "DataSource", "EMA", "EMAConfig", "IndexDataSource", "LoopConfig", "OptimConfig", "RunConfig",
           "SampleConfig", "TrainConfig", "Trainer", "TrainingDiverged", "image_grid", "load_trained", "lr_at",
           "seed_everything"]
