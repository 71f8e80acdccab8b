"""The shapes-world teacher: an S3-DiT pre-trained by flow matching, as Z-Image was, on VAE
latents of rendered scenes with captions from the shapes text encoder; its export to a
folder in the Hugging Face layout of Z-Image-Turbo; and commands for its GenEval-style
evaluation (in :mod:`zimagekit.shapes.evaluation`).

    python -m zimagekit.shapes.teacher train --config configs/shapes/teacher.yaml [key=value ...]
    python -m zimagekit.shapes.teacher export runs/shapes-teacher OUT_FOLDER
    python -m zimagekit.shapes.teacher evaluate MODEL_FOLDER --steps 50 --cfg-scale 3 --out docs/...
    python -m zimagekit.shapes.teacher curve runs/shapes-teacher MODEL_FOLDER --out docs/...
    python -m zimagekit.shapes.teacher render runs/shapes-scenes --scenes 50000   # a dataset for zimagekit train

Both encoders are frozen, so the training set is encoded once and cached: scene i is
``world.sample_scene(seed + i)``, its latent is the VAE posterior mean (scaled like the
pipeline does), its caption feature is the text encoder's ``hidden_states[-2]``.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..algorithms.flow_matching import FlowMatching, FlowMatchingConfig
from ..cli.runs import add_run_commands
from ..errors import ZImageKitError, exit_code
from ..runconfig import load_config
from ..s3dit import S3DiT
from ..trainer import IndexDataSource, Trainer, load_trained, seed_everything
from ..vae_codec import scale_latents, to_vae_input
from ..fileio import atomic_folder, atomic_write
from . import world
from .evaluation import data_eval_set, evaluate_folder, format_metrics, learning_curve, measure, write_curves

IMAGE_SIZE = world.CANVAS


@dataclass
class SceneData:
    """Where the frozen encoders come from and which scenes make the training set."""

    vae: str = "models/shapes-vae"
    text_encoder: str = "models/shapes/text_encoder"
    tokenizer: str = "models/shapes/tokenizer"
    scenes: int = 20_000
    seed: int = 0
    cache_dir: str = "runs/cache"

    def __post_init__(self):
        if self.scenes < 1 or self.seed < 0:
            raise ZImageKitError(f"data.scenes must be >= 1 and data.seed >= 0, got {self.scenes} and {self.seed}")


@dataclass
class TeacherSection:
    """The transformer's stream structure, how the sample grid is drawn, and the sampling
    defaults the exported folder records."""

    # "dual_stream" trains the MMDiT-style counterfactual of zimagekit.dual_stream (same
    # embedders, token layout and final layer; model.n_layers dual blocks, no refiners) on
    # the same data, for the single- vs dual-stream comparison. It has no Z-Image folder
    # layout, so it is evaluated from its run directory (``curve --architecture``).
    architecture: Literal["single_stream", "dual_stream"] = "single_stream"
    # A Z-Image folder (or its transformer/ folder) whose transformer starts the run instead
    # of a random init: how a later session continues the shipped teacher (a fresh
    # optimizer; the shipped weights are the EMA). Its config must equal ``model``.
    init: str | None = None
    steps: int = 30
    guidance_scale: float = 3.0


def build_transformer(cfg: "TeacherConfig") -> S3DiT:
    """The transformer of the config's architecture: freshly initialised, or with the
    weights of ``teacher.init``."""
    if cfg.teacher.architecture == "dual_stream":
        from ..dual_stream import DualStreamDiT

        if cfg.teacher.init is not None:
            raise ZImageKitError("teacher.init loads a Z-Image (single-stream) transformer; a dual_stream run "
                                 "starts from scratch")
        return DualStreamDiT(cfg.model)
    model = S3DiT(cfg.model)
    if cfg.teacher.init is not None:
        folder = Path(cfg.teacher.init)
        start = S3DiT.from_pretrained(folder / "transformer" if (folder / "transformer").is_dir() else folder)
        if start.config != cfg.model:
            raise ZImageKitError(f"teacher.init={folder} holds a transformer with config {start.config}, not the "
                                 f"run's model section; copy its transformer/config.json values into model")
        model.load_state_dict(start.state_dict())
    return model


@dataclass
class TeacherConfig(FlowMatchingConfig):
    data: SceneData = field(default_factory=SceneData)
    teacher: TeacherSection = field(default_factory=TeacherSection)


# ----------------------------------------------------------------------------------------
# Frozen encoders and the cached training set
# ----------------------------------------------------------------------------------------


def load_encoders(data: SceneData, device: torch.device | str = "cpu"):
    """The shapes VAE and text encoder, frozen, fp32, on ``device``."""
    from ..autoencoder import AutoencoderKL
    from ..text_encoder import Qwen3TextEncoder

    for what, path in (("vae", data.vae), ("text_encoder", data.text_encoder), ("tokenizer", data.tokenizer)):
        if not Path(path).is_dir():
            raise ZImageKitError(f"data.{what}: no folder {path}; train it first (see README, 'Shapes world')")
    vae = AutoencoderKL.from_pretrained(data.vae, dtype=torch.float32, device=device).requires_grad_(False)
    text = Qwen3TextEncoder.from_pretrained(data.text_encoder, data.tokenizer, dtype=torch.float32, device=device)
    return vae, text


def _fingerprint(data: SceneData) -> str:
    """Cache key: the scene range and the bytes of both encoders' weights and configs."""
    h = hashlib.sha256(f"{data.scenes}:{data.seed}:{world.CANVAS}".encode())
    for folder in (data.vae, data.text_encoder, data.tokenizer):
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


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


def render_dataset(out: Path, scenes: int, seed: int) -> None:
    """Scenes ``seed .. seed + scenes - 1`` as PNGs under ``out/images/`` with their captions in
    ``out/metadata.jsonl`` (Hugging Face imagefolder layout): the shapes world as a dataset any
    image-caption trainer reads, ``zimagekit train`` included."""
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


@torch.no_grad()
def encode_scenes(data: SceneData, vae, text, batch: int = 64) -> dict[str, torch.Tensor]:
    """Latents (N, C, h, w) and caption features of scenes ``seed .. seed + N - 1``, cached in
    ``data.cache_dir`` under a key of the encoders' bytes, so a retrained encoder never
    reuses stale latents. Captions repeat a lot in this world: each distinct one is encoded once.
    The encoders run where they are; the returned tensors are on the CPU."""
    path = Path(data.cache_dir) / f"shapes-{_fingerprint(data)}.safetensors"
    if path.exists():
        return load_file(str(path))
    scene_captions, pixels = render_scenes(range(data.seed, data.seed + data.scenes))
    captions = sorted(set(scene_captions))
    feats = text.encode(captions)
    which = {c: i for i, c in enumerate(captions)}
    cfg = vae.config
    latents = []
    for i in range(0, len(pixels), batch):
        x = to_vae_input(torch.from_numpy(pixels[i : i + batch]).permute(0, 3, 1, 2)).to(vae.device)
        latents.append(scale_latents(vae.encode(x).latent_dist.mean, cfg).cpu())
    out = {
        "latents": torch.cat(latents).contiguous(),
        "caption_index": torch.tensor([which[c] for c in scene_captions]),
        "caption_lengths": torch.tensor([len(f) for f in feats]),
        "caption_features": torch.cat([f.float().cpu() for f in feats]).contiguous(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(out, str(p)))
    return out


def data_source(encoded: dict[str, torch.Tensor], batch_size: int, seed: int) -> IndexDataSource:
    feats = list(encoded["caption_features"].split(encoded["caption_lengths"].tolist()))
    latents, caption_of = encoded["latents"], encoded["caption_index"].tolist()

    def make_batch(idx):
        return {"latents": latents[idx].unsqueeze(2), "captions": [feats[caption_of[i]] for i in idx]}

    return IndexDataSource(make_batch, len(latents), batch_size, seed=seed)


def make_sampler(vae, text, schedule, steps: int, guidance_scale: float):
    """``sampler(model, prompts, seeds)`` for the trainer's grid: the real pipeline around the
    model being trained."""
    from ..pipeline import ZImagePipeline

    def sample(model, prompts, seeds):
        pipe = ZImagePipeline(model, vae, text, schedule)
        return [pipe(p, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps, guidance_scale=guidance_scale,
                     seed=s, progress=False)[0] for p, s in zip(prompts, seeds)]

    return sample


# ----------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------


def train(cfg: TeacherConfig) -> Path:
    """Train on CUDA when present (one process), else on the CPU."""
    from ..pipeline import resolve_device

    seed_everything(cfg.run.seed)
    device = resolve_device(None)
    vae, text = load_encoders(cfg.data, device)
    cfg.model.check_encoders(text.model.config.hidden_size, vae.config.latent_channels)
    encoded = {k: v.to(device) for k, v in encode_scenes(cfg.data, vae, text).items()}
    tokens = (cfg.model.image_tokens(*encoded["latents"].shape[-2:]), int(encoded["caption_lengths"].float().mean()))
    model = build_transformer(cfg).to(device)
    sampler = make_sampler(vae, text, cfg.flow.schedule, cfg.teacher.steps, cfg.teacher.guidance_scale)
    # forward_flops counts S3-DiT's layout; the dual-stream run logs no MFU.
    tokens = tokens if cfg.teacher.architecture == "single_stream" else None
    algorithm = FlowMatching(model, cfg.flow, text.encode([""])[0].float(), sampler, tokens_per_sample=tokens)
    trainer = Trainer(cfg, algorithm, data_source(encoded, cfg.train.batch_size, cfg.data.seed))
    trainer.fit()
    return trainer.run_dir


def export(run_dir: Path, out: Path, use_ema: bool = True) -> None:
    """Write the run's latest transformer (EMA weights by default, stored in bf16) with the
    encoders it was trained on as a Z-Image folder (model_index.json, transformer/,
    text_encoder/, tokenizer/, vae/, scheduler/), recording the sampling defaults in
    model_index.json."""
    from ..pipeline import ZImagePipeline

    cfg = load_config(TeacherConfig, run_dir / "config.yaml")
    if cfg.teacher.architecture != "single_stream":
        raise ZImageKitError(f"{run_dir} trained a {cfg.teacher.architecture} model, which has no Z-Image folder "
                             f"layout; evaluate its checkpoints with `curve` instead")
    model = S3DiT(cfg.model)
    load_trained(run_dir, "transformer", model, use_ema)
    vae, text = load_encoders(cfg.data)
    defaults = {"num_inference_steps": cfg.teacher.steps, "guidance_scale": cfg.teacher.guidance_scale,
                "height": IMAGE_SIZE, "width": IMAGE_SIZE}
    # bf16 storage halves the shipped size. The VAE's weights are bf16 values already (see
    # zimagekit.shapes.vae.export), so its copy is exact.
    with atomic_folder(out) as tmp:
        ZImagePipeline(model, vae, text, cfg.flow.schedule, defaults=defaults).save_pretrained(tmp, torch.bfloat16)


def training_flops_per_sample(cfg: TeacherConfig, encoded: dict[str, torch.Tensor], batch: int = 16) -> float:
    """FLOPs of one flow-matching training step (forward and backward) per sample, as
    PyTorch's FLOP counter (matmuls and attention) counts them on the first ``batch``
    cached training samples: the one yardstick both stream structures are measured with."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_transformer(cfg)
    item = data_source(encoded, batch, 0).make_batch(list(range(batch)))
    with FlopCounterMode(display=False) as counter:
        pred = model(item["latents"], torch.full((batch,), 0.5), item["captions"])
        pred.float().square().mean().backward()
    return counter.get_total_flops() / batch


def run_curve(run_dir: Path, pipe, group: str, steps: int, guidance_scale: float, images_per_prompt: int,
              combos: str = "held_out") -> tuple["TeacherConfig", list[dict]]:
    """The run's config and :func:`learning_curve` of its checkpoints, sampled through ``pipe``'s
    encoders and schedule with a transformer built from the run's own config (single- or
    dual-stream, whatever the folder's transformer is)."""
    cfg = load_config(TeacherConfig, run_dir / "config.yaml")
    pipe.transformer = build_transformer(cfg).eval()
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
        vae, text = load_encoders(cfg.data)
        flops = training_flops_per_sample(cfg, encode_scenes(cfg.data, vae, text))
        name = f"{cfg.teacher.architecture} ({run_dir.name})"
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
    add_run_commands(sub, "flow-matching pre-training of the shapes teacher",
                     "write a run's EMA transformer + encoders as a Z-Image model folder")
    r = sub.add_parser("render", help="write scenes as an image folder with metadata.jsonl, the dataset layout "
                       "`zimagekit train` reads (configs/shapes/teacher-train.yaml)")
    r.add_argument("out", type=Path, help="the folder to write (replaced if it exists)")
    r.add_argument("--scenes", type=int, default=50_000, help="how many scenes (default 50000)")
    r.add_argument("--seed", type=int, default=1_000_000, help="scene i is world.sample_scene(seed + i) "
                   "(default 1000000, the teacher's)")
    v = sub.add_parser("evaluate", help="judge a model folder on the held-out eval prompts")
    v.add_argument("model", type=Path, help="a Z-Image model folder")
    v.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    v.add_argument("--cfg-scale", type=float, default=3.0, help="guidance w in pos + w(pos - neg) (default 3)")
    v.add_argument("--images-per-prompt", type=int, default=4, help="images per eval prompt, fixed seeds (default 4)")
    v.add_argument("--out", type=Path, help="folder for results.jsonl, summary.txt, metrics.json and grid.png")
    v.add_argument("--seed-offset", type=int, default=0, help="added to every seed; 432 (108 prompts x 4 images) "
                   "gives a disjoint set, to check a difference on fresh samples (default 0)")
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
    args = parser.parse_args(argv)

    def run():
        if args.command == "train":
            print(f"run directory: {train(load_config(TeacherConfig, args.config, args.overrides))}")
        elif args.command == "render":
            render_dataset(args.out, args.scenes, args.seed)
            print(f"wrote {args.scenes} scenes to {args.out}")
        elif args.command == "export":
            export(args.run_dir, args.out, use_ema=not args.no_ema)
            print(f"wrote {args.out}")
        elif args.command == "streams":
            compare_streams(args.runs, args.model, args.steps, args.cfg_scale, args.images_per_prompt, args.out,
                            args.prompts)
            print((args.out / "streams.md").read_text(), end="")
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
