"""Quantized transformer weights: peak memory of loading and one forward, and the forward's time,
for the same S3-DiT stored as bf16 safetensors, GGUF Q8_0 and Q4_0 files (written by the gguf
package's own quantizers) and fp8; ours against diffusers' GGUF loading of the same files.

    python benchmarks/bench_quantized.py [--threads 2] [--repeats 5] [--dim 1536 --layers 6]

Each case runs in a fresh process: peak resident-set growth over the post-import baseline
(Linux VmHWM after resetting it) while loading the transformer and running one forward (batch
1, 32x32 latent = 256 image tokens, a 64-token caption, compute in ``--dtype``: fp32 by
default, as bf16 matmuls crawl on AVX2-only CPUs; the dense case holds its weights in that
dtype), then the median forward time over ``--repeats``. ``stored MiB`` is the bytes the loaded model holds. The model is a
random S3-DiT of the released layout at a smaller width and depth (default d1536, 6 layers,
2+2 refiners: 0.3B parameters), so the weights dominate the memory as they do for the 6B.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CASES = ["dense", "fp8", "Q8_0", "Q4_0", "diffusers-Q8_0", "diffusers-Q4_0"]


def config(dim: int, layers: int):
    from zimagekit.s3dit import S3DiTConfig

    # head_dim 128 and RoPE axes as released; dim / 128 heads
    return S3DiTConfig(dim=dim, n_layers=layers, n_refiner_layers=2, n_heads=dim // 128, n_kv_heads=dim // 128,
                       cap_feat_dim=2560, axes_dims=(32, 48, 48), axes_lens=(1536, 512, 512))


def write_files(folder: Path, dim: int, layers: int) -> None:
    """A bf16 safetensors folder and GGUF files (diffusers' names) whose blocks' weights are
    quantized by the gguf package (tests/test_quantized.py writes them)."""
    from test_quantized import write_gguf

    from zimagekit.s3dit import S3DiT

    torch.manual_seed(0)
    model = S3DiT(config(dim, layers)).to(torch.bfloat16)
    model.save_pretrained(folder / "bf16")
    blocks = ("layers.", "noise_refiner.", "context_refiner.")
    for kind in ("Q8_0", "Q4_0"):
        write_gguf(folder / f"{kind}.gguf", model.state_dict(), kind, layout="diffusers",
                   only=lambda key: key.startswith(blocks))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(case: str, folder: Path, repeats: int, dtype: torch.dtype) -> None:
    from zimagekit.quantized import quantize_fp8, stored_bytes
    from zimagekit.s3dit import S3DiT

    cfg = S3DiT.config_class.from_json(folder / "bf16" / "config.json")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 32, 32, generator=g).to(dtype)
    t = torch.tensor([0.5])
    caps = [torch.randn(64, cfg.cap_feat_dim, generator=g).to(dtype)]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    if case.startswith("diffusers-"):
        from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

        model = ZImageTransformer2DModel.from_single_file(
            str(folder / f"{case.split('-')[1]}.gguf"), config=str(folder / "bf16"), local_files_only=True,
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), torch_dtype=dtype)
        forward = lambda: model(list(x.unbind(0)), t, caps)  # noqa: E731
    else:
        source = folder / ("bf16" if case in ("dense", "fp8") else f"{case}.gguf")
        model = S3DiT.from_pretrained(source, dtype=dtype, config=cfg)
        if case == "fp8":
            quantize_fp8(model)
        forward = lambda: model(x, t, caps)  # noqa: E731
    model.eval()
    with torch.no_grad():
        forward()
        peak = (_rss_kib("VmHWM") - base) / 1024
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
    stored = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20
    if not case.startswith("diffusers-"):
        stored = stored_bytes(model) / 2**20
    print(json.dumps({"peak_mib": peak, "stored_mib": stored, "seconds": statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1536, help="width, a multiple of 384 so every block row fits "
                        "32-weight blocks as the released 3840 does (default 1536)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (default fp32)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.folder, args.repeats, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_files(folder, args.dim, args.layers)
        rows = {}
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--worker", case, "--folder", str(folder), "--threads",
                                  str(args.threads), "--repeats", str(args.repeats), "--dtype", args.dtype],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"error: case {case} failed:\n{out.stderr.strip()[-2000:]}")
            rows[case] = json.loads(out.stdout.strip().splitlines()[-1])
    params = sum(p.numel() for p in __import__("zimagekit.s3dit", fromlist=["S3DiT"]).S3DiT(
        config(args.dim, args.layers)).parameters())
    print(f"\nS3-DiT d{args.dim} L{args.layers}, {params / 1e6:.0f}M parameters, {args.dtype} compute, "
          f"{args.threads} threads; one forward at 256 image + 64 caption tokens")
    print(f"| weights | stored MiB | peak RSS growth, load + forward (MiB) | forward s | vs dense ({args.dtype}) forward |")
    print("|---|---|---|---|---|")
    for case, r in rows.items():
        print(f"| {case} | {r['stored_mib']:.0f} | {r['peak_mib']:.0f} | {r['seconds']:.3f} | "
              f"{r['seconds'] / rows['dense']['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
