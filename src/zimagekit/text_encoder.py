"""Caption features for Z-Image: Qwen3 chat template, tokenisation, and a Qwen3 cut short.

Z-Image conditions on Qwen3-4B's ``hidden_states[-2]``: the raw output of the second-to-last
decoder layer, before the final norm, for the prompt wrapped as one user turn of the chat
template (``add_generation_prompt=True, enable_thinking=True``), padding removed.  The reference
pads every prompt to 512 tokens and runs all 36 layers plus the norm; here each prompt runs at
its real length and the model is built without its last layer and with the final norm replaced
by the identity, so its ``last_hidden_state`` *is* ``hidden_states[-2]``.  Causal attention makes
the unpadded features equal to the padded ones.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ZImageKitError

logger = logging.getLogger(__name__)

# Distinct prompts encoded per forward; bounds activation memory for long prompt files.
ENCODE_BATCH = 8

__all__ = ["QWEN3_ADDED_TOKENS", "QWEN3_CHAT_TEMPLATE", "Qwen3TextEncoder", "chat_prompt"]

# Qwen3's added tokens in id order (151643 ...), after the 151,643 byte-level BPE ranks.
QWEN3_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # fmt: skip

# The Qwen3 chat template, reduced to what a prompt goes through: system/user/assistant turns
# and the generation prompt; enable_thinking=False would add an empty think block, True adds
# nothing (as the stock template). Qwen3's tokenizer and the shapes tokenizer both use it.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the reference feeds it: one user message, generation prompt, thinking on.

    With the stock Qwen3 template ``enable_thinking=True`` adds no ``<think>`` block, giving
    ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``.
    """
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' per-load report and progress bar (it lists the skipped last layer)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class Qwen3TextEncoder:
    """Tokenizer plus a Qwen3 that stops after the layer producing ``hidden_states[-2]``.

    Build it with :meth:`from_pretrained`; ``model`` is a ``transformers.Qwen3Model`` with one
    layer fewer than the checkpoint and an identity final norm.  ``source`` and
    ``tokenizer_source`` are the folders it came from: :meth:`save_pretrained` copies them (the
    dropped layer is not in memory), so saving works even after :meth:`free` or when only the
    folders are known (``Qwen3TextEncoder(None, None, source, tokenizer_source)``).
    """

    def __init__(self, tokenizer, model: torch.nn.Module | None, source: Path, tokenizer_source: Path):
        self.tokenizer = tokenizer
        self.model = model
        self.source = Path(source)
        self.tokenizer_source = Path(tokenizer_source)

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Qwen3TextEncoder:
        """Load ``tokenizer/`` (AutoTokenizer) and ``text_encoder/`` (Qwen3Model or Qwen3ForCausalLM).

        Problems this module can name raise :class:`ZImageKitError`; errors from transformers
        or safetensors (unreadable files) propagate for the caller to attribute.
        """
        from transformers import AutoConfig, AutoTokenizer, Qwen3Model

        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        # A folder without tokenizer.json (or vocab.json + merges.txt) loads as a tokenizer
        # with no vocabulary that turns every prompt into nothing: the image would ignore it.
        if not tokenizer("a cat").input_ids:
            raise ZImageKitError(
                f"{tokenizer_dir}: the tokenizer has no vocabulary (tokenizer.json, or vocab.json and merges.txt, "
                "is missing or empty); copy the model's tokenizer/ folder again"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ZImageKitError(
                f"{tokenizer_dir}: the tokenizer has no chat template; "
                "add Qwen3's chat_template.jinja (Z-Image formats every prompt with it)"
            )

        config = AutoConfig.from_pretrained(text_encoder_dir)
        if config.model_type != "qwen3":
            raise ZImageKitError(
                f"{text_encoder_dir}: expected a Qwen3 text encoder, config.json says model_type {config.model_type!r}"
            )
        # Drop the last decoder layer before building the model, so its weights are never
        # allocated; transformers then reports them as unexpected keys, which is intended.
        config.num_hidden_layers -= 1
        config.layer_types = list(config.layer_types)[: config.num_hidden_layers]
        with quiet_transformers():
            model, info = Qwen3Model.from_pretrained(
                text_encoder_dir, config=config, dtype=dtype or torch.float32, output_loading_info=True,
                use_safetensors=True,  # never unpickle a .bin
            )
        missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
        if missing:
            raise ZImageKitError(
                f"{text_encoder_dir}: the checkpoint lacks or mis-shapes {len(missing)} tensors "
                f"(first: {missing[0]}); re-download text_encoder/"
            )
        # hidden_states[-2] is taken before the final norm.
        model.norm = torch.nn.Identity()
        model.requires_grad_(False).eval()
        if device is not None:
            model.to(device)
        return cls(tokenizer, model, text_encoder_dir, tokenizer_dir)

    def save_pretrained(self, text_encoder_dir: str | Path, tokenizer_dir: str | Path) -> None:
        """Copy the full ``text_encoder/`` checkpoint and ``tokenizer/`` this was loaded from."""
        for source, target in ((self.source, Path(text_encoder_dir)), (self.tokenizer_source, Path(tokenizer_dir))):
            target.mkdir(parents=True, exist_ok=True)
            for file in source.iterdir():
                copy = target / file.name
                if file.is_file() and not (copy.exists() and copy.samefile(file)):
                    shutil.copy2(file, copy)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def free(self) -> None:
        """Release the Qwen3 weights (the tokenizer and ``source`` stay, for saving)."""
        self.model = None

    def token_ids(self, prompts: Sequence[str], max_sequence_length: int = 512) -> list[list[int]]:
        """Chat-formatted token ids per prompt, cut to ``max_sequence_length`` like the reference.

        The cut is on the formatted text, so a long prompt also loses the template's tail, as in
        diffusers; a warning names the prompt.
        """
        if max_sequence_length < 1:
            raise ZImageKitError(f"max_sequence_length must be at least 1, got {max_sequence_length}")
        texts = [chat_prompt(self.tokenizer, p) for p in prompts]
        ids = self.tokenizer(texts).input_ids
        for prompt, row in zip(prompts, ids):
            if len(row) > max_sequence_length:
                logger.warning(
                    "prompt %r is %d tokens with the chat template; only the first %d (max_sequence_length) are used",
                    _short(prompt),
                    len(row),
                    max_sequence_length,
                )
        return [row[:max_sequence_length] for row in ids]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], max_sequence_length: int = 512) -> list[torch.Tensor]:
        """Caption features per prompt: ``(L_i, hidden)`` tensors on the model's device and dtype.

        Each distinct prompt is encoded once.  Distinct prompts go through the model together,
        padded only to the longest of their batch (right padding under the causal mask leaves
        the real tokens' features unchanged): at these lengths the forward is bound by reading
        the weights, so a prompt and its negative cost about one forward, not two.
        """
        if self.model is None:
            raise ZImageKitError(
                "the text encoder is not loaded (freed, or load_text_encoder=False); pass prompt_embeds, "
                "or load it again to encode prompts"
            )
        ids = [tuple(row) for row in self.token_ids(prompts, max_sequence_length)]
        # Shortest first, so each batch pads little.
        distinct = sorted(dict.fromkeys(ids), key=len)
        device = self.device
        features: dict[tuple[int, ...], torch.Tensor] = {}
        for start in range(0, len(distinct), ENCODE_BATCH):
            rows = distinct[start : start + ENCODE_BATCH]
            longest = len(rows[-1])
            input_ids = torch.zeros(len(rows), longest, dtype=torch.long)
            mask = torch.zeros(len(rows), longest, dtype=torch.bool)
            for j, row in enumerate(rows):
                input_ids[j, : len(row)] = torch.tensor(row)
                mask[j, : len(row)] = True
            padded = len(rows[0]) < longest
            hidden = self.model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device) if padded else None,
                use_cache=False,
            ).last_hidden_state
            for j, row in enumerate(rows):
                features[row] = hidden[j, : len(row)]
        return [features[row] for row in ids]


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
