"""zimagekit: the Z-Image system (S3-DiT, pipeline, training, distillation) in PyTorch.

The names most code needs are importable from the top, as with diffusers::

    from zimagekit import ZImagePipeline, S3DiT, S3DiTConfig, LoRA

They load on first use, so ``import zimagekit`` itself does not import torch.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that owns it.
_PUBLIC = {"ZImagePipeline": "pipeline", "S3DiT": "s3dit", "S3DiTConfig": "s3dit", "LoRA": "lora"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'zimagekit' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
