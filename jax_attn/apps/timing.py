"""Wall-clock timing shared by the apps: repeated runs and the spread that shows their noise.

>>> stats = summary_ms([0.010, 0.011, 0.014])
>>> stats["min_ms"], stats["median_ms"], stats["max_ms"], round(stats["spread"], 2)
(10.0, 11.0, 14.0, 0.36)
>>> stats["noisy"]
True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

__all__ = [
    "NOISY_SPREAD",
    "format_seconds",
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
