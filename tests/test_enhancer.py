"""Prompt enhancers: the shapes-world template and the local transformers LLM interface."""

from __future__ import annotations

import pytest
import torch

from zimagekit.enhancer import TransformersEnhancer, load_enhancer
from zimagekit.errors import ZImageKitError
from zimagekit.shapes import world


def test_the_shapes_template_describes_every_required_object_colour_count_and_relation():
    enhance = load_enhancer("zimagekit.shapes.enhancer:ShapesTemplateEnhancer")
    prompts = world.eval_prompts()
    descriptions = enhance([p.text for p in prompts])
    for prompt, text in zip(prompts, descriptions):
        assert len(text) > 3 * len(prompt.text)
        for spec in prompt.objects:
            assert spec.shape in text and (spec.color is None or spec.color in text)
        if prompt.category == "counting":
            assert f"exactly {world.COUNT_WORDS[len(prompt.objects)]} {prompt.objects[0].shape}s" in text
        if prompt.relation is not None:
            a, b = prompt.objects
            phrase = prompt.relation if prompt.relation in ("above", "below") else "to the " + prompt.relation
            assert f"The {a} is clearly {phrase} the {b}." in text
    assert enhance(["a red circle"]) == enhance(["a red circle"])


def test_unknown_enhancers_and_non_shapes_prompts_are_one_line_errors():
    with pytest.raises(ZImageKitError, match="unknown prompt enhancer"):
        load_enhancer("gpt")
    with pytest.raises(ZImageKitError, match="not a shapes-world prompt"):
        load_enhancer("zimagekit.shapes.enhancer:ShapesTemplateEnhancer")(["a photo of a cat"])
    with pytest.raises(ZImageKitError, match="not a transformers model folder"):
        load_enhancer("llm:/nonexistent")


def test_the_llm_enhancer_greedily_continues_the_chat_template(tmp_path, qwen3_tokenizer):
    """Against a hand-written greedy loop over the same model's logits."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "pe")
    qwen3_tokenizer.save_pretrained(tmp_path / "pe")
    enhancer = TransformersEnhancer(tmp_path / "pe", system_prompt="Describe the image.", max_new_tokens=6)

    prompt = "a red circle"
    messages = [{"role": "system", "content": "Describe the image."}, {"role": "user", "content": prompt}]
    ids = qwen3_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == qwen3_tokenizer.eos_token_id:
                break
            new.append(token)
    assert enhancer([prompt]) == [qwen3_tokenizer.decode(new, skip_special_tokens=True).strip()]
    assert enhancer.name.startswith("llm-pe-")
