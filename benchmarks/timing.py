"""Timing: CUDA events around each iteration after a warm-up; the median of at least 20.

On a CPU the same loop uses the host clock. Each iteration is timed on its own, so the median
is over iterations and a slow outlier (a page fault, another tenant) does not move it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

MIN_ITERS = 20


@dataclass
class Timing:
    """Per-iteration times in milliseconds and their summary."""

    samples_ms: list[float] = field(repr=False)
    warmup: int = 0

    @property
    def iters(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy the iterations were."""
        s = sorted(self.samples_ms)
        lo, hi = s[len(s) // 10], s[min(len(s) - 1, (9 * len(s)) // 10)]
        return (hi - lo) / self.median_ms if self.median_ms else 0.0

    def per_second(self, units: float) -> float:
        """``units`` (tokens, say) per second at the median time."""
        return units / (self.median_ms / 1e3)

    def summary(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "iters": self.iters, "warmup": self.warmup, "spread": self.spread}


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], Any],
    *,
    device: torch.device | str,
    iters: int = MIN_ITERS,
    warmup: int = 3,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn`` ``iters`` times after ``warmup`` untimed calls; ``setup`` runs untimed before each call."""
    if iters < 1:
        raise ValueError("iters must be >= 1")
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    synchronize(device)
    samples: list[float] = []
    if torch.device(device).type == "cuda":
        events = []
        for _ in range(iters):
            if setup:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(samples, warmup)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    device: torch.device | str,
    iters: int = MIN_ITERS,
    warmup: int = 3,
    seed: int = 0,
) -> dict[str, Timing]:
    """Time several variants round-robin, each round in a fresh seeded random order: slow drifts
    in clocks or temperature hit every variant alike, and no variant always follows the same one
    (on the H200 the variant timed right after the base measured up to 2 % slower, likely the
    host's lead over the device that the base leaves behind; docs/performance.md), so their ratios
    stay fair. Each call is timed alone."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    cuda = torch.device(device).type == "cuda"
    marks: dict[str, list[Any]] = {name: [] for name in fns}
    rng = random.Random(seed)
    for _ in range(iters):
        for name in rng.sample(list(fns), len(fns)):
            fn = fns[name]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                marks[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                marks[name].append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    if cuda:
        return {n: Timing([s.elapsed_time(e) for s, e in m], warmup) for n, m in marks.items()}
    return {n: Timing(m, warmup) for n, m in marks.items()}


def ratio(numerator: Timing, denominator: Timing) -> float:
    """Throughput ratio numerator/denominator for the same work: the inverse ratio of median times."""
    return denominator.median_ms / numerator.median_ms


def as_dict(obj: Any) -> Any:
    """JSON-ready form of dataclasses and tensors inside results."""
    if isinstance(obj, Timing):
        return obj.summary()
    if hasattr(obj, "__dataclass_fields__"):
        return as_dict(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): as_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [as_dict(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj
