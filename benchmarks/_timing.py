"""Timing helpers shared by the benchmark scripts (run them as `python benchmarks/bench_*.py`)."""

import numpy as np

from alm_jax.training.metrics import StepTimer


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn()` (warm it up first), each timed like a training step."""
    timer, times = StepTimer(), []
    for _ in range(repeats):
        with timer.step():
            fn()
        times.append(timer.last_step)
    return float(np.median(times))
