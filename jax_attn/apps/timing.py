"""Wall-clock timing shared by the apps: repeated runs and the spread that shows their noise.

>>> stats = summary_ms([0.010, 0.011, 0.014])
>>> stats["min_ms"], stats["median_ms"], stats["max_ms"], round(stats["spread"], 2)
(10.0, 11.0, 14.0, 0.36)
>>> stats["noisy"]
True
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "NOISY_SPREAD",
    "format_seconds",
    "interleaved_runs",
    "median_seconds",
    "noisy_note",
    "summary_ms",
    "time_runs",
]

#: A case whose spread, ``(max - min) / median``, exceeds this is flagged as noisy.
NOISY_SPREAD = 0.20


def time_runs(
    run: Callable[[], object],
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run`` (which must block until done),
    after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return times


def interleaved_runs(
    runs: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    settle_s: float = 0.0,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds of each of ``rounds`` calls of every run (each must block until done), one
    call of each per round in a new random order (so that none always follows the same
    one), after ``warmup`` such rounds; ``settle_s`` of untimed sleep after every call
    (torch's OpenMP threads spin for a while after a call and slow whatever runs next)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = random.Random(seed)
    for _ in range(warmup + rounds):
        names = list(runs)
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            time.sleep(settle_s)
    return {name: runs_[warmup:] for name, runs_ in times.items()}


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median of :func:`time_runs`."""
    return statistics.median(time_runs(run, repeats, warmup))


def summary_ms(times: Sequence[float]) -> dict:
    """min / median / max in milliseconds, the spread ``(max - min) / median`` and whether
    it is over :data:`NOISY_SPREAD`; ``times_ms`` keeps every run."""
    if not times:
        raise ValueError("times must hold at least one run, got none")
    low, middle, high = min(times), statistics.median(times), max(times)
    spread = (high - low) / middle if middle > 0 else 0.0
    return {
        "min_ms": 1e3 * low,
        "median_ms": 1e3 * middle,
        "max_ms": 1e3 * high,
        "spread": spread,
        "noisy": spread > NOISY_SPREAD,
        "times_ms": [round(1e3 * t, 3) for t in times],
    }


def noisy_note(names: Sequence[str]) -> str:
    """The line that flags the cases :func:`summary_ms` marked noisy ("" when none).

    >>> print(noisy_note(["ring seq=2"]))
    ! spread (max - min) / median over 20%: ring seq=2 (a busy machine: rerun when it is idle)
    """
    if not names:
        return ""
    return (
        f"! spread (max - min) / median over {NOISY_SPREAD:.0%}: {', '.join(names)}"
        " (a busy machine: rerun when it is idle)"
    )


def format_seconds(seconds: float) -> str:
    """``12.3 ms`` below a second, ``1.23 s`` from there."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
