"""Timing helpers shared by the benchmark scripts (run them as `python benchmarks/bench_*.py`)."""

import time

import numpy as np


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn()` (warm it up first)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
