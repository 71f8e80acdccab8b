"""Prompt enhancers: the hook captions pass through while training.

Z-Image answers short prompts well because a prompt enhancer rewrites them into detailed
descriptions at inference, and its SFT phase trains on such descriptions (PE-aware SFT).
The trainer calls an enhancer on every caption before the text encoder sees it:

    enhancer = load_enhancer("llm:/models/Qwen3-4B")    # a local transformers model folder
    enhancer = load_enhancer("zimagekit.shapes.enhancer:ShapesTemplateEnhancer")   # module:class
    enhancer(["a red circle"])

An enhancer has a ``name`` that changes whenever its output would: cached caption features
are keyed by it, so features of another enhancer are never reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ZImageKitError
from .runconfig import import_object


class PromptEnhancer:
    """The interface, and the enhancer that changes nothing."""

    name = "none"

    def __call__(self, prompts: list[str]) -> list[str]:
        return list(prompts)


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
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=dtype or torch.float32)
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
    """``none``, ``llm:FOLDER`` (a local transformers model) or ``module:Name``, a
    :class:`PromptEnhancer` subclass (or a function returning one) built with no arguments:
    how an enhancer of one's own, such as the shapes world's template
    (``zimagekit.shapes.enhancer:ShapesTemplateEnhancer``), plugs in."""
    if spec == "none":
        return PromptEnhancer()
    if spec.startswith("llm:") and spec[4:]:
        return TransformersEnhancer(spec[4:], device=device)
    if ":" in spec:
        factory = import_object(spec, "prompt enhancer")
        enhancer = factory()
        if not isinstance(enhancer, PromptEnhancer):
            raise ZImageKitError(f"prompt enhancer {spec} is not a zimagekit.enhancer.PromptEnhancer")
        return enhancer
    raise ZImageKitError(f"unknown prompt enhancer {spec!r}; use none, llm:FOLDER or module:Name")
