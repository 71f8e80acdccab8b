"""Seconds per Decoupled-DMD trainer step at the shapes teacher's size, to budget the runs.

    OMP_NUM_THREADS=2 python benchmarks/bench_distill_step.py [--batch 16 32] [--student-steps 4 8]

A random S3-DiT with ``configs/shapes/teacher.yaml``'s model section (10.7M parameters) on
8x8x16 latents (16 image tokens, as the shapes VAE gives for 64 px) and random 13-token
captions of width 128 (the mean length of a chat-formatted shapes caption under the shapes
tokenizer), trained by the shared Trainer exactly as ``zimagekit distill`` trains it, with
``configs/shapes/distill.yaml``'s settings (TTUR 5, hybrid, fp32). No encoders are needed:
the cost is the three S3-DiTs.

A trainer step is one fake-score update; every 5th also updates the student (three extra
teacher/fake calls with CFG and the student's backward pass), and backward simulation costs
k ~ U{0..N-1} student calls, so steps vary: the printed time is the mean over ``--cycles``
whole TTUR cycles (any 5 consecutive steps hold one student update) after one warm-up step.
Run it alone; a busy CPU inflates every number.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_step(batch: int, student_steps: int, cycles: int, root: Path) -> float:
    from zimagekit.algorithms import decoupled_dmd as dd
    from zimagekit.image_training import ZImageTrainConfig
    from zimagekit.runconfig import load_config
    from zimagekit.s3dit import S3DiT
    from zimagekit.trainer import IndexDataSource, Trainer

    cfg = load_config(dd.DistillConfig, ROOT / "configs" / "shapes" / "distill.yaml")
    model = load_config(ZImageTrainConfig, ROOT / "configs" / "shapes" / "teacher.yaml").model
    teacher_schedule = load_config(ZImageTrainConfig, ROOT / "configs" / "shapes" / "teacher.yaml").flow.schedule
    k = cfg.distill.fake_updates_per_student
    steps = 1 + k * cycles
    cfg = dataclasses.replace(
        cfg, model=model,
        distill=dataclasses.replace(cfg.distill, student_steps=student_steps, schedule=teacher_schedule),
        run=dataclasses.replace(cfg.run, dir=str(root), name=f"b{batch}-n{student_steps}"),
        train=dataclasses.replace(cfg.train, steps=steps, batch_size=batch, log_every=1, ckpt_every=0,
                                  sample_every=0, progress=False))
    torch.manual_seed(0)
    teacher = S3DiT(model)
    captions = [torch.randn(13, model.cap_feat_dim) for _ in range(4 * batch)]
    algo = dd.DecoupledDMD(teacher, cfg.distill, (model.in_channels, 1, 8, 8), torch.randn(11, model.cap_feat_dim))
    data = IndexDataSource(lambda idx: {"captions": [captions[i] for i in idx]}, len(captions), batch)
    trainer = Trainer(cfg, algo, data)
    trainer.fit()
    with (trainer.run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))[1:]  # step 1 warms up
    return sum(batch / float(r["samples_per_s"]) for r in rows) / len(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--student-steps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--cycles", type=int, default=1, help="timed TTUR cycles after the warm-up step (default 1)")
    args = parser.parse_args(argv)
    from zimagekit.algorithms.decoupled_dmd import DistillConfig
    from zimagekit.runconfig import load_config

    k = load_config(DistillConfig, ROOT / "configs" / "shapes" / "distill.yaml").distill.fake_updates_per_student
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"| batch | student steps | s / trainer step | s / student update (x{k}) |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            for n in args.student_steps:
                s = seconds_per_step(batch, n, args.cycles, Path(tmp))
                print(f"| {batch} | {n} | {s:.2f} | {k * s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
