"""Data parallelism for the trainer: DDP and FSDP2 under ``torchrun``, in torchtitan's split.

The model file knows nothing of processes; this module wraps an S3-DiT in place, in the
order torchtitan applies the levers: per-block gradient checkpointing, per-block
``torch.compile``, then the data-parallel wrapper, so algorithms keep calling the module
they built.

* ``fsdp``: ``fully_shard`` on every transformer block (noise refiner, context refiner,
  unified layers) and on the root for the embedders and final layer. Under
  ``train.precision=bf16`` the policy is ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``: blocks compute with bf16 weights, gradients are reduced and kept
  in fp32 next to the fp32 master shards.
* ``ddp``: composable ``replicate`` (DistributedDataParallel) on the root.
* A LoRA trains its adapters with the base frozen; the base is sharded like a full model
  under ``fsdp`` (it has no gradients to reduce) and the adapters' gradients are averaged
  over processes as each finishes accumulating.

Every process starts from the same seed and keeps the same global RNG state, so the
trainer checkpoints rank 0's; a data-parallel algorithm draws randomness for the whole
global batch and keeps its slice (:class:`~zimagekit.algorithms.flow_matching.FlowMatching`
does), which makes a run independent of how its global batch is split.

Checkpoints hold full (unsharded) tensors in the single-process layout: every rank takes
part in gathering them, rank 0 writes them, and on resume rank 0 reads them and sends each
rank its shard. A checkpoint therefore loads back on any number of processes. Only rank 0
touches the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from torch import nn

from .errors import ZImageKitError


@dataclass
class ParallelConfig:
    strategy: Literal["fsdp", "ddp"] = "fsdp"  # how the trained model is spread when torchrun starts >1 process
    gradient_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each transformer block (first steps are slow while it compiles)


# ----------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_distributed() -> torch.device:
    """Join torchrun's process group when it started several processes (``WORLD_SIZE`` > 1)
    and return this process's device: ``cuda:LOCAL_RANK`` with GPUs, else the CPU (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not distributed():
        # NCCL for CUDA tensors, gloo for the few CPU ones (RNG states, step counters).
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo", device_id=device if cuda else None)
    return device


def shutdown() -> None:
    if distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value; sent over the process group,
    never written to disk)."""
    if not distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 alone (reading the run directory, say); its result, or the
    :class:`ZImageKitError` it raised, reaches every rank, so all of them stop together."""
    if not distributed():
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = (True, fn())
        except ZImageKitError as e:
            outcome = (False, str(e))
    ok, value = broadcast_object(outcome)
    if not ok:
        raise ZImageKitError(value)
    return value


def mean_over_ranks(values: list[float]) -> list[float]:
    """Each value averaged over the processes (unchanged in a single process)."""
    if not distributed() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def min_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of ``t`` over the processes, on ``t``'s device (``t`` itself in
    a single process)."""
    if not distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


# ----------------------------------------------------------------------------------------
# Full tensors out, shards back in
# ----------------------------------------------------------------------------------------


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fused_optimizer_ok(params) -> bool:
    """Whether torch's fused AdamW may update ``params``: in one process, or on CUDA for
    parameters that FSDP2 does not shard. torch 2.13's fused CPU kernel crashes under
    torchrun (sharded or not), and no fused sharded update is tested here; those take the
    foreach update."""
    if not distributed():
        return True
    return all(p.device.type == "cuda" and not _is_dtensor(p) for p in params)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole of a DTensor (collective: every rank calls it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def gather_to_main(tree):
    """``tree`` (dicts, lists, tuples of tensors and plain values) with every tensor whole
    and on the CPU on rank 0 (None on the other ranks); ``tree`` itself in a single process.
    Collective: every rank calls it on the same structure. Tensors move to the CPU one at a
    time, so no device ever holds more than one gathered tensor."""
    if not distributed():
        return tree
    return _gather(tree)


def _gather(tree):
    if isinstance(tree, dict):
        return {k: _gather(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_gather(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        whole = full_tensor(tree)
        return whole.cpu() if is_main() else None
    return tree


@dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _skeleton(tree):
    if isinstance(tree, dict):
        return {k: _skeleton(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_skeleton(v) for v in tree)
    return _TensorMeta(tuple(tree.shape), tree.dtype) if isinstance(tree, torch.Tensor) else tree


def scatter_from_main(tree, like: Callable[[tuple], torch.Tensor | None]):
    """Rank 0's ``tree`` of full tensors on every rank (the others pass None), each tensor
    placed as ``like(path)`` is: the matching shard where that is a DTensor of the same
    shape, else a full CPU copy. One tensor is in flight at a time, so only rank 0 ever
    holds the whole tree. Identity in a single process."""
    if not distributed():
        return tree
    return _fill(broadcast_object(_skeleton(tree) if is_main() else None), tree, like, ())


def _fill(skeleton, tree, like, path):
    if isinstance(skeleton, dict):
        return {k: _fill(v, tree[k] if tree is not None else None, like, (*path, k)) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_fill(v, tree[i] if tree is not None else None, like, (*path, i))
                              for i, v in enumerate(skeleton))
    if not isinstance(skeleton, _TensorMeta):
        return skeleton
    target = like(path)
    if _is_dtensor(target) and tuple(target.shape) == skeleton.shape:
        from torch.distributed.tensor import distribute_tensor

        source = tree if is_main() else torch.empty(skeleton.shape, dtype=skeleton.dtype)
        return distribute_tensor(source.to(target.device), target.device_mesh, target.placements)
    device = target.device if target is not None and target.device.type != "cpu" else torch.device("cpu")
    out = tree.to(device) if is_main() else torch.empty(skeleton.shape, dtype=skeleton.dtype, device=device)
    dist.broadcast(out, src=0)
    return out


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """``module.load_state_dict`` of rank 0's full ``state`` on every rank, each parameter
    taking its shard. The keys are the module's own ``state_dict`` keys (Hugging Face names
    for an S3-DiT), so its load hooks see exactly what a single process would give them."""
    if not distributed():
        module.load_state_dict(state)
        return
    local = module.state_dict()
    names = broadcast_object(sorted(state) if is_main() else None)
    if names != sorted(local):
        missing, unexpected = sorted(set(local) - set(names)), sorted(set(names) - set(local))
        raise ZImageKitError(f"the checkpoint names other tensors than the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    module.load_state_dict(scatter_from_main(state, lambda path: local[path[0]]))


# ----------------------------------------------------------------------------------------
# Wrapping the model
# ----------------------------------------------------------------------------------------


def parallelize_s3dit(model: nn.Module, cfg: ParallelConfig, precision: str, lora: nn.Module | None = None) -> None:
    """Apply ``cfg``'s levers to ``model`` in place, for one process or for every rank of the
    process group (see the module docstring). ``lora``: the adapters being trained on the
    frozen ``model``."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing = True
    if cfg.compile:
        model.compile_repeated_blocks()
    if not distributed():
        return
    from torch.distributed.device_mesh import init_device_mesh

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    if cfg.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if precision == "bf16" else MixedPrecisionPolicy())
        for block in model.repeated_blocks():
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    elif lora is None:
        from torch.distributed._composable.replicate import replicate

        replicate(model, device_ids=[device.index] if device.type == "cuda" else None)
    if lora is not None:
        for p in lora.parameters():
            dist.broadcast(p.data, src=0)  # start every rank from rank 0's adapters
            p.register_post_accumulate_grad_hook(_average_grad)


def _average_grad(p: torch.Tensor) -> None:
    # Averaging the running sum after every micro-batch keeps it correct under gradient
    # accumulation: the earlier part is already equal on every rank. (SUM, not AVG: gloo
    # has no AVG.)
    dist.all_reduce(p.grad)
    p.grad.div_(world_size())
