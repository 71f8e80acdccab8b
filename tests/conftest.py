"""Session-wide fixtures for the pipeline and CLI tests: the offline Qwen3 tokenizer and a tiny
random Z-Image folder are built once, the pipelines that read them are loaded once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    from pipeline_fixtures import build_qwen3_tokenizer

    return build_qwen3_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, qwen3_tokenizer):
    """A tiny Z-Image folder as diffusers writes it (see pipeline_fixtures)."""
    from pipeline_fixtures import build_tiny_zimage_folder

    return build_tiny_zimage_folder(tmp_path_factory.mktemp("tiny-zimage"), qwen3_tokenizer)


@pytest.fixture(scope="session")
def reference_pipe(tiny_model_dir):
    """diffusers' ZImagePipeline on the tiny folder: the oracle."""
    import torch
    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    pipe = DiffusersZImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def zimage_pipe(tiny_model_dir):
    """Our pipeline on the same folder, fp32 on the CPU."""
    from zimagekit.pipeline import ZImagePipeline

    return ZImagePipeline.from_pretrained(tiny_model_dir, dtype="fp32", device="cpu")
