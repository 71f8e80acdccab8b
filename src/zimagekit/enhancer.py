"""Prompt enhancers: the hook captions pass through while training.

Z-Image answers short prompts well because a prompt enhancer rewrites them into detailed
descriptions at inference, and its SFT phase trains on such descriptions (PE-aware SFT).
The trainer calls an enhancer on every caption before the text encoder sees it:

    enhancer = load_enhancer("shapes")                  # terse shapes-world prompt -> description
    enhancer = load_enhancer("llm:/models/Qwen3-4B")    # a local transformers model folder
    enhancer(["a red circle"])

An enhancer has a ``name`` that changes whenever its output would: cached caption features
are keyed by it, so features of another enhancer are never reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ZImageKitError


class PromptEnhancer:
    """The interface, and the enhancer that changes nothing."""

    name = "none"

    def __call__(self, prompts: list[str]) -> list[str]:
        return list(prompts)


class ShapesTemplateEnhancer(PromptEnhancer):
    """Turns a shapes-world caption ("a red circle to the left of two ...") into the
    detailed description an enhancer would write, from the caption's parsed requirement."""

    name = "shapes-template-1"

    def __call__(self, prompts: list[str]) -> list[str]:
        from .shapes import world

        return [describe_scene(world.parse_prompt(p)) for p in prompts]


def describe_scene(prompt) -> str:
    """The description of a parsed shapes-world :class:`~zimagekit.shapes.world.Prompt`."""
    from .shapes import world

    def thing(spec) -> str:
        return f"{spec.color} {spec.shape}" if spec.color else f"{spec.shape} in any one flat colour"

    n = len(prompt.objects)
    if prompt.category == "counting":
        spec = prompt.objects[0]
        colour = f"all {spec.color}" if spec.color else "each in a flat colour"
        content = f"exactly {world.COUNT_WORDS[n]} {spec.shape}s, {colour}, of similar size"
    else:
        content = "exactly " + " and ".join(f"one {thing(o)}" for o in prompt.objects)
    text = (f"A flat two-dimensional illustration on a plain light-grey square canvas showing {content}. ")
    if prompt.relation is not None:
        a, b = (str(o) for o in prompt.objects)
        where = {"left of": "to the left of", "right of": "to the right of"}.get(prompt.relation, prompt.relation)
        text += f"The {a} is clearly {where} the {b}. "
    text += ("Every shape is a solid silhouette with crisp edges and no outline, shading or texture; "
             f"{'the shapes do not touch or overlap, and ' if n > 1 else ''}"
             "there is no text and nothing else in the picture.")
    return text


DEFAULT_SYSTEM_PROMPT = (
    "You rewrite short image prompts into one detailed, literal description of the image: the objects, "
    "their colours, sizes, positions and the background. Keep every fact of the prompt; add no text in the image. "
    "Answer with the description only."
)


class TransformersEnhancer(PromptEnhancer):
    """A causal LM from a local ``transformers`` folder (e.g. a Qwen3 instruct model) writes
    the description: the chat template with ``system_prompt`` and the prompt as the user
    turn, then greedy decoding, so the same prompt always gets the same description."""

    def __init__(self, folder: str | Path, system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_new_tokens: int = 256,
                 device=None, dtype=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ZImageKitError(f"prompt enhancer {folder}: not a transformers model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.tokenizer.chat_template is None:
            raise ZImageKitError(f"prompt enhancer {folder}: the tokenizer has no chat template; use an instruct model")
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype or torch.float32)
        self.model.to(device or "cpu").eval().requires_grad_(False)
        self.system_prompt, self.max_new_tokens = system_prompt, max_new_tokens
        digest = hashlib.sha256(json.dumps([(folder / "config.json").read_text(), system_prompt, max_new_tokens])
                                .encode()).hexdigest()[:12]
        self.name = f"llm-{folder.name}-{digest}"

    def __call__(self, prompts: list[str]) -> list[str]:
        import torch

        out = []
        for prompt in prompts:
            messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)["input_ids"].to(self.model.device)
            with torch.no_grad():
                generated = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                max_new_tokens=self.max_new_tokens,
                                                pad_token_id=self.tokenizer.pad_token_id)
            out.append(self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return out


def load_enhancer(spec: str, device=None) -> PromptEnhancer:
    """``none``, ``shapes`` (the template enhancer) or ``llm:FOLDER`` (a local transformers model)."""
    if spec == "none":
        return PromptEnhancer()
    if spec == "shapes":
        return ShapesTemplateEnhancer()
    if spec.startswith("llm:") and spec[4:]:
        return TransformersEnhancer(spec[4:], device=device)
    raise ZImageKitError(f"unknown prompt enhancer {spec!r}; use none, shapes or llm:FOLDER")
