"""The first image a user sees: whole-process wall time of ``zimagekit generate "PROMPT"`` (no
other flags: the shipped Turbo model, its defaults, bf16) against a plain diffusers script doing
the same on the same folder, each a fresh process.

    python benchmarks/bench_first_image.py [--model FOLDER] [--repeats 7] [--prompt "a yellow circle"]

A process's time is everything a user waits for: Python start-up, imports, loading the weights,
encoding the prompt, sampling, decoding and writing the PNG. Both commands run alternately
after one warm-up each (which fills the OS file cache); medians, and the ratio is diffusers /
ours. The diffusers script loads with ``torch_dtype=bfloat16``, keeps the VAE in fp32 as
zimagekit does (``force_upcast``) and samples at the folder's defaults with the same seed.
The images are not compared here: the shipped Turbo samples stochastically, and diffusers
draws that per-step noise from the global RNG, not the seeded generator (README, "The
pipeline"); image equality is the pipeline tests' job.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "zimagekit" / "models" / "shapes-turbo"

DIFFUSERS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from diffusers import ZImagePipeline
    folder, prompt, out, steps, width, height, guidance = sys.argv[1:8]
    pipe = ZImagePipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    pipe.vae.to(torch.float32)
    image = pipe(prompt, num_inference_steps=int(steps), width=int(width), height=int(height),
                 guidance_scale=float(guidance), generator=torch.Generator().manual_seed(42)).images[0]
    image.save(out)
""")


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:4])} ... failed:\n{done.stderr.strip()[-2000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SHIPPED, help="a Z-Image folder (default: the shipped Turbo)")
    parser.add_argument("--prompt", default="a yellow circle")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    from zimagekit.errors import ZImageKitError
    from zimagekit.pipeline import ModelFolder

    try:
        defaults = ModelFolder.open(args.model).defaults
    except ZImageKitError as e:
        sys.exit(f"error: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        ours_png, ref_png, script = Path(tmp) / "ours.png", Path(tmp) / "diffusers.png", Path(tmp) / "ref.py"
        script.write_text(DIFFUSERS_SCRIPT)
        ours = [sys.executable, "-m", "zimagekit", "generate", args.prompt, "-o", str(ours_png), "-s", "42"]
        if args.model != SHIPPED:
            ours += ["--model", str(args.model)]
        ref = [sys.executable, str(script), str(args.model), args.prompt, str(ref_png),
               *(str(defaults[k]) for k in ("num_inference_steps", "width", "height", "guidance_scale"))]
        rounds = interleaved([lambda: run(ours), lambda: run(ref)], args.repeats)
    t_ours, t_ref = (sorted(r[i] for r in rounds)[len(rounds) // 2] for i in (0, 1))
    print(f"model: {args.model} ({defaults['width']}x{defaults['height']}, {defaults['num_inference_steps']} steps, "
          f"guidance {defaults['guidance_scale']:g}, bf16); {args.repeats} rounds after one warm-up each, medians\n")
    print("| command | s per image (process wall time) | range | speed-up vs diffusers |")
    print("|---|---|---|---|")
    for name, i, t in (("`zimagekit generate`", 0, t_ours), ("diffusers script", 1, t_ref)):
        times = [r[i] for r in rounds]
        print(f"| {name} | {t:.2f} | {min(times):.2f}–{max(times):.2f} | {t_ref / t:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
