"""The dual-stream (MMDiT-style) counterfactual shares S3-DiT's layers and differs only in streams."""

import torch

from zimagekit.dual_stream import DualStreamBlock, DualStreamDiT, block_comparison
from zimagekit.s3dit import S3DiTConfig, TransformerBlock, _RopeTables

CFG = S3DiTConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                  axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))


def test_weight_tied_dual_block_is_a_single_stream_block_on_the_joint_sequence():
    torch.manual_seed(0)
    single = TransformerBlock(CFG, modulation=True)
    for p in single.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3) if p.ndim > 1 else torch.nn.init.normal_(p, 1.0, 0.2)
    dual = DualStreamBlock(CFG)
    dual.image.load_state_dict(single.state_dict())
    dual.caption.load_state_dict(single.state_dict())
    img, cap, c = torch.randn(2, 32, 64), torch.randn(2, 32, 64), torch.randn(2, CFG.adaln_dim)
    pos = torch.randint(0, 60, (2, 64, 3))
    rope = _RopeTables(CFG, torch.device("cpu"))(pos)
    with torch.no_grad():
        joint = single(torch.cat([img, cap], 1), rope, None, c)
        out_img, out_cap = dual(img, cap, rope[:, :32], rope[:, 32:], None, c)
    assert torch.allclose(torch.cat([out_img, out_cap], 1), joint, atol=1e-5)


def test_dual_block_has_twice_every_part_of_a_single_block():
    d, f, a = CFG.dim, CFG.ffn_dim, CFG.adaln_dim
    single = {"q/k/v + output projection": 4 * d * d, "QK-norm": 2 * CFG.head_dim, "FFN": 3 * d * f,
              "adaLN": a * 4 * d + 4 * d, "norms": 4 * d}
    single["block total"] = sum(single.values())
    assert {part: (s, du) for part, s, du in block_comparison(CFG)} == {k: (v, 2 * v) for k, v in single.items()}


def test_a_sample_gives_the_same_output_alone_and_in_a_mixed_batch():
    """Batch padding must be invisible: masks hide it in both streams."""
    torch.manual_seed(1)
    model = DualStreamDiT(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a, b = torch.randn(16, 1, 12, 20), torch.randn(16, 1, 8, 8)
    ca, cb = torch.randn(45, 32), torch.randn(7, 32)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        alone = [model([a], t[:1], [ca])[0], model([b], t[1:], [cb])[0]]
        together = model([a, b], t, [ca, cb])
    # b is the shorter sample in both streams, so only its rows see batch padding.
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(alone, together))


def test_dual_stream_model_trains():
    model = DualStreamDiT(CFG)
    x = torch.randn(2, 16, 1, 8, 8)
    loss = model(x, torch.rand(2), torch.randn(2, 10, 32)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.layers[0].caption.parameters())
