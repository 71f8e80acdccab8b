"""Timing helpers shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def alternate(ours, ref, repeats: int) -> tuple[float, float]:
    """Median seconds of ours and the reference, run alternately after one warm-up each, so
    drift in machine load hits both alike."""
    ours(), ref()
    a, b = [], []
    for _ in range(repeats):
        a += timed(ours, 1)
        b += timed(ref, 1)
    return statistics.median(a), statistics.median(b)
