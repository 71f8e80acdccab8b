"""``zimagekit plan``: per-GPU training memory for an S3-DiT, before renting the GPUs, and the
transformer's resident weights for inference in each stored format.

    zimagekit plan --preset z-image-turbo --gpus 8 --strategy fsdp --batch 1 --size 1024
    zimagekit plan --preset z-image-turbo --gpus 1 --lora 64 --checkpointing
    zimagekit plan --preset z-image-turbo --weights Q4_K

Inference weights in a format: the blocks' linear weights (99.8 % of the 6.15B) at the
format's bytes per weight (:data:`zimagekit.quantized.BYTES_PER_WEIGHT`: bf16 2, fp8 1,
Q8_0 34/32, Q6_K 210/256, Q5_K 176/256, Q4_K 144/256, Q4_0 18/32), everything else (embedders,
final layer, norms, biases) in bf16, as GGUF files and ``--fp8`` keep them.

The arithmetic, per GPU, with P parameters, Pb parameters per block, N GPUs (AdamW keeps
two fp32 moments; weights are fp32 masters and compute runs under bf16 autocast):

* DDP: parameters 4P, gradients 4P, AdamW 8P bytes (all replicated).
* FSDP2 (``fully_shard`` per block, bf16 params / fp32 reduce): 4P/N + 4P/N + 8P/N, plus the
  unsharded bf16 weights of the running and the prefetched block (2 x 2 Pb) and one block's
  unsharded fp32 gradients (4 Pb) before its reduce-scatter.
* LoRA of rank r: the frozen base is kept in bf16 (2P); adapters, their gradients and AdamW
  state are 16 bytes per adapter parameter.
* Activations kept for backward, per token per block, measured on zimagekit's block with
  ``saved_tensors_hooks`` (tests re-measure them): ``ACT_BYTES_BF16`` x dim under bf16 autocast,
  ``ACT_BYTES_FP32`` x dim in fp32. With per-block gradient checkpointing only each block's
  fp32 input (4 x dim) stays, plus one block's full activations while it is recomputed. The
  noise refiner sees image tokens only, the context refiner caption tokens only.

Not counted: the CUDA context and allocator fragmentation (budget ~1-2 GiB), the frozen
text encoder and VAE (encode once and cache their outputs, as zimagekit's trainers do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ZImageKitError
from .quantized import BYTES_PER_WEIGHT
from .s3dit import S3DiT, S3DiTConfig, TransformerBlock, padded_length

# Bytes saved for backward per token per block, per unit of model width (measured; see module doc).
ACT_BYTES_BF16 = 71
ACT_BYTES_FP32 = 124
GiB = 2**30


@dataclass
class Plan:
    parameters: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations


def training_memory(cfg: S3DiTConfig, gpus: int = 1, strategy: str = "ddp", batch: int = 1, image_tokens: int = 4096,
                    caption_tokens: int = 512, precision: str = "bf16", checkpointing: bool = False,
                    lora_rank: int | None = None) -> Plan:
    """Bytes per GPU for one training step (see the module docstring for the arithmetic)."""
    if strategy not in ("ddp", "fsdp"):
        raise ZImageKitError(f"unknown strategy {strategy!r}; use ddp or fsdp")
    if gpus < 1 or batch < 1:
        raise ZImageKitError("--gpus and --batch must be at least 1")
    if lora_rank is not None and lora_rank < 1:
        raise ZImageKitError(f"--lora is a LoRA rank and must be at least 1, got {lora_rank}")
    if image_tokens < 1 or caption_tokens < 1:
        raise ZImageKitError("--size must be at least 16 and --caption-tokens at least 1")
    with torch.device("meta"):
        P = sum(p.numel() for p in S3DiT(cfg).parameters())
        Pb = sum(p.numel() for p in TransformerBlock(cfg, modulation=True).parameters())
    if lora_rank is not None:
        # q, k, v, out: 4 x r(d + d); w1, w3: 2 x r(d + f); w2: r(f + d), in every block
        d, f = cfg.dim, cfg.ffn_dim
        adapters = (cfg.n_layers + 2 * cfg.n_refiner_layers) * lora_rank * (8 * d + 3 * (d + f))
        params, grads, optim = 2 * P + 4 * adapters, 4 * adapters, 8 * adapters
    elif strategy == "ddp":
        params, grads, optim = 4 * P, 4 * P, 8 * P
    else:
        params, grads, optim = 4 * P / gpus + 2 * 2 * Pb, 4 * P / gpus + 4 * Pb, 8 * P / gpus
    xi, xc = padded_length(image_tokens), padded_length(caption_tokens)
    per_token = (ACT_BYTES_BF16 if precision == "bf16" else ACT_BYTES_FP32) * cfg.dim
    block_tokens = [xi + xc] * cfg.n_layers + [xi] * cfg.n_refiner_layers + [xc] * cfg.n_refiner_layers
    weight_copies = 2 * Pb if precision == "bf16" else 0  # autocast keeps each block's bf16 weights for backward
    if checkpointing:
        acts = batch * sum(4 * cfg.dim * n for n in block_tokens) + batch * per_token * max(block_tokens) + weight_copies
    else:
        acts = batch * per_token * sum(block_tokens) + weight_copies * len(block_tokens)
    return Plan(params, grads, optim, acts)


def weight_bytes(cfg: S3DiTConfig, fmt: str = "bf16") -> float:
    """Resident bytes of the transformer's weights for inference with its blocks' linear
    weights stored in ``fmt`` (see the module docstring)."""
    if fmt not in BYTES_PER_WEIGHT:
        raise ZImageKitError(f"unknown weight format {fmt!r}; use one of {', '.join(BYTES_PER_WEIGHT)}")
    with torch.device("meta"):
        model = S3DiT(cfg)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.startswith(("layers.", "noise_refiner.", "context_refiner.")))
    return linear * BYTES_PER_WEIGHT[fmt] + (total - linear) * 2
