"""Whole-process `zimagekit generate` time: the teacher (50 steps with CFG) against the distilled
student (its own defaults: N steps, no CFG), each a fresh subprocess, as a user runs them.

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py \\
        [--teacher src/zimagekit/models/shapes-teacher] [--student src/zimagekit/models/shapes-turbo] \\
        [--student-steps 8] [--repeats 5] [--dtype fp32] [--prompt "a blue circle"]

A process's time includes Python start-up, imports, loading the weights, encoding the prompt,
sampling, decoding and writing the PNG, so the ratio is what a user feels, smaller than the
ratio of transformer calls (100 vs 8). Teacher and student run alternately after one warm-up
each (which fills the OS file cache); medians. NFE counts transformer calls per image (two per
step with CFG). ``--dtype fp32`` by default because the shapes models are tiny and CPUs
without native bf16 run bf16 matmuls far slower; pass ``--dtype bf16`` for what `generate`
does by default.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import alternate  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "src" / "zimagekit" / "models"


def command(folder: Path, out: Path, args, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "zimagekit", "generate", args.prompt, "--model", str(folder), "-o", str(out),
            "-s", "0", "--dtype", args.dtype, "--no-progress", *flags]


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{done.stderr.strip()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, default=MODELS / "shapes-teacher")
    parser.add_argument("--student", type=Path, default=MODELS / "shapes-turbo")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="the teacher's guidance w (default 3)")
    parser.add_argument("--student-steps", type=int, default=None,
                        help="the student's step count (default: its folder's). The time does not depend on the "
                             "weights, so a 4-step student sampled at 8 steps times an 8-NFE student")
    parser.add_argument("--prompt", default="a blue square to the left of an orange circle")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for flag in ("teacher_steps", "student_steps", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")

    from zimagekit.errors import ZImageKitError
    from zimagekit.pipeline import ModelFolder

    try:
        student = ModelFolder.open(args.student).defaults
        ModelFolder.open(args.teacher)
    except ZImageKitError as e:
        sys.exit(f"error: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        teacher_flags = ["--steps", str(args.teacher_steps), "--cfg-scale", str(args.cfg_scale)]
        teacher_cmd = command(args.teacher, Path(tmp) / "teacher.png", args, teacher_flags)
        student_flags = [] if args.student_steps is None else ["--steps", str(args.student_steps)]
        student_cmd = command(args.student, Path(tmp) / "student.png", args, student_flags)
        started = time.perf_counter()
        t_teacher, t_student = alternate(lambda: run(teacher_cmd), lambda: run(student_cmd), args.repeats)
        total = time.perf_counter() - started
    steps = student["num_inference_steps"] if args.student_steps is None else args.student_steps
    w = student["guidance_scale"]
    source = "folder defaults" if args.student_steps is None else "--student-steps, folder's guidance"
    rows = [("teacher", args.teacher, f"{args.teacher_steps} steps, w = {args.cfg_scale:g}",
             args.teacher_steps * (2 if args.cfg_scale > 0 else 1), t_teacher),
            ("student", args.student, f"{steps} steps, w = {w:g} ({source})", steps * (2 if w > 0 else 1),
             t_student)]
    print(f"`zimagekit generate`, one {student['width']}x{student['height']} image, --dtype {args.dtype}, "
          f"median of {args.repeats} processes each ({total:.0f} s in all)\n")
    print("| model | folder | sampling | NFE | s per process |\n|---|---|---|---|---|")
    for name, folder, sampling, nfe, seconds in rows:
        print(f"| {name} | {folder} | {sampling} | {nfe} | {seconds:.2f} |")
    print(f"\nstudent speed-up: {t_teacher / t_student:.1f}x (NFE ratio {rows[0][3] / rows[1][3]:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
