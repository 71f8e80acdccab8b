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


def interleaved(fns, repeats: int) -> list[list[float]]:
    """Seconds of each of ``fns`` in ``repeats`` rounds, one call of each per round after one
    warm-up each. Drift in machine speed hits every function of a round alike, so ratios
    taken within a round are steadier than ratios of separate medians."""
    for fn in fns:
        fn()
    return [[timed(fn, 1)[0] for fn in fns] for _ in range(repeats)]


def alternate(ours, ref, repeats: int) -> tuple[float, float]:
    """Median seconds of ours and the reference, run alternately after one warm-up each."""
    rounds = interleaved([ours, ref], repeats)
    return statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
