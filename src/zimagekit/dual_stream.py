"""The dual-stream counterfactual: what S3-DiT would be as an MMDiT (SD3/Flux style).

Z-Image's argument for a single stream (paper §3.1) is parameter efficiency: an MMDiT block
keeps separate q/k/v, output projection, FFN, norms and adaLN for image and caption tokens
and only shares the attention itself, so each block carries two copies of its weights.
``DualStreamDiT`` is that design built from S3-DiT's own layers (the same
:class:`~zimagekit.s3dit.TransformerBlock` per modality, the same embedders, pad tokens, token
layout and RoPE), so the two differ only in stream structure. It has no refiners: in an
MMDiT every block is already modality-specific.

A dual-stream block whose two streams hold identical weights computes exactly an S3-DiT
block on the concatenated [image, caption] sequence (tested), which is the sense in which
single-stream is the weight-tied special case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .s3dit import S3DiT, S3DiTConfig, TransformerBlock


class DualStreamBlock(nn.Module):
    """Joint attention over image and caption tokens; everything else per modality."""

    def __init__(self, cfg: S3DiTConfig):
        super().__init__()
        self.image = TransformerBlock(cfg, modulation=True)
        self.caption = TransformerBlock(cfg, modulation=True)

    def forward(self, img, cap, img_rope, cap_rope, mask, c):
        vi, vc = self.image.modulation_vectors(c), self.caption.modulation_vectors(c)
        qi, ki, wi = self.image.attention.heads(self.image.norm_in(img, vi[0]), img_rope)
        qc, kc, wc = self.caption.attention.heads(self.caption.norm_in(cap, vc[0]), cap_rope)
        out = F.scaled_dot_product_attention(torch.cat([qi, qc], 2), torch.cat([ki, kc], 2), torch.cat([wi, wc], 2),
                                             attn_mask=mask)
        oi, oc = out.transpose(1, 2).flatten(2).split([img.shape[1], cap.shape[1]], dim=1)
        img = self.image.residual(img, self.image.attention.to_out(oi), vi[1])
        cap = self.caption.residual(cap, self.caption.attention.to_out(oc), vc[1])
        img = self.image.residual(img, self.image.feed_forward(self.image.norm_in(img, vi[2])), vi[3])
        cap = self.caption.residual(cap, self.caption.feed_forward(self.caption.norm_in(cap, vc[2])), vc[3])
        return img, cap


class DualStreamDiT(S3DiT):
    """S3-DiT's embedders, pad tokens, token layout and final layer around ``n_layers``
    dual-stream blocks; same call as :class:`S3DiT`, whose :meth:`~S3DiT.trunk` alone it
    replaces."""

    def __init__(self, config: S3DiTConfig):
        super().__init__(config)
        del self.noise_refiner, self.context_refiner, self.layers
        self.layers = nn.ModuleList([DualStreamBlock(config) for _ in range(config.n_layers)])

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def trunk(self, img, cap, c, lay):
        """Dual-stream blocks over both streams, joint attention; the image rows' hidden states."""
        mask = self._joint_mask(lay, img.shape[1], cap.shape[1])
        for block in self.layers:
            img, cap = block(img, cap, lay.img_rope, lay.cap_rope, mask, c)
        return img[:, : max(lay.img_tokens)]

    @staticmethod
    def _joint_mask(lay, Lx: int, Lc: int):
        """Key mask over [image stream, caption stream]: each stream's batch padding hidden."""
        if lay.img_mask is None and lay.cap_mask is None:
            return None
        B = len(lay.img_tokens)
        img = lay.img_mask if lay.img_mask is not None else torch.ones(B, 1, 1, Lx, dtype=torch.bool)
        cap = lay.cap_mask if lay.cap_mask is not None else torch.ones(B, 1, 1, Lc, dtype=torch.bool)
        return torch.cat([img.to(cap.device), cap], dim=-1)


def block_comparison(config: S3DiTConfig) -> list[tuple[str, int, int]]:
    """(part, single-stream block, dual-stream block) parameter counts of one main block,
    counted from modules built on the meta device."""
    with torch.device("meta"):
        single, dual = TransformerBlock(config, modulation=True), DualStreamBlock(config)

    def n(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    def parts(b):
        norms = [b.attention_norm1, b.attention_norm2, b.ffn_norm1, b.ffn_norm2]
        return {"q/k/v + output projection": n(b.attention.qkv, b.attention.to_out), "QK-norm":
                n(b.attention) - n(b.attention.qkv, b.attention.to_out), "FFN": n(b.feed_forward),
                "adaLN": n(b.adaLN_modulation), "norms": n(*norms)}

    s, di, dc = parts(single), parts(dual.image), parts(dual.caption)
    rows = [(k, s[k], di[k] + dc[k]) for k in s]
    return rows + [("block total", n(single), n(dual))]

