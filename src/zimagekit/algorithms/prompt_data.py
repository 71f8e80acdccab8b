"""The prompt-only data every algorithm without images (distillation, RL) trains on: where the
prompts come from (:func:`zimagekit.prompts.load_prompts`), the image size, and batches of
their caption features with the prompts themselves (a reward needs the words)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ZImageKitError
from ..prompts import load_prompts
from ..runconfig import require_config
from ..trainer import IndexDataSource


@dataclass
class PromptData:
    """The prompt source: a .txt/.jsonl/.csv file, a dataset folder's captions, or
    ``module:function``. ``count`` keeps the first prompts of a file (null: all) or draws that
    many from a function with ``seed``; the shapes configs draw the captions of the teacher's
    training scenes (``zimagekit.shapes.world:training_prompts``)."""

    prompts: str | None = None
    count: int | None = 20_000
    seed: int = 0
    column: str | None = None  # the .jsonl/.csv column; null: prompt, text or caption
    # Image size to train at; null: the model folder's default.
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        require_config(self.count is None or self.count >= 1, "data.count", f"must be >= 1 or null, got {self.count}")
        require_config(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")


@dataclass
class RLData(PromptData):
    """The model folder to post-train, and the prompts (see :class:`PromptData`)."""

    model: str = "src/zimagekit/models/shapes-teacher"


def prompt_source(encode: Callable[[list[str]], list[torch.Tensor]], data: PromptData,
                  batch_size: int) -> IndexDataSource:
    """Batches ``{"captions": [features], "prompts": [text]}`` of the prompts of ``data``;
    ``encode`` (a folder's text encoder, e.g. ``pipe.encode_prompt``) runs once, up front."""
    if data.prompts is None:
        raise ZImageKitError("data.prompts: name a prompt source (a .txt/.jsonl/.csv file, a dataset folder, or "
                             "module:function such as zimagekit.shapes.world:training_prompts)")
    prompts = load_prompts(data.prompts, data.count, data.seed, data.column)
    features = encode(prompts)
    return IndexDataSource(lambda idx: {"captions": [features[i] for i in idx], "prompts": [prompts[i] for i in idx]},
                           len(features), batch_size, seed=data.seed)
