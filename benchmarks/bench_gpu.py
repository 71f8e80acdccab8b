"""Speed on a GPU in one script: the S3-DiT forward (ours eager and compiled against diffusers
eager and compiled), a whole 8-step Turbo generation, and training throughput, with TFLOP/s
and the fraction of a square-GEMM peak measured in the same run.

    python benchmarks/bench_gpu.py                                   # a CUDA GPU, the released 6B config, bf16
    python benchmarks/bench_gpu.py --preset tiny --device cpu --dtype fp32 --repeats 1 --no-compile   # the CPU check

Every model has random weights; ours and diffusers' share them. Parts:

1. **peak**: the best of a few square GEMMs (8192³ on a GPU, 1024³ at ``tiny``).
2. **forward**, the three cases of issue 20 at 1024² (4,096 image tokens; ``tiny``: 256): batch
   1 with a 120-token caption, CFG batch 2 with captions 120 + 12, batch 4 with 120/80/60/30.
   Ours and diffusers', eager and with regional ``torch.compile`` (each transformer block
   compiled once, as diffusers' ``compile_repeated_blocks`` does), median of ``--repeats``
   after warm-up; TFLOP/s from :func:`zimagekit.s3dit.forward_flops`; activation memory =
   peak allocated during the forward minus the weights (CUDA only); the largest relative
   difference between ours and diffusers.
3. **generate**: Qwen3-4B-shaped text encoding of a 120-token prompt, 8 forwards at 1024²
   and the Flux VAE's decode, through ``ZImagePipeline`` (``tiny``: small components).
4. **train**: samples/s and MFU (3 x forward FLOPs per sample / peak) of a bf16-autocast
   training step (forward, backward, AdamW) in a bare loop, for the shapes teacher's config
   at batch 512 and for rank-64 LoRA on the ``--preset`` config at 1024², batch 1, with
   gradient checkpointing; and for the shapes teacher, zimagekit's ``Trainer`` running flow
   matching (EMA, clipping, logs) on data already on the device, as its log line measures it.

One table per part. ``--parts`` picks some; ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from zimagekit.s3dit import S3DiT, S3DiTConfig, forward_flops

CASES = {"batch 1, caption 120": [120], "CFG batch 2, captions 120 + 12": [120, 12],
         "batch 4, captions 120/80/60/30": [120, 80, 60, 30]}
SHAPES_TEACHER = dict(dim=256, n_layers=6, n_refiner_layers=2, n_heads=4, n_kv_heads=4, cap_feat_dim=128,
                      axes_dims=(16, 24, 24), axes_lens=(256, 64, 64))


class Clock:
    """Wall time with the device synchronised, and CUDA memory peaks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def median(self, fn, repeats: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def extra_memory(self, fn) -> float | None:
        """GiB allocated at the peak of ``fn`` beyond what was allocated before it (CUDA only)."""
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2**30


def gemm_peak(clock: Clock, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=clock.device, dtype=dtype)
    b = torch.randn(n, n, device=clock.device, dtype=dtype)
    return 2 * n**3 / min(clock.median(lambda: a @ b, 3, warmup=1) for _ in range(3))


def twin_models(cfg: S3DiTConfig, device, dtype):
    """diffusers' transformer with random weights and ours loaded from it."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its note on casting a model it built itself
    torch.manual_seed(0)
    with torch.device(device):
        ref = ZImageTransformer2DModel(**cfg.to_dict()).to(dtype).eval()
    with torch.device("meta"):
        ours = S3DiT(cfg)
    ours.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True)
    return ref, ours.to(device=device, dtype=dtype).eval()


def compile_blocks(model, mode: str | None = None) -> None:
    """Regional compilation, both models' ``compile_repeated_blocks`` (one graph per block
    type). Not ``fullgraph``: a graph break then costs speed, not the whole run. ``mode``:
    torch.compile's (``max-autotune``; ``reduce-overhead`` adds CUDA graphs)."""
    model.compile_repeated_blocks(**({"mode": mode} if mode else {}))


def part_forward(cfg, clock, dtype, side, repeats, peak, do_compile, mode=None) -> list[dict]:
    ref, ours = twin_models(cfg, clock.device, dtype)
    hw = side // 8  # latent cells; tokens = (hw / 2)²
    rows = []
    variants = [("zimagekit eager", ours, False), ("diffusers eager", ref, False)]
    if do_compile:
        import copy

        compiled_ours, compiled_ref = copy.deepcopy(ours), copy.deepcopy(ref)
        compile_blocks(compiled_ours, mode)
        compile_blocks(compiled_ref, mode)
        variants += [("zimagekit compiled", compiled_ours, True), ("diffusers compiled", compiled_ref, True)]
    for case, caps in CASES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(len(caps), cfg.in_channels, 1, hw, hw, generator=g).to(clock.device, dtype)
        t = torch.rand(len(caps), generator=g).to(clock.device)
        feats = [torch.randn(n, cfg.cap_feat_dim, generator=g).to(clock.device, dtype) for n in caps]
        flops = forward_flops(cfg, [(hw // 2) ** 2] * len(caps), caps)
        outputs = {}
        for name, model, _ in variants:
            def run(model=model, name=name):
                with torch.no_grad():
                    if name.startswith("diffusers"):
                        return torch.stack(model(list(x.unbind(0)), t, feats, return_dict=False)[0])
                    return model(x, t, feats)
            outputs[name] = run().float()
            seconds = clock.median(run, repeats)
            rows.append({"case": case, "model": name, "ms": 1000 * seconds, "tflops": flops / seconds / 1e12,
                         "of_peak": flops / seconds / peak, "act_gib": clock.extra_memory(run)})
        ref_out = outputs["diffusers eager"]
        diff = ((outputs["zimagekit eager"] - ref_out).abs().max() / ref_out.abs().max()).item()
        for row in rows[-len(variants):]:
            row["max_rel_diff_vs_diffusers"] = diff
    base = {r["case"]: r["ms"] for r in rows if r["model"] == "diffusers eager"}
    base_c = {r["case"]: r["ms"] for r in rows if r["model"] == "diffusers compiled"}
    for r in rows:
        r["vs_diffusers_eager"] = base[r["case"]] / r["ms"]
        if base_c:
            r["vs_diffusers_compiled"] = base_c[r["case"]] / r["ms"]
    return rows


def random_pipeline(cfg: S3DiTConfig, device, dtype, tiny: bool):
    """A ZImagePipeline of random components in the released shapes (or small ones)."""
    from zimagekit.autoencoder import AutoencoderConfig, AutoencoderKL
    from zimagekit.pipeline import ZImagePipeline
    from zimagekit.sampling import ScheduleConfig
    from zimagekit.text_encoder import Qwen3Config, Qwen3Encoder, Qwen3TextEncoder

    if tiny:
        qwen = Qwen3Config(vocab_size=1000, hidden_size=cfg.cap_feat_dim, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32)
        vae = AutoencoderConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=16,
                                norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False)
    else:  # Qwen3-4B and the Flux VAE
        qwen = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128)
        vae = AutoencoderConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                                norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                use_post_quant_conv=False)
    torch.manual_seed(0)
    with torch.device(device):
        encoder = Qwen3Encoder(qwen).to(dtype).eval()
        autoencoder = AutoencoderKL(vae).eval()
        transformer = S3DiT(cfg).to(dtype).eval()
    for module in (encoder, autoencoder, transformer):
        for p in module.parameters():
            p.data.normal_(0, 0.02)
    text = Qwen3TextEncoder(None, encoder, Path("."), Path("."))
    return ZImagePipeline(transformer, autoencoder, text, ScheduleConfig(shift=3.0), device), encoder


def part_generate(cfg, clock, dtype, side, repeats, tiny) -> list[dict]:
    pipe, encoder = random_pipeline(cfg, clock.device, dtype, tiny)
    ids = torch.randint(0, encoder.config.vocab_size, (1, 120), device=clock.device)

    def encode():
        with torch.no_grad():
            return [encoder(ids)[0]]

    def generate():
        return pipe(prompt_embeds=encode(), height=side, width=side, num_inference_steps=8, guidance_scale=0.0,
                    seed=0, output_type="pt", progress=False)

    rows = [{"stage": "text encoding, 120 tokens", "s": clock.median(encode, repeats)}]
    rows.append({"stage": f"whole generation, 8 steps, {side}x{side}", "s": clock.median(generate, max(1, repeats // 3),
                                                                                          warmup=1)})
    return rows


def part_train(cfg, clock, dtype, side, repeats, peak, tiny) -> list[dict]:
    from zimagekit.lora import LoRA

    rows = []
    for name, model_cfg, batch, hw, lora_rank in [
        (f"shapes teacher, batch {32 if tiny else 512}, 64x64", S3DiTConfig(**SHAPES_TEACHER), 32 if tiny else 512, 8,
         None),
        (f"LoRA r64 on the {'tiny' if tiny else '6B'} config, batch 1, {side}x{side}, checkpointing", cfg, 1,
         side // 8, 64),
    ]:
        torch.manual_seed(0)
        model = S3DiT(model_cfg).to(clock.device).train()
        if lora_rank:
            model.gradient_checkpointing = True
            params = list(LoRA.create(model, rank=lora_rank).parameters())
            model.to(dtype)  # the frozen base in bf16
        else:
            params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, model_cfg.in_channels, 1, hw, hw, generator=g).to(clock.device)
        caps = [torch.randn(30, model_cfg.cap_feat_dim, generator=g).to(clock.device) for _ in range(batch)]
        t = torch.rand(batch, generator=g).to(clock.device)
        autocast = torch.autocast(clock.device.type, dtype=dtype, enabled=dtype != torch.float32)

        def step():
            with autocast:
                loss = model(x, t, caps).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = clock.median(step, repeats)
        flops = 3 * forward_flops(model_cfg, [(hw // 2) ** 2] * batch, [30] * batch)
        rows.append({"setup": f"{name}: a bare loop", "samples_per_s": batch / seconds, "mfu": flops / seconds / peak})
        if lora_rank is None:
            speed = trainer_speed(model_cfg, batch, hw, clock.device, dtype, repeats)
            rows.append({"setup": f"{name}: zimagekit's Trainer (flow matching, EMA, clipping, logs)",
                         "samples_per_s": speed, "mfu": flops / batch * speed / peak})
    return rows


def trainer_speed(model_cfg, batch: int, hw: int, device, dtype, repeats: int) -> float:
    """Samples/s of ``zimagekit.trainer.Trainer`` running flow matching on data already on the
    device (as ``data.preload`` holds it), as its own log line measures them over the last
    ``repeats`` updates (after as many for warm-up)."""
    import csv
    import tempfile

    from zimagekit.algorithms.flow_matching import FlowMatching, FlowMatchingConfig
    from zimagekit.runconfig import load_config
    from zimagekit.trainer import IndexDataSource, Trainer

    torch.manual_seed(0)
    model = S3DiT(model_cfg).to(device)
    g = torch.Generator().manual_seed(1)
    size = 4 * batch
    latents = torch.randn(size, model_cfg.in_channels, 1, hw, hw, generator=g).to(device)
    captions = [torch.randn(30, model_cfg.cap_feat_dim, generator=g).to(device) for _ in range(size)]
    data = IndexDataSource(lambda idx: {"latents": latents[idx], "captions": [captions[i] for i in idx]},
                           size, batch)
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(FlowMatchingConfig, None, [
            f"run.dir={root}", "run.name=bench", f"train.steps={2 * repeats}", f"train.batch_size={batch}",
            f"train.log_every={repeats}", "train.ckpt_every=0", "train.progress=false",
            f"train.precision={'bf16' if dtype == torch.bfloat16 else 'fp32'}"])
        algorithm = FlowMatching(model, cfg.flow, torch.zeros(1, model_cfg.cap_feat_dim, device=device))
        trainer = Trainer(cfg, algorithm, data)
        trainer.fit()  # its final checkpoint is written after the last log line's window
        with open(f"{root}/bench/metrics.csv") as fh:
            return float(list(csv.DictReader(fh))[-1]["samples_per_s"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="z-image-turbo", choices=["z-image-turbo", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune",
                                                   "max-autotune-no-cudagraphs"],
                        help="torch.compile mode of both compiled variants (reduce-overhead: CUDA graphs)")
    parser.add_argument("--parts", default="forward,generate,train")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; for the CPU check pass --preset tiny --device cpu --dtype fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tiny = args.preset == "tiny"
    cfg = S3DiTConfig.preset(args.preset)
    side = 256 if tiny else 1024
    clock = Clock(device)
    peak = gemm_peak(clock, dtype, 1024 if tiny else 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.preset}, {args.dtype}; square-GEMM peak {peak / 1e12:.1f} TFLOP/s")
    results = {"device": name, "preset": args.preset, "dtype": args.dtype, "peak_tflops": peak / 1e12}
    parts = set(args.parts.split(","))
    if "forward" in parts:
        rows = results["forward"] = part_forward(cfg, clock, dtype, side, args.repeats, peak, not args.no_compile,
                                                   args.compile_mode)
        print("\n| case | model | ms | vs diffusers eager | vs diffusers compiled | TFLOP/s | of peak | act. GiB | max rel diff |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            compiled = f"{r['vs_diffusers_compiled']:.2f}x" if "vs_diffusers_compiled" in r else "-"
            act = f"{r['act_gib']:.2f}" if r["act_gib"] is not None else "-"
            print(f"| {r['case']} | {r['model']} | {r['ms']:.1f} | {r['vs_diffusers_eager']:.2f}x | {compiled} | "
                  f"{r['tflops']:.3g} | {100 * r['of_peak']:.0f}% | {act} | {r['max_rel_diff_vs_diffusers']:.1e} |")
    if "generate" in parts:
        rows = results["generate"] = part_generate(cfg, clock, dtype, side, args.repeats, tiny)
        print("\n| stage | s |\n|---|---|")
        for r in rows:
            print(f"| {r['stage']} | {r['s']:.3f} |")
    if "train" in parts:
        rows = results["train"] = part_train(cfg, clock, dtype, side, args.repeats, peak, tiny)
        print("\n| training setup | samples/s | MFU |\n|---|---|---|")
        for r in rows:
            print(f"| {r['setup']} | {r['samples_per_s']:.1f} | {100 * r['mfu']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
