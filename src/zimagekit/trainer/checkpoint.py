"""Checkpoint files: tensors in safetensors, everything else in JSON, never a pickle.

A checkpoint is ``<run>/checkpoints/step_0000123/`` holding ``<group>.safetensors``,
``<group>_ema.safetensors``, :data:`STATE_JSON` with :data:`STATE_TENSORS`, and, in the newest
one only, :data:`OPTIMIZER_TENSORS`. The loop that writes them is :mod:`zimagekit.trainer.loop`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import ZImageKitError
from .ema import EMA


CHECKPOINT_FORMAT = 2
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
# The optimizers' state (Adam's two moments: twice the weights) lives in its own file, which
# only the newest checkpoint keeps: older ones are for evaluation, and resume reads the newest.
OPTIMIZER_TENSORS = "optimizer_state.safetensors"


def host_copy(t: torch.Tensor) -> torch.Tensor:
    # A fresh CPU storage per tensor: safetensors refuses views that share one (fused
    # weights come back from state_dict hooks as chunks), and a GPU tensor must come home.
    return torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t.detach())


def pack_state(obj, tensors: dict[str, torch.Tensor], key: str):
    """JSON-able form of a state tree; its tensors move into ``tensors`` under ``key`` paths.
    Tuples and dicts with non-string keys (optimizer states are keyed by int) are tagged so
    that :func:`unpack_state` gives back exactly the same structure."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        if key in tensors:
            raise ValueError(f"two checkpoint tensors would share the name {key!r}")
        if isinstance(obj, np.ndarray):
            tensors[key] = torch.from_numpy(np.array(obj, copy=True, order="C"))
            return {"__ndarray__": key}
        tensors[key] = host_copy(obj)
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_state(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack_state(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: pack_state(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[pack_state(k, tensors, f"{key}.key{i}"), pack_state(v, tensors, f"{key}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {key!r} is a {type(obj).__name__}; use tensors, numbers, strings, "
                    f"lists, tuples and dicts")


def unpack_state(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [unpack_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(unpack_state(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {unpack_state(k, tensors): unpack_state(v, tensors) for k, v in obj["__items__"]}
        return {k: unpack_state(v, tensors) for k, v in obj.items()}
    return obj


def fsync(path: Path) -> None:
    # A rename is atomic against a crashed process; against a power cut the data must reach
    # the disk before the rename that publishes it does.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_STEP_DIR = re.compile(r"step_(\d+)")




def step_of(path: Path) -> int | None:
    """The step a ``step_*`` checkpoint directory is named for; None for any other name."""
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole published checkpoint: its state file parses and names its
    own step, and its tensors are there."""
    try:
        state = json.loads((path / STATE_JSON).read_text())
    except (OSError, ValueError):
        return False
    step = step_of(path)
    return step is not None and isinstance(state, dict) and state.get("step") == step and \
        (path / STATE_TENSORS).is_file()



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
