"""The shapes-world teacher: an S3-DiT pre-trained by flow matching, as Z-Image was, on VAE
latents of rendered scenes with captions from the shapes text encoder. It trains through the
general ``zimagekit train``: the world is a dataset (:func:`scenes`, named in a config as
``data.path: zimagekit.shapes.teacher:scenes``), encoded once into the latent cache like any
user's images. This module adds what only the shapes world has: its GenEval-style evaluation
(in :mod:`zimagekit.shapes.evaluation`) and the single- vs dual-stream comparison.

    zimagekit train --config configs/shapes/teacher.yaml [key=value ...]      # or: shapes teacher train
    zimagekit train export runs/shapes-teacher OUT_FOLDER                    # or: shapes teacher export
    python -m zimagekit.shapes.teacher evaluate MODEL_FOLDER --steps 50 --cfg-scale 3 --out docs/...
    python -m zimagekit.shapes.teacher paired --a EVAL_DIR ... --b EVAL_DIR ...  # A - B, 95 % interval
    python -m zimagekit.shapes.teacher curve runs/shapes-teacher MODEL_FOLDER --out docs/...
    python -m zimagekit.shapes.teacher render runs/shapes-scenes --scenes 50000   # PNGs for other trainers
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import ZImageKitError, exit_code
from ..fileio import atomic_folder
from ..image_training import ZImageTrainConfig, build_transformer, encoded_data, open_folder
from ..runconfig import load_config
from . import world
from .evaluation import (data_eval_set, evaluate_folder, format_metrics, learning_curve, measure, paired_difference,
                         read_results, write_curves)

TEACHER_SCENES = 1_000_000  # scene i of the teacher's data is world.sample_scene(TEACHER_SCENES + i): disjoint
# from the VAE's training scenes


def _render_range(seeds: range) -> tuple[list[str], np.ndarray]:
    scenes = [world.sample_scene(seed) for seed in seeds]
    return [s.caption for s in scenes], np.stack([world.render(s) for s in scenes])


def render_scenes(seeds: range, chunk: int = 2000) -> tuple[list[str], np.ndarray]:
    """Captions and uint8 (N, 64, 64, 3) pixels of ``world.sample_scene(seed)`` for each seed.
    Drawing and rendering is numpy work of about 0.75 ms a scene, so a large set is split
    over one process per core (100,000 scenes: 75 s in one process)."""
    parts = [seeds[i : i + chunk] for i in range(0, len(seeds), chunk)]
    workers = min(len(parts), len(os.sched_getaffinity(0)))
    if workers < 2:
        results = [_render_range(part) for part in parts]
    else:
        # spawn, not fork: the parent may hold a CUDA context, which a fork must not inherit.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_render_range, parts))
    return [c for captions, _ in results for c in captions], np.concatenate([px for _, px in results])


class SceneDataset:
    """Scenes ``seed .. seed + count - 1`` of the world as a dataset of the latent cache
    (:class:`zimagekit.datasets.CaptionedImages`). Nothing is drawn until the cache asks for
    captions or images; then every scene is drawn and rendered at once, over all cores."""

    def __init__(self, count: int, seed: int = TEACHER_SCENES):
        if count < 1 or seed < 0:
            raise ZImageKitError(f"scenes: count must be >= 1 and seed >= 0, got {count} and {seed}")
        self.count, self.seed = count, seed
        self._rendered = None

    def __len__(self) -> int:
        return self.count

    def _scenes(self) -> tuple[list[str], np.ndarray]:
        if self._rendered is None:
            self._rendered = render_scenes(range(self.seed, self.seed + self.count))
        return self._rendered

    def captions(self) -> list[str]:
        return self._scenes()[0]

    def load(self, i: int):
        from PIL import Image

        captions, pixels = self._scenes()
        return Image.fromarray(pixels[i]), captions[i]

    def identity(self):
        """The scene range and the world's code: a changed world is a new dataset."""
        yield ["shapes", self.seed, self.count, hashlib.sha256(Path(world.__file__).read_bytes()).hexdigest()]


def scenes(count: int) -> SceneDataset:
    """The teacher's training scenes, for ``data.path: zimagekit.shapes.teacher:scenes``."""
    return SceneDataset(count)


def render_dataset(out: Path, scenes: int, seed: int) -> None:
    """Scenes ``seed .. seed + scenes - 1`` as PNGs under ``out/images/`` with their captions in
    ``out/metadata.jsonl`` (Hugging Face imagefolder layout): the shapes world as files that
    any image-caption trainer reads."""
    import json

    from PIL import Image

    if scenes < 1 or seed < 0:
        raise ZImageKitError(f"--scenes must be >= 1 and --seed >= 0, got {scenes} and {seed}")
    captions, pixels = render_scenes(range(seed, seed + scenes))
    with atomic_folder(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        rows = []
        for i, (caption, px) in enumerate(zip(captions, pixels)):
            name = f"images/{seed + i:08d}.png"
            Image.fromarray(px).save(tmp / name)
            rows.append(json.dumps({"file_name": name, "text": caption}))
        (tmp / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def training_flops_per_sample(cfg: ZImageTrainConfig, batch: int = 16) -> float:
    """FLOPs of one flow-matching training step (forward and backward) per sample, as
    PyTorch's FLOP counter (matmuls and attention) counts them on the first ``batch`` items
    of the run's latent cache: the one yardstick both stream structures are measured with."""
    from torch.utils.flop_counter import FlopCounterMode

    folder = open_folder(cfg)
    model = build_transformer(cfg, folder)
    cache = encoded_data(cfg, folder, "cpu")
    item = cache.batch(list(range(min(batch, len(cache)))), "cpu")  # the world's scenes share one bucket
    n = len(item["captions"])
    with FlopCounterMode(display=False) as counter:
        pred = model(item["latents"], torch.full((n,), 0.5), item["captions"])
        pred.float().square().mean().backward()
    return counter.get_total_flops() / n


def run_curve(run_dir: Path, pipe, group: str, steps: int, guidance_scale: float, images_per_prompt: int,
              combos: str = "held_out") -> tuple[ZImageTrainConfig, list[dict]]:
    """The run's config and :func:`learning_curve` of its checkpoints, sampled through ``pipe``'s
    encoders and schedule with a transformer built from the run's own config (single- or
    dual-stream, whatever the folder's transformer is)."""
    cfg = load_config(ZImageTrainConfig, run_dir / "config.yaml")
    pipe.transformer = build_transformer(cfg, open_folder(cfg)).eval()
    return cfg, learning_curve(run_dir, pipe, group, steps, guidance_scale, images_per_prompt, combos)


def compare_streams(run_dirs: list[Path], model_folder: Path, steps: int, guidance_scale: float,
                    images_per_prompt: int, out: Path, combos: str = "held_out") -> list[dict]:
    """Single- vs dual-stream (issue 6): every kept checkpoint of each run judged through
    ``model_folder``'s encoders and schedule, each row with its training compute (steps x
    batch x FLOPs per sample); writes curves.csv/png (per step), accuracy_vs_flops.png and
    streams.md (parameters, FLOPs, and accuracy at the last checkpoint and at equal compute)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from ..pipeline import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(model_folder)
    curves, facts = {}, {}
    for run_dir in run_dirs:
        cfg, rows = run_curve(run_dir, pipe, "transformer", steps, guidance_scale, images_per_prompt, combos)
        flops = training_flops_per_sample(cfg)
        name = f"{cfg.architecture} ({run_dir.name})"
        for r in rows:
            r["training_flops"] = r["step"] * cfg.train.batch_size * cfg.train.grad_accum_steps * flops
        curves[name] = rows
        facts[name] = {"parameters": sum(p.numel() for p in pipe.transformer.parameters()), "flops": flops}
    _, data = measure(data_eval_set(images_per_prompt, combos))
    write_curves(curves, out, f"single vs dual stream: {steps} steps, w = {guidance_scale:g}, {combos} prompts",
                 reference=data)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        ax.plot([r["training_flops"] for r in rows], [r["overall"] for r in rows], "-o", ms=3, label=name)
    ax.set(xscale="log", xlabel="training FLOPs (PyTorch's counter)", ylabel="judge accuracy (overall)", ylim=(0, 1))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_flops.png", dpi=120)
    plt.close(fig)

    # Equal compute: each run at its last checkpoint within the smallest final budget.
    budget = min(rows[-1]["training_flops"] for rows in curves.values())
    lines = ["| model | parameters | training GFLOP / sample | steps | overall (last) | "
             f"overall at {budget:.3g} FLOPs |", "|---|---|---|---|---|---|"]
    for name, rows in curves.items():
        within = [r for r in rows if r["training_flops"] <= budget * 1.0001]
        at = f"{100 * within[-1]['overall']:.1f}% (step {within[-1]['step']})" if within else "- (no checkpoint)"
        lines.append(f"| {name} | {facts[name]['parameters']:,} | {facts[name]['flops'] / 1e9:.2f} | "
                     f"{rows[-1]['step']} | {100 * rows[-1]['overall']:.1f}% | {at} |")
    (out / "streams.md").write_text("\n".join(lines) + "\n")
    return [{"run": n, **r} for n, rows in curves.items() for r in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zimagekit.shapes.teacher", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # Listed for --help; both are handed to `zimagekit train` before parsing.
    sub.add_parser("train", add_help=False, help="flow-matching training: `zimagekit train` (--config "
                   "configs/shapes/teacher.yaml)")
    sub.add_parser("export", add_help=False, help="a run as a Z-Image folder: `zimagekit train export`")
    r = sub.add_parser("render", help="write scenes as an image folder with metadata.jsonl, for trainers that read "
                       "files (zimagekit train reads the world directly: data.path: zimagekit.shapes.teacher:scenes)")
    r.add_argument("out", type=Path, help="the folder to write (replaced if it exists)")
    r.add_argument("--scenes", type=int, default=50_000, help="how many scenes (default 50000)")
    r.add_argument("--seed", type=int, default=TEACHER_SCENES, help="scene i is world.sample_scene(seed + i) "
                   f"(default {TEACHER_SCENES}, the teacher's)")
    v = sub.add_parser("evaluate", help="judge a model folder on the held-out eval prompts")
    v.add_argument("model", type=Path, help="a Z-Image model folder")
    v.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    v.add_argument("--cfg-scale", type=float, default=3.0, help="guidance w in pos + w(pos - neg) (default 3)")
    v.add_argument("--images-per-prompt", type=int, default=4, help="images per eval prompt, fixed seeds (default 4)")
    v.add_argument("--out", type=Path, help="folder for results.jsonl, summary.txt, metrics.json and grid.png")
    v.add_argument("--seed-offset", type=int, default=0, help="added to every seed; 432 (108 prompts x 4 images) "
                   "gives a disjoint set, to check a difference on fresh samples (default 0)")
    a = sub.add_parser("paired", help="is model A ahead of model B? The overall accuracy difference on the images "
                       "both evaluations judged (same prompt and seed), with a 95 %% interval that resamples prompts")
    a.add_argument("--a", type=Path, nargs="+", required=True, metavar="EVAL_DIR",
                   help="evaluate --out folders of model A, one per seed set (each holds results.jsonl)")
    a.add_argument("--b", type=Path, nargs="+", required=True, metavar="EVAL_DIR",
                   help="the same for model B; images are paired by prompt and seed, so the order does not matter")
    a.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    c = sub.add_parser("curve", help="judge and measure every checkpoint of a run: curves.csv and curves.png")
    c.add_argument("run_dir", type=Path, help="the training run directory")
    c.add_argument("model", type=Path, help="a Z-Image model folder with the run's encoders and scheduler (e.g. "
                   "the exported teacher); a dual-stream run's transformer replaces the folder's")
    c.add_argument("--group", default="transformer", help="the checkpoint group to load (default transformer)")
    c.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    c.add_argument("--cfg-scale", type=float, default=3.0, help="guidance w (default 3)")
    c.add_argument("--images-per-prompt", type=int, default=1,
                   help="images per eval prompt, fixed seeds; diversity needs 2 (default 1)")
    c.add_argument("--out", type=Path, required=True, help="folder for curves.csv and curves.png")
    d = sub.add_parser("streams", help="single- vs dual-stream runs: accuracy against training compute")
    d.add_argument("runs", type=Path, nargs="+", help="training run directories (e.g. runs/shapes-teacher "
                   "runs/shapes-dual-stream)")
    d.add_argument("--model", type=Path, required=True, help="a Z-Image folder with the runs' encoders and scheduler")
    d.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    d.add_argument("--cfg-scale", type=float, default=3.0, help="guidance w (default 3)")
    d.add_argument("--images-per-prompt", type=int, default=1, help="images per eval prompt (default 1)")
    d.add_argument("--out", type=Path, required=True, help="folder for curves, accuracy_vs_flops.png and streams.md")
    for p in (v, c, d):
        p.add_argument("--prompts", choices=world.PROMPT_SETS, default="held_out",
                       help="held_out: the eval prompts, which name held-out colour-shape pairs (default); seen: "
                       "their twin naming only training pairs, to tell unlearnt from ungeneralised")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "export"):
        from ..cli import train as train_cli

        return train_cli.main(argv)
    args = parser.parse_args(argv)

    def run():
        if args.command == "render":
            render_dataset(args.out, args.scenes, args.seed)
            print(f"wrote {args.scenes} scenes to {args.out}")
        elif args.command == "streams":
            compare_streams(args.runs, args.model, args.steps, args.cfg_scale, args.images_per_prompt, args.out,
                            args.prompts)
            print((args.out / "streams.md").read_text(), end="")
        elif args.command == "paired":
            if args.resamples < 100:
                raise ZImageKitError(f"--resamples must be at least 100 for a 95 % interval, got {args.resamples}")
            d = paired_difference(read_results(args.a), read_results(args.b), args.resamples)
            print(f"A - B: {100 * d['difference']:+.1f} points (95 % interval {100 * d['low']:+.1f} to "
                  f"{100 * d['high']:+.1f}) on {d['images']} paired images of {d['prompts']} prompts")
        elif args.command == "evaluate":
            report, row = evaluate_folder(args.model, args.steps, args.cfg_scale, args.images_per_prompt,
                                          args.out, combos=args.prompts, seed_offset=args.seed_offset)
            print(f"{report.summary()}\n{format_metrics(row)}")
        else:
            from ..pipeline import ZImagePipeline

            pipe = ZImagePipeline.from_pretrained(args.model)
            _, rows = run_curve(args.run_dir, pipe, args.group, args.steps, args.cfg_scale, args.images_per_prompt,
                                args.prompts)
            _, data = measure(data_eval_set(args.images_per_prompt, args.prompts))
            write_curves({args.run_dir.name: rows}, args.out, f"{args.run_dir.name}: {args.steps} steps, "
                         f"w = {args.cfg_scale:g}, {args.prompts} prompts", reference=data)
            for r in rows:
                print(f"step {r['step']:>7}: overall {100 * r['overall']:.1f}%  {format_metrics(r)}")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
