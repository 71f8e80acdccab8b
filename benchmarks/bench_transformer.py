"""S3DiT vs diffusers' ZImageTransformer2DModel: forward time on identical weights and inputs.

    python benchmarks/bench_transformer.py [--threads 2] [--repeats 7] [--dtypes float32 bfloat16]

Cases (issue 2):
  (a) the `tiny` preset, a CFG-style batch of 2: one 32x32 latent twice, captions of 77
      and 12 tokens (a prompt and the empty negative prompt after the chat template);
  (b) dim 512, 8 layers, 8 heads: one 64x64 latent with 64 caption tokens, fp32 and bf16.
Prints ms for ours and the oracle, the speed-up ratio, achieved GFLOP/s (model FLOPs from
zimagekit.s3dit.forward_flops over measured time) and its fraction of the square-GEMM peak in the
same dtype. Each round times a square GEMM, ours, the oracle and the kernel floor one after
another; every ratio and fraction is taken within a round and the median over rounds printed,
so drift in the machine's speed (large on a shared VM) cancels.

The last three columns are the kernel floor (see `kernel_floor`): the same forward's GEMMs
and attention kernels alone, timed in the same run, and the speed-up and fraction of peak an
implementation would reach if everything else were free. A goal above the floor's numbers
cannot be met on this machine with these kernels.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ZImageTransformer2DModel

from timing import interleaved, timed
from zimagekit.s3dit import RowAlignedLinear, S3DiT, S3DiTConfig, forward_flops, padded_length


def gemm_probe(dtype: torch.dtype, sizes=(1024, 1536, 2048), repeats: int = 5):
    """The machine's square-GEMM peak, measured next to each timed forward.

    A short sweep picks the fastest size (several sizes guard against one hitting a poor
    BLAS path). Returns ``probe`` and ``rates``: each call of ``probe`` appends the best of
    three GEMMs at that size, in FLOP/s, to ``rates``. Called in every round, it gives the
    peak of that moment, so a slow spell of the machine (this KVM guest's square GEMM moved
    between 117 and 148 GFLOP/s within minutes) lowers peak and forward alike.
    """
    best_rate, best = 0.0, None
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        rate = 2 * n**3 / min(timed(lambda: a @ b, repeats))
        if rate > best_rate:
            best_rate, best = rate, (a, b, n)
    a, b, n = best
    rates = []

    def probe():
        rates.append(2 * n**3 / min(timed(lambda: a @ b, 3)))

    return probe, rates


def kernel_floor(cfg, img_tokens, cap_tokens, dtype, shared_image=False):
    """A callable that runs (under ``no_grad``) the forward's GEMMs and attention alone, and
    nothing else: every Linear of every block as one GEMM over the whole batch (no batch
    padding, output rows aligned) and CPU flash attention per sample on its padded stream,
    run back to back on random tensors of the model's shapes. With ``shared_image`` (a CFG pair: one latent, one t) the noise
    refiner runs for one sample only, as an implementation that noticed could do.

    Norms, RoPE, modulation, SwiGLU's product, the small adaLN GEMMs and Python cost
    nothing here, so no implementation on these kernels can be faster: ``reference / floor``
    bounds the speed-up any of them can reach, ``flops / floor`` its fraction of GEMM peak
    (``flops`` counting both refiner passes, as the reported GFLOP/s of ours do)."""
    d, f, heads, hd = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.head_dim
    patch_dim = cfg.all_patch_size[0] ** 2 * cfg.all_f_patch_size[0] * cfg.in_channels
    img = [padded_length(n) for n in img_tokens]
    cap = [padded_length(n) for n in cap_tokens]
    ops = []

    def gemm(m, k, n):  # aligned output rows, as RowAlignedLinear gives without autograd
        a, layer = torch.randn(m, k, dtype=dtype), RowAlignedLinear(k, n).to(dtype)
        ops.append(lambda: layer(a))

    def blocks(lengths, count):
        m = sum(lengths)
        for _ in range(count):
            gemm(m, d, 3 * d), gemm(m, d, d), gemm(m, d, 2 * f), gemm(m, f, d)
            for n in lengths:
                q, k, v = (torch.randn(1, heads, n, hd, dtype=dtype) for _ in range(3))
                ops.append(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))

    gemm(sum(img_tokens), patch_dim, d)
    gemm(sum(cap_tokens), cfg.cap_feat_dim, d)
    blocks(img[:1] if shared_image else img, cfg.n_refiner_layers)
    blocks(cap, cfg.n_refiner_layers)
    blocks([a + b for a, b in zip(img, cap)], cfg.n_layers)
    gemm(sum(img_tokens), d, patch_dim)

    def run():
        for op in ops:
            op()

    return run


def bench_case(name, cfg, latent_hw, cap_lens, dtype, repeats):
    torch.manual_seed(0)
    ref = ZImageTransformer2DModel(**cfg.to_dict()).eval()
    with torch.no_grad():
        ref.x_pad_token.normal_()
        ref.cap_pad_token.normal_()
    ours = S3DiT(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    ref.to(dtype)
    ours.to(dtype)
    h, w = latent_hw
    x = [torch.randn(cfg.in_channels, 1, h, w, dtype=dtype) for _ in cap_lens]
    if len(x) == 2:
        x[1] = x[0].clone()  # CFG: the same latent with two captions
    caps = [torch.randn(n, cfg.cap_feat_dim, dtype=dtype) for n in cap_lens]
    t = torch.full((len(x),), 0.5)
    img_tokens = [(h // 2) * (w // 2)] * len(x)
    flops = forward_flops(cfg, img_tokens, cap_lens)
    probe, rates = gemm_probe(dtype)
    floor = kernel_floor(cfg, img_tokens, cap_lens, dtype, shared_image=len(x) == 2)
    with torch.no_grad():
        run_ref = lambda: ref(x, t, caps).sample
        run_ours = lambda: ours(x, t, caps)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(run_ref(), run_ours()))
        scale = max(a.float().abs().max().item() for a in run_ref())
        rounds = interleaved([probe, run_ours, run_ref, floor], repeats)

    # Every ratio is taken within a round (one row of ``rounds``), then its median reported.
    _, o, r, f = np.array(rounds).T
    peak = np.array(rates[1:])  # rates[0] is the warm-up call's
    return dict(case=name, dtype=str(dtype).removeprefix("torch."), ours=np.median(o) * 1e3, ref=np.median(r) * 1e3,
                ratio=np.median(r / o), gflops=np.median(flops / o) / 1e9, peak=np.median(peak) / 1e9,
                peak_frac=np.median(flops / o / peak), rel_err=diff / scale, floor=np.median(f) * 1e3,
                floor_ratio=np.median(r / f), floor_frac=np.median(flops / f / peak))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2, this CPU's core count)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per case (medians reported)")
    ap.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"],
                    help="which dtypes to run (default both; bf16 is very slow on CPUs without AVX-512)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tiny = S3DiTConfig.preset("tiny")
    mid = S3DiTConfig(dim=512, n_layers=8, n_refiner_layers=2, n_heads=8, n_kv_heads=8, cap_feat_dim=2560,
                      axes_dims=(16, 24, 24), axes_lens=(1024, 128, 128))
    cases = [
        ("(a) tiny, CFG batch 2, 32x32, caps 77/12", tiny, (32, 32), [77, 12], torch.float32),
        ("(b) d512 L8 H8, 64x64, caps 64", mid, (64, 64), [64], torch.float32),
        ("(b) d512 L8 H8, 64x64, caps 64", mid, (64, 64), [64], torch.bfloat16),
    ]
    dtypes = [getattr(torch, name) for name in args.dtypes]
    rows = [bench_case(name, cfg, hw, caps, dt, args.repeats) for name, cfg, hw, caps, dt in cases if dt in dtypes]

    print(f"threads={args.threads}  square-GEMM peak, median over each case's rounds: "
          + ", ".join(f"{r['case'][:3]} {r['dtype']} {r['peak']:.0f} GFLOP/s" for r in rows))
    print("| case | dtype | ms ours | ms diffusers | speed-up | GFLOP/s ours | of GEMM peak | max rel. diff "
          "| ms kernel floor | speed-up at floor | of peak at floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['dtype']} | {r['ours']:.1f} | {r['ref']:.1f} | {r['ratio']:.2f}x | "
              f"{r['gflops']:.0f} | {r['peak_frac']:.0%} | {r['rel_err']:.1e} | "
              f"{r['floor']:.1f} | {r['floor_ratio']:.2f}x | {r['floor_frac']:.0%} |")


if __name__ == "__main__":
    main()
