"""zimagekit plan: closed-form state memory, and activation coefficients re-measured on the block."""

import pytest
import torch

from zimagekit.cli import main
from zimagekit.plan import ACT_BYTES_BF16, ACT_BYTES_FP32, training_memory
from zimagekit.s3dit import S3DiTConfig, TransformerBlock, _RopeTables

TURBO = S3DiTConfig.preset("z-image-turbo")
P, PB = 6_154_908_736, 180_910_336  # whole model; one main block (spec §1)


def test_ddp_and_fsdp_state_memory_is_the_closed_form():
    ddp = training_memory(TURBO, gpus=8, strategy="ddp")
    assert (ddp.parameters, ddp.gradients, ddp.optimizer) == (4 * P, 4 * P, 8 * P)
    fsdp = training_memory(TURBO, gpus=8, strategy="fsdp")
    assert fsdp.parameters == 4 * P / 8 + 4 * PB and fsdp.gradients == 4 * P / 8 + 4 * PB and fsdp.optimizer == 8 * P / 8


def test_checkpointing_keeps_only_block_inputs():
    full = training_memory(TURBO, strategy="fsdp", checkpointing=False)
    ckpt = training_memory(TURBO, strategy="fsdp", checkpointing=True)
    assert ckpt.activations < full.activations / 5


def saved_bytes_per_token(dim, heads, L, bf16):
    head = dim // heads
    third = 2 * (head // 6)  # even RoPE slices filling the head
    cfg = S3DiTConfig(dim=dim, n_heads=heads, n_kv_heads=heads, axes_dims=(head - 2 * third, third, third))
    block = TransformerBlock(cfg, modulation=True)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    rope = _RopeTables(cfg, torch.device("cpu"))(torch.zeros(1, L, 3, dtype=torch.long))
    store = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            store[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, L, dim, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        block(x, rope, None, torch.randn(1, cfg.adaln_dim))
    return sum(store.values()) / L


@pytest.mark.parametrize("bf16, coefficient", [(False, ACT_BYTES_FP32), (True, ACT_BYTES_BF16)])
def test_activation_coefficients_match_what_autograd_saves(bf16, coefficient):
    """Re-measured at a width the coefficients were not fitted on; the per-token slope
    (two lengths) removes what does not grow with the sequence (weight copies, vectors)."""
    torch.set_num_threads(1)
    dim = 192
    slope = (saved_bytes_per_token(dim, 3, 768, bf16) * 768 - saved_bytes_per_token(dim, 3, 384, bf16) * 384) / 384
    assert slope == pytest.approx(coefficient * dim, rel=0.06)


def test_plan_command(capsys):
    assert main(["plan", "--gpus", "8", "--strategy", "fsdp", "--checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "FSDP on 8 GPU(s)" in out and "optimizer" in out and "5.73 GiB" in out  # 8P/8 bytes = 5.73 GiB


@pytest.mark.parametrize("flags, message", [(["--lora", "-3"], "LoRA rank and must be at least 1, got -3"),
                                            (["--lora", "0"], "at least 1, got 0"),
                                            (["--size", "8"], "--size must be at least 16")])
def test_plan_refuses_impossible_settings_in_one_line(capsys, flags, message):
    assert main(["plan", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
