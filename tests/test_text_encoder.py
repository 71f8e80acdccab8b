"""Our tokenizer (``tokenizers`` + Jinja) and Qwen3 against transformers' AutoTokenizer and
Qwen3Model: the same formatted text, the same ids, the same ``hidden_states[-2]``; and one-line
errors for folders they cannot use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from zimagekit.errors import ZImageKitError
from zimagekit.text_encoder import ChatTokenizer, Qwen3Encoder, Qwen3TextEncoder

SHAPES_TOKENIZER = Path(__file__).resolve().parents[1] / "src" / "zimagekit" / "models" / "shapes-turbo" / "tokenizer"

PROMPTS = [
    "a photo of a cat", "", "  two   spaces\tand a tab\nand a newline\r\n", "Ünïcödé café — naïve",
    "一只在雪地里的红色狐狸", "emoji 🦊🌲 and 12345 digits 3.14", "it's they're we'll I'd", "<|im_end|> inside",
    "ÀÉÎ" * 30,
]  # fmt: skip


@pytest.fixture(params=["qwen3", "shapes"])
def tokenizer_dir(request, tiny_model_dir):
    return tiny_model_dir / "tokenizer" if request.param == "qwen3" else SHAPES_TOKENIZER


def test_formatted_text_and_ids_equal_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = ChatTokenizer.from_pretrained(tokenizer_dir)
    for prompt in PROMPTS:
        expected = reference.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
        assert ours.format(prompt) == expected
    texts = [ours.format(p) for p in PROMPTS]
    assert ours(texts) == reference(texts).input_ids


def test_template_features_render_as_in_transformers(tiny_model_dir, tmp_path):
    """A template that uses what real ones use (namespace, loop controls, tojson, the special
    tokens, raise_exception on a branch not taken), read from tokenizer_config.json."""
    from transformers import AutoTokenizer

    template = (
        "{%- set ns = namespace(users=0) %}{{ bos_token or '' }}"
        "{%- for m in messages %}{%- if m.role != 'user' %}{% continue %}{% endif %}"
        "{%- set ns.users = ns.users + 1 %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n"
        "{%- if m.content is not string %}{{ raise_exception('content must be text') }}{% endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{{ {'users': ns.users} | tojson }}{{ eos_token }}\n"
        "{%- endif %}"
    )
    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_model_dir / "tokenizer", folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    reference = AutoTokenizer.from_pretrained(folder)
    ours = ChatTokenizer.from_pretrained(folder)
    for prompt in ("  a cat ", "café <b>&</b>"):
        expected = reference.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
        assert ours.format(prompt) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_features_equal_transformers_hidden_states(tiny_model_dir, dtype):
    from transformers import Qwen3Model

    folder = tiny_model_dir / "text_encoder"
    ours = Qwen3TextEncoder.from_pretrained(folder, tiny_model_dir / "tokenizer", dtype=dtype)
    reference = Qwen3Model.from_pretrained(folder, dtype=dtype).eval()
    prompts = ["a photo of a cat", "a much longer prompt about a red bicycle leaning on a brick wall at dusk"]
    for prompt, features in zip(prompts, ours.encode(prompts), strict=True):
        ids = torch.tensor([ours.token_ids([prompt])[0]])
        with torch.no_grad():
            expected = reference(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
        assert features.dtype == dtype and features.shape == expected.shape
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(features, expected, **tol)


def test_sharded_causal_lm_folder_loads_without_its_last_layer(tiny_model_dir, tmp_path):
    from transformers import Qwen3ForCausalLM, Qwen3Model

    base = Qwen3Model.from_pretrained(tiny_model_dir / "text_encoder")
    lm = Qwen3ForCausalLM(base.config)
    lm.model.load_state_dict(base.state_dict())
    lm.save_pretrained(tmp_path / "lm", max_shard_size="2MB")  # tied embeddings: ~4.9 MB in fp32
    assert (tmp_path / "lm" / "model.safetensors.index.json").is_file()
    ours = Qwen3Encoder.from_pretrained(tmp_path / "lm")
    plain = Qwen3Encoder.from_pretrained(tiny_model_dir / "text_encoder")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(ours(ids), plain(ids))
    assert len(ours.layers) == base.config.num_hidden_layers - 1


def _copy(tiny_model_dir, tmp_path, name):
    shutil.copytree(tiny_model_dir / name, tmp_path / name)
    return tmp_path / name


def test_a_tokenizer_without_vocabulary_or_template_is_refused(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path, "tokenizer")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ZImageKitError, match="chat template is not valid Jinja"):
        ChatTokenizer.from_pretrained(folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ZImageKitError, match="has no chat template"):
        ChatTokenizer.from_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ZImageKitError, match=r"tokenizer.json is missing: the tokenizer has no vocabulary"):
        ChatTokenizer.from_pretrained(folder)


def test_text_encoder_folder_problems_are_named(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path, "text_encoder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ZImageKitError, match="expected a Qwen3 text encoder, config.json says model_type 'llama'"):
        Qwen3Encoder.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "16"}))
    with pytest.raises(ZImageKitError, match="hidden_size must be a positive int, got '16'"):
        Qwen3Encoder.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ZImageKitError, match="does not fit this Qwen3 text encoder: .*wrong-shaped .*mlp"):
        Qwen3Encoder.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ZImageKitError, match="never loaded"):
        Qwen3Encoder.from_pretrained(folder)
