"""Shared pieces of the S3-DiT tests: tiny configs and the diffusers oracle on the same weights."""

import torch
from diffusers import ZImageTransformer2DModel

from zimagekit.s3dit import S3DiT, S3DiTConfig

# Several shapes of the architecture: head counts, RoPE splits, refiner depths, qk-norm off.
CONFIGS = {
    "2heads": S3DiTConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                          axes_dims=(8, 12, 12), axes_lens=(256, 64, 64)),
    "4heads_2refiners": S3DiTConfig(dim=96, n_layers=1, n_refiner_layers=2, n_heads=4, n_kv_heads=4, cap_feat_dim=48,
                                    axes_dims=(8, 8, 8), axes_lens=(256, 64, 64), norm_eps=1e-6),
    "1head_no_qknorm": S3DiTConfig(dim=64, n_layers=1, n_refiner_layers=1, n_heads=1, n_kv_heads=1, cap_feat_dim=16,
                                   axes_dims=(16, 24, 24), axes_lens=(128, 32, 32), qk_norm=False),
}


def oracle_and_ours(cfg: S3DiTConfig, seed: int = 0):
    """diffusers' model with random weights (pad tokens and norm weights random too, so a
    mix-up of any of them shows) and our model loaded from its state dict."""
    torch.manual_seed(seed)
    ref = ZImageTransformer2DModel(**cfg.to_dict()).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "pad_token" in name:
                p.normal_()
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    ours = S3DiT(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def mixed_batch(cfg: S3DiTConfig, seed: int = 1):
    """Three samples: image token counts 60 (padded to 64), 16 (-> 32) and 64 (no pad);
    caption lengths 45, 7 and 32; t = 0, 0.37, 1."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(cfg.in_channels, 1, h, w, generator=g) for h, w in ((12, 20), (8, 8), (16, 16))]
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in (45, 7, 32)]
    t = torch.tensor([0.0, 0.37, 1.0])
    return x, t, caps


def mixed_outputs(model, cfg: S3DiTConfig) -> list:
    """The model's outputs on :func:`mixed_batch` (ours or diffusers'), without gradients."""
    x, t, caps = mixed_batch(cfg)
    with torch.no_grad():
        out = model(x, t, caps)
    return out.sample if hasattr(out, "sample") else out


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| over a list of tensors."""
    err = max((o.float() - r.float()).abs().max().item() for o, r in zip(ours, ref))
    return err / max(r.float().abs().max().item() for r in ref)
