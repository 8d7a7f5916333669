"""Timing helpers for the benchmarks: interleaved arms, paired ratios, machine and load.

Other processes share the machine, so two arms timed one after the other
can see different loads. Here every round runs each arm once, in a rotating
order (ABC, BCA, CAB, ...), and a ratio is taken per round from the arms of
that round; the reported figure is the median of those paired ratios, with
its spread (min, quartiles, max).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> dict:
    """Where a figure was measured, with the load average (1, 5, 15 min) when it was."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def spread(values: list[float]) -> dict:
    """median, min, quartiles and max of `values`."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "p25": q[0], "p75": q[2], "max": v[-1], "n": len(v)}


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each fn per round; each round calls every fn once, order rotating."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Spread of numerator[i] / denominator[i] over rounds (same-round pairs)."""
    return spread([a / b for a, b in zip(numerator, denominator, strict=True)])


def ms(seconds: list[float]) -> dict:
    """p50 / p99 in milliseconds."""
    return {"p50_ms": 1e3 * pct(seconds, 50), "p99_ms": 1e3 * pct(seconds, 99)}
