"""Evaluation of shapes-world models: GenEval-style judge accuracy on the held-out eval prompts,
plus the distribution metrics that make a distilled student's failure modes visible as numbers
(Decoupled-DMD §3.2: CFG augmentation alone drives saturation and image variance up and
diversity down until the model collapses).

    python -m zimagekit.shapes.evaluation compare --teacher TEACHER --student STUDENT8 --student STUDENT4 \\
        --out docs/distill/results
    python -m zimagekit.shapes.evaluation curves runs/ablation-hybrid runs/ablation-coupled ... \\
        --out docs/distill/ablation

``compare`` samples the teacher with CFG at 50 and at 8 Euler steps and each student at its
folder's defaults (N steps, no CFG), and writes results.md, results.json and a sample grid
per model. ``curves`` judges every kept checkpoint of distillation runs and writes one panel
per metric, one line per run (curves.png, curves.csv) and a table of each run's last
checkpoint (ablation.md). Both put the data, rendered by the world itself for the same
prompts and seeds, next to the models.

Every eval image is fixed by (entry, image): eval entry e (an index into
:func:`world.eval_prompts`) gets seeds e, e + E, e + 2E, ... (E entries), so repeated prompts
get new images, and more images per prompt only adds images. An image is the one
``zimagekit generate PROMPT -s SEED`` draws with the same steps and guidance.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ZImageKitError, exit_code
from ..trainer import image_grid, load_trained
from ..vae_codec import from_vae_output, to_uint8, to_vae_input
from . import world
from .judge import Report, judge_all, to_rgb

IMAGE_SIZE = world.CANVAS

# A pixel is foreground (an object, or paint where the background should be) when its RGB
# distance from the world's background exceeds this, on a 0..1 scale. Every palette colour is
# >= 0.8 away (yellow, the nearest, 0.80), the VAE's background noise stays far below it, and
# an anti-aliased edge counts once it is about a third of the way to its colour.
FOREGROUND_DISTANCE = 0.25

METRICS = ("diversity", "saturation", "mean", "std")


# ----------------------------------------------------------------------------------------
# The eval set: images of the held-out prompts at fixed seeds
# ----------------------------------------------------------------------------------------


def eval_jobs(images_per_prompt: int, combos: str = "held_out", seed_offset: int = 0) -> list[tuple[int, world.Prompt, int]]:
    """``(entry, prompt, seed)`` for image j of every entry e of ``world.eval_prompts(combos)``,
    seed = offset + e + j·E, entry-major. An offset of k·E·images gives a disjoint seed set,
    to check a difference on fresh samples."""
    if images_per_prompt < 1:
        raise ZImageKitError(f"images per prompt must be at least 1, got {images_per_prompt}")
    if seed_offset < 0:
        raise ZImageKitError(f"seed offset must be >= 0, got {seed_offset}")
    prompts = world.eval_prompts(combos)
    return [(e, p, seed_offset + e + j * len(prompts)) for e, p in enumerate(prompts) for j in range(images_per_prompt)]


@torch.no_grad()
def generate_eval_set(pipe, steps: int | None = None, guidance_scale: float | None = None,
                      images_per_prompt: int = 4, batch: int = 72, combos: str = "held_out", seed_offset: int = 0):
    """``(image, prompt, {"entry": e, "seed": s})`` for every job of :func:`eval_jobs`, drawn by
    ``pipe`` in batches; ``None`` takes the folder's default. Each image has its own generator
    seeded with s, so batching does not change it."""
    jobs = eval_jobs(images_per_prompt, combos, seed_offset)
    samples = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        images = pipe([p.text for _, p, _ in chunk], height=IMAGE_SIZE, width=IMAGE_SIZE,
                      num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=[torch.Generator().manual_seed(s) for _, _, s in chunk], progress=False)
        samples += [(im, p, {"entry": e, "seed": s}) for im, (e, p, s) in zip(images, chunk)]
    return samples


def data_eval_set(images_per_prompt: int = 4, combos: str = "held_out"):
    """The data's answer to the same jobs: ``world.scene_for_prompt(prompt, seed)`` rendered
    (eval split, so held-out colour-shape pairs appear). This, not a sample of training scenes,
    is the reference, because the eval prompts' mix of counts and colours is not the training
    mix, and image mean, std and saturation move with it."""
    return [(world.render(world.scene_for_prompt(p, s, split="eval")), p, {"entry": e, "seed": s})
            for e, p, s in eval_jobs(images_per_prompt, combos)]


@torch.no_grad()
def vae_round_trip(vae, samples, batch: int = 64):
    """``samples`` with each image encoded (posterior mean) and decoded by ``vae``: what a
    model that drew the data exactly would show after its decoder. The VAE's shift and scale
    cancel, so they are skipped."""
    out = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        x = to_vae_input(torch.from_numpy(np.stack([to_rgb(im) for im, *_ in chunk])).permute(0, 3, 1, 2))
        y = from_vae_output(vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean).sample)
        out += [(p, *rest) for p, (_, *rest) in zip(to_uint8(y), chunk)]
    return out


# ----------------------------------------------------------------------------------------
# Distribution metrics (images as float arrays (N, H, W, 3) in [0, 1])
# ----------------------------------------------------------------------------------------


def diversity(images: np.ndarray, groups) -> float | None:
    """Mean pairwise distance between images of the same prompt, averaged over prompts:

        d(a, b) = sqrt(mean over the H·W·3 values of (a − b)²),
        diversity = mean over groups g of mean over pairs i < j in g of d(x_i, x_j)

    ``groups[i]`` is image i's group (its eval entry). 0 when every prompt gives one image
    whatever the seed (mode collapse); the data's value is the reference. ``None`` when no
    group holds two images."""
    images = np.asarray(images, np.float64)
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    per_group = [np.mean([np.sqrt(np.mean((images[a] - images[b]) ** 2)) for a, b in itertools.combinations(idx, 2)])
                 for idx in members.values() if len(idx) >= 2]
    return float(np.mean(per_group)) if per_group else None


def hsv_saturation(images: np.ndarray) -> np.ndarray:
    """HSV saturation per pixel, S = (max − min) / max of (r, g, b), and 0 for black."""
    images = np.asarray(images, np.float64)
    hi, lo = images.max(-1), images.min(-1)
    return np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1), 0.0)


def saturation(images: np.ndarray) -> float | None:
    """Mean HSV saturation S = (max − min)/max over the foreground pixels of all images,
    foreground = RGB distance from the world's background > FOREGROUND_DISTANCE.

    Why this measure: every pixel of the data is background (S = 0) or a palette colour
    (S = 0.68 purple .. 0.88 orange), so the data's value is fixed by its colour mix, and
    leaving the background out keeps the number independent of how much area the objects
    cover (the judge scores counts and sizes). Over-saturation, CFG pushed past the data,
    drives a colour's smallest channel to 0 and S towards 1; washed-out or greyed colours
    lower it; so both directions show, unlike a fraction of pixels above a cut-off. Soft
    decoded edges lower it a little, which is why a VAE round trip of the data is the
    reference for decoded models. ``None`` when no image has a foreground pixel."""
    images = np.asarray(images, np.float64)
    background = np.asarray(world.BACKGROUND, np.float64) / 255
    foreground = np.linalg.norm(images - background, axis=-1) > FOREGROUND_DISTANCE
    return float(hsv_saturation(images)[foreground].mean()) if foreground.any() else None


def mean_std(images: np.ndarray) -> tuple[float, float]:
    """(mean over images of μ_i, mean over images of σ_i), where μ_i and σ_i are the mean and
    the (population) standard deviation of image i's H·W·3 values: the per-image statistics
    of Decoupled-DMD's Eq. 7, whose variance §3.2 sees rising under CFG augmentation alone."""
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    return float(flat.mean(1).mean()), float(flat.std(1).mean())


def measure(samples) -> tuple[Report, dict]:
    """Judge ``(image, prompt, {"entry": e, ...})`` samples and measure them: the report, and
    a row with the image count, each category's accuracy, ``overall`` (GenEval's mean of the
    categories) and the four distribution metrics."""
    report = judge_all(samples)
    pixels = np.stack([to_rgb(im) for im, *_ in samples]).astype(np.float64) / 255
    mean, std = mean_std(pixels)
    row = {"images": len(samples), **report.accuracy(), "overall": report.overall,
           "diversity": diversity(pixels, [ids["entry"] for *_, ids in samples]),
           "saturation": saturation(pixels), "mean": mean, "std": std}
    return report, row


def format_metrics(row: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    return "  ".join(f"{k} {fmt(row[k])}" for k in METRICS)


def read_results(folders: list[Path]) -> list[dict]:
    """The per-image records (results.jsonl) of evaluation folders, concatenated."""
    records = []
    for folder in folders:
        path = Path(folder) / "results.jsonl"
        if not path.is_file():
            raise ZImageKitError(f"{folder}: no results.jsonl; write one with zimagekit shapes teacher evaluate "
                                 f"MODEL --out {folder}")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                raise ZImageKitError(f"{path}:{n}: not valid JSON ({e.msg}); evaluate the model again") from None
            if record is not None:
                if not (isinstance(record, dict) and {"entry", "seed", "category", "correct"} <= record.keys()):
                    raise ZImageKitError(f"{path}:{n}: a judged image needs 'entry', 'seed', 'category' and "
                                         "'correct'; is this an evaluate --out folder?")
                records.append(record)
    return records


def paired_difference(a: list[dict], b: list[dict], resamples: int = 10_000, seed: int = 0) -> dict:
    """Overall judge accuracy of records ``a`` minus records ``b`` on the images both judged
    (the same eval entry and seed: one prompt, one initial noise), with a 95 % bootstrap
    interval. Like ``overall``, the difference is the mean of the categories' differences. The
    bootstrap resamples prompts within each category, not images: a prompt's images are judged
    on the same few objects, so they err together, and an interval over images would be too
    narrow (docs/rl.md: one model moves 3.5 points between seed sets of 432 images)."""
    def by_key(records, side):
        keyed = {}
        for r in records:
            key = (r["entry"], r["seed"])
            if key in keyed:
                raise ZImageKitError(f"{side}: image (entry {key[0]}, seed {key[1]}) is judged twice; list each "
                                     "evaluation folder once")
            keyed[key] = r
        return keyed

    ka, kb = by_key(a, "the first models"), by_key(b, "the second models")
    common = sorted(ka.keys() & kb.keys())
    if not common:
        raise ZImageKitError("the two sides share no judged image (the same eval entry and seed); evaluate them "
                             "with the same --seed-offset and --prompts")
    per_entry: dict[str, dict[int, list[float]]] = {}  # category -> entry -> [sum of differences, images]
    for key in common:
        cell = per_entry.setdefault(ka[key]["category"], {}).setdefault(key[0], [0.0, 0])
        cell[0] += float(ka[key]["correct"]) - float(kb[key]["correct"])
        cell[1] += 1
    rng = np.random.default_rng(seed)
    point, draws = [], []
    for cells in per_entry.values():
        diff, n = np.array(list(cells.values())).T
        point.append(diff.sum() / n.sum())
        idx = rng.integers(0, len(diff), (resamples, len(diff)))
        draws.append(diff[idx].sum(1) / n[idx].sum(1))
    overall = np.mean(draws, axis=0)
    low, high = np.percentile(overall, [2.5, 97.5])
    return {"difference": float(np.mean(point)), "low": float(low), "high": float(high), "images": len(common),
            "prompts": len({key[0] for key in common})}


# ----------------------------------------------------------------------------------------
# One model, and a model over the checkpoints of a run
# ----------------------------------------------------------------------------------------


def evaluate_folder(model_folder: Path, steps: int | None, guidance_scale: float | None, images_per_prompt: int = 4,
                    out: Path | None = None, combos: str = "held_out", seed_offset: int = 0) -> tuple[Report, dict]:
    """:func:`measure` of ``model_folder``'s eval set (``None``: the folder's default steps or
    guidance; ``combos``: the held-out prompts or their seen-combination twin). With ``out``,
    also writes results.jsonl (per image), summary.txt, metrics.json (the row) and grid.png
    (image 0 of every entry, one category per row)."""
    from ..pipeline import ZImagePipeline

    samples = generate_eval_set(ZImagePipeline.from_pretrained(model_folder), steps, guidance_scale,
                                images_per_prompt, combos=combos, seed_offset=seed_offset)
    report, row = measure(samples)
    if out is not None:
        _write_eval(out, samples, report, row)
    return report, row


def _write_eval(out: Path, samples, report: Report, row: dict) -> None:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    report.write_jsonl(out / "results.jsonl")
    (out / "summary.txt").write_text(f"{report.summary()}\n{format_metrics(row)}\n")
    (out / "metrics.json").write_text(json.dumps(row, indent=1) + "\n")
    seen = set()
    firsts = [im for im, _, ids in samples if ids["entry"] not in seen and not seen.add(ids["entry"])]  # image 0 of each
    firsts = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in firsts]
    image_grid(firsts, cols=world.EVAL_PER_CATEGORY).save(out / "grid.png")


def learning_curve(run_dir: Path, pipe, group: str, steps: int | None = None, guidance_scale: float | None = None,
                   images_per_prompt: int = 1, combos: str = "held_out") -> list[dict]:
    """:func:`measure` of every checkpoint kept in ``run_dir``, its EMA weights of ``group``
    loaded into ``pipe.transformer`` in turn and sampled through ``pipe`` (``None``: the
    pipe's default steps or guidance): one row per checkpoint, its step first."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.removeprefix("step_")))
    if not ckpts:
        raise ZImageKitError(f"{run_dir}: no checkpoints to evaluate (checkpoints/step_* is missing)")
    rows = []
    for ckpt in ckpts:
        load_trained(run_dir, group, pipe.transformer, checkpoint=ckpt)
        _, row = measure(generate_eval_set(pipe, steps, guidance_scale, images_per_prompt, combos=combos))
        rows.append({"step": int(ckpt.name.removeprefix("step_")), **row})
    return rows


PANELS = (("overall", "judge accuracy (overall)"), ("diversity", "diversity across seeds"),
          ("saturation", "colour saturation (foreground)"), ("std", "image std"), ("mean", "image mean"))


def write_curves(curves: dict[str, list[dict]], out: Path, title: str, reference: dict | None = None) -> None:
    """curves.csv (one row per run and checkpoint) and curves.png: one panel per metric, one
    line per run, the ``reference`` row (the data) dashed, but for accuracy in the panel's
    title; with a single run the accuracy panel also shows each category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = [{"run": name, **r} for name, run_rows in curves.items() for r in run_rows]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "curves.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.6))
    for ax, (key, label) in zip(axes, PANELS):
        for name, run_rows in curves.items():
            values = [np.nan if r.get(key) is None else r[key] for r in run_rows]
            ax.plot([r["step"] for r in run_rows], values, "-o", lw=1.5, ms=3, label=name)
        if key == "overall" and len(curves) == 1:
            (run_rows,) = curves.values()
            for cat in world.CATEGORIES:
                ax.plot([r["step"] for r in run_rows], [r.get(cat) for r in run_rows], lw=1, alpha=0.5, label=cat)
        heading = label
        if reference is not None and reference.get(key) is not None:
            if key == "overall":  # the data's ~100 % as a line would flatten runs a few points apart
                heading = f"{label} (data: {100 * reference[key]:.0f} %)"
            else:
                ax.axhline(reference[key], color="k", ls="--", lw=1, label="data")
        ax.set(xlabel="training step", title=heading)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Tables: models side by side, and the last checkpoint of each ablation run
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A model as it is sampled for the table; ``steps``/``guidance_scale`` None: the folder's
    defaults (how a student is meant to be run)."""

    name: str
    folder: Path
    steps: int | None = None
    guidance_scale: float | None = None


def markdown_table(rows: list[dict], first: tuple[str, ...]) -> str:
    """A markdown table of ``rows``: the ``first`` columns as they are, then each category's
    accuracy and overall in percent, then the distribution metrics."""
    def num(v, pct=False):
        return "-" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.3f}")

    head = [*first, "overall %", *(f"{c} %" for c in world.CATEGORIES), *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ["-" if r.get(k) is None else f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in first]
        cells.append(num(r.get("overall"), True))
        cells += [num(r.get(c), True) for c in world.CATEGORIES] + [num(r.get(m)) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(entries: list[Entry], images_per_prompt: int, out: Path, vae_folder: Path | None = None) -> list[dict]:
    """Evaluate each entry (plus the data, and the data through ``vae_folder``'s VAE) on the
    same jobs; write out/<name>/{results.jsonl, summary.txt, metrics.json, grid.png},
    out/results.json and out/results.md (the table, and each later model's overall score
    against the first's). Returns the rows; NFE counts transformer calls (two per step with
    CFG)."""
    from ..pipeline import ZImagePipeline

    if len({e.name for e in entries}) != len(entries):
        raise ZImageKitError(f"model names must differ, got {[e.name for e in entries]}")
    data = data_eval_set(images_per_prompt)
    sets = [("data", None, None, data)]
    pipes = {}
    if vae_folder is not None:
        pipes[vae_folder] = ZImagePipeline.from_pretrained(vae_folder)
        sets.append(("data through the VAE", None, None, vae_round_trip(pipes[vae_folder].vae, data)))
    for e in entries:
        if e.folder not in pipes:  # the teacher's rows share one load
            pipes[e.folder] = ZImagePipeline.from_pretrained(e.folder)
        pipe = pipes[e.folder]
        steps = e.steps or pipe.defaults["num_inference_steps"]
        w = pipe.defaults["guidance_scale"] if e.guidance_scale is None else e.guidance_scale
        sets.append((e.name, steps, w, generate_eval_set(pipe, steps, w, images_per_prompt)))
    rows = []
    for name, steps, w, samples in sets:
        report, row = measure(samples)
        _write_eval(out / _slug(name), samples, report, row)
        nfe = None if steps is None else steps * (2 if w > 0 else 1)
        rows.append({"model": name, "steps": steps, "cfg w": w, "NFE": nfe, **row})
        print(f"{name:<32} overall {100 * row['overall']:5.1f}%  {format_metrics(row)}", flush=True)
    settings = {"images_per_prompt": images_per_prompt, "prompts": len(world.eval_prompts()),
                "seeds": "entry e, image j: seed e + j * (number of entries)",
                "models": {e.name: str(e.folder) for e in entries}}
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    # Issue 5's bar is relative to the first model (the teacher at 50 steps with CFG).
    models = rows[len(sets) - len(entries):]
    gaps = "".join(f"\n- {r['model']}: {100 * (r['overall'] - models[0]['overall']):+.1f} points overall against "
                   f"{models[0]['model']}" for r in models[1:])
    (out / "results.md").write_text(
        f"{len(world.eval_prompts())} held-out eval prompts x {images_per_prompt} images (fixed seeds); "
        f"NFE = transformer calls per image.\n\n" + markdown_table(rows, ("model", "steps", "cfg w", "NFE"))
        + "\n" + gaps + "\n")
    return rows


def ablation_curves(run_dirs: list[Path], images_per_prompt: int, out: Path) -> dict[str, list[dict]]:
    """The learning curve of each distillation run's student (EMA), sampled as it will be
    shipped (its N steps, stochastic, no CFG); curves.png/csv and ablation.md (each run's
    last checkpoint, and the data) in ``out``. DMDR runs (``zimagekit rl``) count as
    distillation runs: their student is sampled the same way."""
    from ..algorithms.decoupled_dmd import DistillConfig, student_pipeline
    from ..algorithms.dmdr import DMDRConfig
    from ..runconfig import peek_config

    names = [d.name for d in run_dirs]
    if len(set(names)) != len(names):
        raise ZImageKitError(f"run directories need distinct names, got {names}")
    curves = {}
    for run_dir in run_dirs:
        if not (run_dir / "config.yaml").is_file():
            raise ZImageKitError(f"{run_dir}: not a distillation run (config.yaml is missing)")
        dmdr = peek_config(run_dir / "config.yaml", (), "algorithm") == "dmdr"
        pipe = student_pipeline(run_dir, True, DMDRConfig if dmdr else DistillConfig)
        curves[run_dir.name] = learning_curve(run_dir, pipe, "student", images_per_prompt=images_per_prompt)
        last = curves[run_dir.name][-1]
        print(f"{run_dir.name:<24} step {last['step']:>6}  overall {100 * last['overall']:5.1f}%  "
              f"{format_metrics(last)}", flush=True)
    _, reference = measure(data_eval_set(images_per_prompt))
    write_curves(curves, out, f"{images_per_prompt} images per eval prompt", reference)
    rows = [{"run": "data", **reference}] + [{"run": name, **r[-1]} for name, r in curves.items()]
    (out / "ablation.md").write_text(
        f"Last checkpoint of each run; {len(world.eval_prompts())} eval prompts x {images_per_prompt} images.\n\n"
        + markdown_table(rows, ("run", "step")) + "\n")
    return curves


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-").lower()


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zimagekit.shapes.evaluation",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="teacher (with CFG, 50 and 8 steps) vs students (their defaults): "
                       "results.md, results.json, a grid per model")
    c.add_argument("--teacher", type=Path, required=True, help="the teacher's model folder")
    c.add_argument("--teacher-steps", type=int, nargs="+", default=[50, 8],
                   help="the teacher's Euler step counts (default 50 8)")
    c.add_argument("--cfg-scale", type=float, default=3.0,
                   help="the teacher's guidance w in pos + w(pos - neg); the students' real score used the same "
                        "(default 3)")
    c.add_argument("--student", type=Path, action="append", default=[],
                   help="a student folder, sampled at its own defaults (N steps, no CFG); repeatable")
    c.add_argument("--images-per-prompt", type=int, default=4, help="images per eval prompt (default 4)")
    c.add_argument("--out", type=Path, required=True, help="output folder, e.g. docs/distill/results")
    v = sub.add_parser("curves", help="metrics over the kept checkpoints of distillation runs: "
                       "curves.png, curves.csv, ablation.md")
    v.add_argument("runs", type=Path, nargs="+", help="distillation run directories (line labels: their names)")
    v.add_argument("--images-per-prompt", type=int, default=4, help="images per eval prompt (default 4)")
    v.add_argument("--out", type=Path, required=True, help="output folder, e.g. docs/distill/ablation")
    args = parser.parse_args(argv)

    def run():
        if args.images_per_prompt < 2:
            raise ZImageKitError(f"--images-per-prompt must be at least 2 (diversity compares images of one "
                                 f"prompt), got {args.images_per_prompt}")
        if args.command == "compare":
            if any(s < 1 for s in args.teacher_steps):
                raise ZImageKitError(f"--teacher-steps must be >= 1, got {args.teacher_steps}")
            entries = [Entry(f"teacher {s} steps", args.teacher, s, args.cfg_scale) for s in args.teacher_steps]
            entries += [Entry(f"student {f.name}", f) for f in args.student]
            compare(entries, args.images_per_prompt, args.out, vae_folder=args.teacher)
            print(f"wrote {args.out / 'results.md'}")
        else:
            ablation_curves(args.runs, args.images_per_prompt, args.out)
            print(f"wrote {args.out / 'curves.png'} and {args.out / 'ablation.md'}")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
