"""Caption features for Z-Image: Qwen3 chat template, tokenisation, and a Qwen3 cut short.

Z-Image conditions on Qwen3-4B's ``hidden_states[-2]``: the raw output of the second-to-last
decoder layer, before the final norm, for the prompt wrapped as one user turn of the chat
template (``add_generation_prompt=True, enable_thinking=True``), padding removed.  The reference
pads every prompt to 512 tokens and runs all 36 layers plus the norm; here each prompt runs at
its real length through a Qwen3 built without its last layer and its final norm, so its output
*is* ``hidden_states[-2]``.  Causal attention makes the unpadded features equal to the padded
ones.

The Qwen3 and the tokenizer are written here in plain PyTorch, ``tokenizers`` and Jinja rather
than loaded through transformers, whose import alone takes about 2 s of a first image's 2.5 s
budget on a CPU; ``tests/test_text_encoder.py`` and the pipeline tests hold them equal to
transformers' ``Qwen3Model`` and ``AutoTokenizer``.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ZImageKitError

logger = logging.getLogger(__name__)

# Distinct prompts encoded per forward; bounds activation memory for long prompt files.
ENCODE_BATCH = 8

__all__ = ["QWEN3_ADDED_TOKENS", "QWEN3_CHAT_TEMPLATE", "ChatTokenizer", "Qwen3Encoder", "Qwen3TextEncoder"]

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


# What transformers passes a chat template besides the messages; a template may read them.
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTokenizer:
    """A ``tokenizer/`` folder without transformers: ``tokenizer.json`` through the
    ``tokenizers`` library and the chat template through a sandboxed Jinja environment set
    up as transformers' ``apply_chat_template`` sets it up (trim/lstrip blocks, loop
    controls, a ``tojson`` that does not escape HTML, ``raise_exception``), so the ids equal
    ``AutoTokenizer``'s (``tests/test_text_encoder.py``).  Importing both costs about 20 ms
    where transformers costs about 2 s."""

    def __init__(self, backend, template: str, special_tokens: dict[str, str]):
        self.backend = backend
        self.template = template
        self.special_tokens = special_tokens
        self._compiled = _chat_environment().from_string(template)  # once, not per prompt

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ChatTokenizer:
        """Every problem is one :class:`ZImageKitError` naming the file: a missing or empty
        vocabulary would turn every prompt into nothing, and the image would ignore it."""
        import jinja2
        from tokenizers import Tokenizer

        folder = Path(folder)
        vocabulary = folder / "tokenizer.json"
        if not vocabulary.is_file():
            raise ZImageKitError(f"{vocabulary} is missing: the tokenizer has no vocabulary; "
                                 "copy the model's tokenizer/ folder again")
        try:
            backend = Tokenizer.from_file(str(vocabulary))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ZImageKitError(f"{vocabulary} is not a readable tokenizer ({str(e).splitlines()[0]}); "
                                 "copy the model's tokenizer/ folder again") from None
        if not backend.encode("a cat").ids:
            raise ZImageKitError(f"{vocabulary}: the tokenizer has no vocabulary (it turns text into no tokens); "
                                 "copy the model's tokenizer/ folder again")
        config_path = folder / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ZImageKitError(f"{config_path} is not readable JSON ({e}); copy it again") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates, as some folders store them
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():  # the file wins, as in transformers
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if not template:
            raise ZImageKitError(f"{folder}: the tokenizer has no chat template; "
                                 "add Qwen3's chat_template.jinja (Z-Image formats every prompt with it)")
        special = {}
        for name in _SPECIAL_TOKENS:
            token = config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                special[name] = token
        try:
            return cls(backend, template, special)
        except jinja2.TemplateSyntaxError as e:
            raise ZImageKitError(f"{folder}: the chat template is not valid Jinja ({e}); copy it again") from None

    def format(self, prompt: str) -> str:
        """The prompt as the reference feeds it: one user turn, the generation prompt, thinking
        on; with Qwen3's template ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``."""
        return self._compiled.render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, enable_thinking=True,
            **self.special_tokens)

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of already formatted texts (special tokens in them become their ids)."""
        return [e.ids for e in self.backend.encode_batch(list(texts))]


@functools.cache
def _chat_environment():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


# ---------------------------------------------------------------------------------------------
# Qwen3, cut short
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Qwen3Config:
    """The fields of a transformers Qwen3 config.json the encoder reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = False

    @classmethod
    def from_json(cls, path: Path) -> Qwen3Config:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ZImageKitError(f"{path} is missing; copy the model's text_encoder/ folder again") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ZImageKitError(f"{path} is not readable JSON ({e}); copy it again") from None
        if not isinstance(raw, dict) or raw.get("model_type") != "qwen3":
            kind = raw.get("model_type") if isinstance(raw, dict) else None
            raise ZImageKitError(f"{path.parent}: expected a Qwen3 text encoder, config.json says model_type {kind!r}")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ZImageKitError(f"{path}: RoPE type {rope.get('rope_type')!r} is not supported (Qwen3 uses the default)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ZImageKitError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (Qwen3 uses silu)")
        values = {}
        for f in fields(cls):
            value = raw.get(f.name)
            if f.name == "head_dim" and value is None and isinstance(raw.get("hidden_size"), int) and raw.get("num_attention_heads"):
                value = raw["hidden_size"] // raw["num_attention_heads"]
            if f.name == "rope_theta":
                value = rope.get("rope_theta", raw.get("rope_theta"))
            if value is None:
                if f.default is MISSING:
                    raise ZImageKitError(f"{path}: {f.name} is missing")
                continue
            kind = {"int": int, "float": float, "bool": bool}[f.type]
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
            if not ok or (kind is int and value < 1):
                raise ZImageKitError(f"{path}: {f.name} must be a {'positive ' if kind is int else ''}{kind.__name__}, "
                                     f"got {value!r}")
            values[f.name] = kind(value)
        return cls(**values)


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalised in fp32, cast back, then scaled (in that order, as in
    transformers, so bf16 results match)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Qwen3Attention(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        # Qwen3 normalises each head's q and k before RoPE.
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        # Causal only: prompts are right-padded, so a real token never sees a pad token.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Qwen3Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = Qwen3MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Qwen3Encoder(nn.Module):
    """Qwen3's embedding and its first ``num_hidden_layers − 1`` decoder layers (parameter
    names as in transformers' ``Qwen3Model``): the output is ``hidden_states[-2]``."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        # An uninitialised weight: the checkpoint fills it, and normal_ on the meta device
        # (where from_pretrained builds the model) would import torch._dynamo, about 1 s.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList([Qwen3Layer(config) for _ in range(config.num_hidden_layers - 1)])

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # RoPE as transformers computes it: frequencies and angles in fp32, cos/sin cast to x.
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        angles = torch.arange(input_ids.shape[1], dtype=torch.float)[:, None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1).to(x.device)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x

    @classmethod
    def from_pretrained(cls, folder: Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Qwen3Encoder:
        """A transformers Qwen3 folder (``Qwen3Model`` or ``Qwen3ForCausalLM`` names, one file or
        sharded); the last layer, the final norm and ``lm_head`` are never kept in memory."""
        from .weights import check_state_dict, read_safetensors

        config = Qwen3Config.from_json(folder / "config.json")
        if config.num_hidden_layers < 2:
            raise ZImageKitError(f"{folder}: Z-Image needs hidden_states[-2], so at least 2 layers; config.json has "
                                 f"{config.num_hidden_layers}")
        with torch.device("meta"):
            model = cls(config)
        wanted = model.state_dict().keys()
        state = {}
        for file in _weight_files(folder):
            for key, tensor in read_safetensors(file).items():
                key = key.removeprefix("model.")  # Qwen3ForCausalLM's names
                if key in wanted:
                    state[key] = tensor.to(dtype) if dtype is not None else tensor
        check_state_dict(model, state, source=str(folder), what="this Qwen3 text encoder")
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).requires_grad_(False).eval()


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ZImageKitError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (pickled .bin weights are never loaded; convert them to safetensors)" if any(folder.glob("*.bin")) else ""
        raise ZImageKitError(f"{folder}: no model.safetensors{hint}")
    return files


class Qwen3TextEncoder:
    """A tokenizer plus a Qwen3 that stops after the layer producing ``hidden_states[-2]``.

    Build it with :meth:`from_pretrained`.  ``source`` and ``tokenizer_source`` are the folders
    it came from: :meth:`save_pretrained` copies them (the dropped layer is not in memory), so
    saving works even after :meth:`free` or when only the folders are known
    (``Qwen3TextEncoder(None, None, source, tokenizer_source)``).
    """

    def __init__(self, tokenizer: ChatTokenizer | None, model: Qwen3Encoder | None, source: Path,
                 tokenizer_source: Path):
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
        """Load ``tokenizer/`` and ``text_encoder/``; problems with either raise one
        :class:`ZImageKitError` naming the file."""
        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        tokenizer = ChatTokenizer.from_pretrained(tokenizer_dir)
        model = Qwen3Encoder.from_pretrained(text_encoder_dir, dtype=dtype or torch.float32, device=device)
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
        ids = self.tokenizer([self.tokenizer.format(p) for p in prompts])
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
            for j, row in enumerate(rows):
                input_ids[j, : len(row)] = torch.tensor(row)
            hidden = self.model(input_ids.to(device))
            for j, row in enumerate(rows):
                features[row] = hidden[j, : len(row)]
        return [features[row] for row in ids]


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
