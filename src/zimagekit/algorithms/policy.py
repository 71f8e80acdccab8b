"""The policy every RL algorithm post-trains: a Z-Image folder's transformer with a LoRA (the
reference policy is the same model with the LoRA at scale 0) or the whole transformer (the
reference a frozen copy), and its export as a Z-Image folder."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from ..errors import ZImageKitError
from ..lora import LoRA
from ..trainer import load_trained


class Policy:
    """``model`` trained through a rank-``lora_rank`` LoRA (0: all its weights). With
    ``keep_reference`` a full fine-tune keeps a frozen copy for :meth:`reference`."""

    def __init__(self, model, lora_rank: int, lora_alpha: float | None, keep_reference: bool = True):
        self.model = model
        model.requires_grad_(False)
        self.lora = LoRA.create(model, lora_rank, lora_alpha) if lora_rank else None
        self.frozen = None
        if self.lora is None:
            self.frozen = copy.deepcopy(model).eval() if keep_reference else None
            model.requires_grad_(True)

    def modules(self) -> dict:
        return {"lora": self.lora} if self.lora is not None else {"transformer": self.model}

    @contextlib.contextmanager
    def reference(self):
        """The reference policy inside the block: the model with its LoRA at scale 0, or the
        frozen copy of a full fine-tune."""
        if self.lora is None:
            if self.frozen is None:
                raise ValueError("this policy keeps no reference (keep_reference=False)")
            yield self.frozen
            return
        scale, self.lora.scale = self.lora.scale, 0.0
        try:
            yield self.model
        finally:
            self.lora.scale = scale


def export_policy(run_dir: Path, out: Path, model_folder: str, lora_rank: int, lora_alpha: float | None,
                  use_ema: bool) -> None:
    """Write run ``run_dir``'s policy as a Z-Image folder: ``model_folder`` with its transformer
    replaced (a LoRA merged in), stored in bf16."""
    from ..pipeline import ModelFolder, save_with_transformer
    from ..s3dit import S3DiT

    folder = ModelFolder.open(model_folder)
    model = S3DiT.from_pretrained(folder.component("transformer"), dtype=torch.float32)
    if lora_rank:
        lora = LoRA.create(model, lora_rank, lora_alpha)
        load_trained(run_dir, "lora", lora, use_ema)
        lora.merge()
    else:
        load_trained(run_dir, "transformer", model, use_ema)
    save_with_transformer(folder, model, out, torch.bfloat16)


def open_model(folder: str):
    """The pipeline of the folder to post-train, fp32 on the best device."""
    from ..pipeline import ZImagePipeline

    if not Path(folder).is_dir():
        raise ZImageKitError(f"data.model: no folder {folder}; point it at the Z-Image folder to post-train")
    return ZImagePipeline.from_pretrained(folder)
