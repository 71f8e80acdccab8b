"""zimagekit's pipeline vs diffusers' ZImagePipeline: seconds and peak memory, same folder.

    python benchmarks/bench_pipeline.py [--threads 2] [--repeats 7] [--dtype fp32]

A random Z-Image folder is written by diffusers (tests/pipeline_fixtures.py) with the real
Qwen3 tokenizer and small components: Qwen3 hidden 1024 / 4 layers in Qwen3-4B's head layout
(vocab 151,936), S3-DiT dim 256 / 4 layers / 2+2 refiners, a 4-block 16-channel VAE, shift 3.

  (1) text encoding, max_sequence_length 512, a 30-token prompt, alone and with a negative
      prompt (CFG): the reference pads each to 512 and runs every layer and the norm, once per
      prompt list; ours runs the real lengths, one layer less, prompt and negative in one batch;
  (2) whole generation, 256x256, 8 steps: guidance 0 (Turbo) and guidance 3 with a negative
      prompt, inpainting (a rectangle mask, strength 1, against ZImageInpaintPipeline) and a
      ControlNet (v1 layout, 2 control blocks, random weights, against ZImageControlNetPipeline);
      both pipelines get the same seed, and the max abs difference of the images is printed
      next to the times;
  (3) peak memory, each case in a fresh process: resident-set growth over the post-import
      baseline (Linux VmHWM after resetting it) for text encoding alone and for a whole
      generation as each library is normally used (ours: encode, free the text encoder, then
      load the transformer; diffusers: load everything, generate).

Ours and the reference are timed alternately; medians.  One run prints one table.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pipeline_fixtures import TINY_TRANSFORMER, TINY_VAE, build_qwen3_tokenizer, build_tiny_zimage_folder  # noqa: E402
from timing import alternate  # noqa: E402

# Qwen3-4B's layout (head_dim 128, 4:1 grouped KV, FFN 3.75x hidden), 1024 wide and 4 deep.
BENCH_QWEN3 = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3840, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, head_dim=128, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip
BENCH_TRANSFORMER = {
    **TINY_TRANSFORMER, "dim": 256, "n_layers": 4, "n_refiner_layers": 2, "n_heads": 4, "n_kv_heads": 4,
    "cap_feat_dim": 1024, "axes_dims": [16, 24, 24], "axes_lens": [1536, 512, 512],
}  # fmt: skip
BENCH_VAE = {**TINY_VAE, "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 32}
# 30 tokens before the chat template (checked below).
PROMPT = (
    "A red fox sitting in fresh snow under pine trees at dawn, soft golden light, "
    "shallow depth of field, detailed fur, 35mm photo"
)
NEGATIVE = "blurry, low quality"
SIZE, STEPS = 256, 8


def load_both(folder: Path, dtype: torch.dtype):
    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    from zimagekit.pipeline import ZImagePipeline

    ours = ZImagePipeline.from_pretrained(folder, dtype=dtype, device="cpu")
    ref = DiffusersZImagePipeline.from_pretrained(folder, dtype=dtype)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def speed(folder: Path, dtype: torch.dtype, repeats: int) -> list[tuple[str, float, float, str]]:
    ours, ref = load_both(folder, dtype)
    n_tokens = len(ours.text_encoder.tokenizer([PROMPT])[0])
    assert n_tokens == 30, n_tokens
    rows = []

    t_ours, t_ref = alternate(
        lambda: ours.encode_prompt([PROMPT], max_sequence_length=512),
        lambda: ref.encode_prompt([PROMPT], do_classifier_free_guidance=False, max_sequence_length=512),
        repeats,
    )
    diff = (
        (ours.encode_prompt(PROMPT)[0] - ref.encode_prompt([PROMPT], do_classifier_free_guidance=False)[0][0])
        .abs()
        .max()
    )
    rows.append(("text encoding, 30-token prompt, max_sequence_length 512", t_ours, t_ref, f"{diff.item():.1e}"))

    t_ours, t_ref = alternate(
        lambda: ours.encode_prompt([PROMPT, NEGATIVE], max_sequence_length=512),
        lambda: ref.encode_prompt(
            [PROMPT], negative_prompt=[NEGATIVE], do_classifier_free_guidance=True, max_sequence_length=512
        ),
        repeats,
    )
    pos, neg = ref.encode_prompt([PROMPT], negative_prompt=[NEGATIVE], do_classifier_free_guidance=True)
    diff = max((a - b).abs().max().item() for a, b in zip(ours.encode_prompt([PROMPT, NEGATIVE]), pos + neg))
    rows.append(("text encoding, same + negative prompt (CFG)", t_ours, t_ref, f"{diff:.1e}"))

    for label, kwargs in [
        (f"generate {SIZE}x{SIZE}, {STEPS} steps, guidance 0", dict(guidance_scale=0.0)),
        (
            f"generate {SIZE}x{SIZE}, {STEPS} steps, guidance 3 + negative",
            dict(guidance_scale=3.0, negative_prompt=NEGATIVE),
        ),
    ]:
        common = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="pt", **kwargs)
        run_ours = functools.partial(ours, **common, seed=0, progress=False)

        def run_ref(common=common):
            # deepcopy: diffusers rewrites prompt lists in place
            return ref(**copy.deepcopy(common), generator=torch.Generator().manual_seed(0)).images

        t_ours, t_ref = alternate(run_ours, run_ref, max(3, repeats // 2))
        rows.append((label, t_ours, t_ref, f"{(run_ours() - run_ref()).abs().max().item():.1e}"))

    # Inpainting: diffusers' ZImageInpaintPipeline on the same components.
    import numpy as np
    from diffusers import ZImageInpaintPipeline
    from PIL import Image

    inpaint = ZImageInpaintPipeline(**ref.components)
    inpaint.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.RandomState(0).rand(SIZE, SIZE, 3) * 255).astype(np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 :] = 255
    common = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=0.0, strength=1.0, output_type="pt")
    run_ours = functools.partial(ours, image=image, mask_image=Image.fromarray(mask), **common, seed=0, progress=False)

    def run_inpaint():
        return inpaint(image=image, mask_image=Image.fromarray(mask), **common,
                       generator=torch.Generator().manual_seed(0)).images

    t_ours, t_ref = alternate(run_ours, run_inpaint, max(3, repeats // 2))
    rows.append((f"inpaint {SIZE}x{SIZE}, {STEPS} steps, strength 1", t_ours, t_ref,
                 f"{(run_ours() - run_inpaint()).abs().max().item():.1e}"))

    # ControlNet (v1 layout, a control block after every other layer), random weights.
    from diffusers import ZImageControlNetModel, ZImageControlNetPipeline

    from zimagekit.controlnet import ZImageControlNet
    from zimagekit.pipeline import ZImagePipeline

    torch.manual_seed(0)
    net = ZImageControlNetModel(
        control_layers_places=[0, 2], control_in_dim=16, dim=BENCH_TRANSFORMER["dim"],
        n_refiner_layers=BENCH_TRANSFORMER["n_refiner_layers"], n_heads=BENCH_TRANSFORMER["n_heads"],
        n_kv_heads=BENCH_TRANSFORMER["n_kv_heads"]).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    net.save_pretrained(folder / "controlnet")
    controlled = ZImagePipeline(ours.transformer, ours.vae, ours.text_encoder, ours.schedule,
                                controlnet=ZImageControlNet.from_pretrained(folder / "controlnet", dtype=dtype))
    reference = ZImageControlNetPipeline(**ref.components, controlnet=net)
    reference.set_progress_bar_config(disable=True)
    common = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=0.0, height=SIZE, width=SIZE,
                  control_image=image, controlnet_conditioning_scale=0.75, output_type="pt")
    run_ours = functools.partial(controlled, **common, seed=0, progress=False)

    def run_control():
        return reference(**common, generator=torch.Generator().manual_seed(0)).images

    t_ours, t_ref = alternate(run_ours, run_control, max(3, repeats // 2))
    rows.append((f"ControlNet {SIZE}x{SIZE}, {STEPS} steps, 2 control blocks", t_ours, t_ref,
                 f"{(run_ours() - run_control()).abs().max().item():.1e}"))
    return rows


# -- memory: one fresh process per case ----------------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_worker(case: str, folder: Path, dtype: torch.dtype) -> None:
    """Runs in a child process: prints the peak RSS growth (MiB) of one case as JSON."""
    from diffusers import ZImagePipeline as DiffusersZImagePipeline
    from transformers import AutoTokenizer, Qwen3Model

    from zimagekit.pipeline import ZImagePipeline, load_text_encoder

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    with torch.no_grad():
        if case == "ours-encode":
            load_text_encoder(folder, dtype, "cpu").encode([PROMPT], 512)
        elif case == "ref-encode":
            ref = DiffusersZImagePipeline(
                scheduler=None, vae=None, transformer=None,
                text_encoder=Qwen3Model.from_pretrained(folder / "text_encoder", dtype=dtype),
                tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
            )  # fmt: skip
            ref.encode_prompt(
                [PROMPT], device=torch.device("cpu"), do_classifier_free_guidance=False, max_sequence_length=512
            )
        elif case == "ours-generate":
            encoder = load_text_encoder(folder, dtype, "cpu")
            embeds = encoder.encode([PROMPT], 512)
            del encoder
            pipe = ZImagePipeline.from_pretrained(folder, dtype, "cpu", load_text_encoder=False)
            pipe(prompt_embeds=embeds, height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=0, progress=False)
        elif case == "ref-generate":
            ref = DiffusersZImagePipeline.from_pretrained(folder, dtype=dtype)
            ref.set_progress_bar_config(disable=True)
            ref([PROMPT], height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=0.0)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - base) / 1024}))


def memory(folder: Path, dtype_name: str, threads: int) -> list[tuple[str, float, float, str]]:
    def peak(case: str) -> float:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-worker", case, "--folder", str(folder), "--dtype", dtype_name,
             "--threads", str(threads)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]

    return [
        ("peak RSS growth (MiB), text encoding", peak("ours-encode"), peak("ref-encode"), ""),
        (f"peak RSS growth (MiB), load + generate {SIZE}x{SIZE}", peak("ours-generate"), peak("ref-generate"), ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.memory_worker:
        memory_worker(args.memory_worker, args.folder, dtype)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_zimage_folder(
            Path(tmp) / "bench-zimage",
            build_qwen3_tokenizer(),
            transformer=BENCH_TRANSFORMER,
            vae=BENCH_VAE,
            qwen3=BENCH_QWEN3,
        )
        rows = speed(folder, dtype, args.repeats) + memory(folder, args.dtype, args.threads)

    versions = f"diffusers {diffusers.__version__}, torch {torch.__version__}"
    print(f"\nzimagekit vs {versions}, {args.dtype}, {args.threads} threads; ratio = diffusers / ours")
    print(f"{'case':<58} {'ours':>10} {'diffusers':>10} {'ratio':>7}  max|diff|")
    for label, ours, ref, diff in rows:
        cells = [f"{v:8.1f}  " if "MiB" in label else f"{v:8.4f} s" for v in (ours, ref)]
        print(f"{label:<58} {cells[0]} {cells[1]} {ref / ours:6.1f}x  {diff}")


if __name__ == "__main__":
    main()
