"""Timing of a callable: warm-up, repeats, percentiles."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Latency statistics of repeated calls, in seconds."""

    p50: float
    p90: float
    p99: float
    runs: int

    @property
    def spread(self) -> float:
        """p90 / p50: how noisy the runs were (1.0 is perfectly steady)."""
        return self.p90 / self.p50 if self.p50 else float("nan")

    def throughput(self, batch_size: int) -> float:
        """Items per second at the median latency."""
        return batch_size / self.p50 if self.p50 else float("nan")


def measure(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20,
            min_seconds: float = 0.0) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then at least ``repeats`` times timed.

    Timing continues past ``repeats`` until ``min_seconds`` of timed calls have
    accumulated, so that fast calls get enough samples for stable percentiles.
    """
    for _ in range(warmup):
        fn()
    samples = []
    total = 0.0
    while len(samples) < repeats or total < min_seconds:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        total += elapsed
    values = np.asarray(samples)
    return Timing(
        p50=float(statistics.median(values)),
        p90=float(np.percentile(values, 90)),
        p99=float(np.percentile(values, 99)),
        runs=len(samples),
    )


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int, calls: int = 1,
                warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, timed side by side.

    Each round times every callable ``calls`` times, so drift in the
    machine's speed hits all of them alike. The order rotates from round to
    round: on a 2-core machine the callable timed right after another runs
    measurably slower or faster (cache, thread wake-up), by about 1% between
    two INT8 MobileNetV2 files, which a fixed order turns into a ranking.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            fn = fns[key]
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                samples[key].append(time.perf_counter() - start)
    return samples
