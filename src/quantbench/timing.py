"""The timing loop, one for everything that times a model: the measuring worker (bench) and the
profiler's unprofiled wall time."""
from __future__ import annotations

import statistics
import time

import torch


def time_calls(model, x: torch.Tensor, n: int) -> list[float]:
    """Seconds per call of model(x), n calls, each timed on its own with perf_counter (a
    monotonic clock with the best resolution; per-call times give percentiles, not just a mean)."""
    times = []
    with torch.inference_mode():
        for _ in range(n):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return times


def median_ms(model, x: torch.Tensor, calls: int, warmup: int = 20) -> float:
    """Median milliseconds per call after `warmup` untimed calls (lazy init, compilation)."""
    time_calls(model, x, warmup)
    return statistics.median(time_calls(model, x, calls)) * 1000
