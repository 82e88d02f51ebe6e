"""Where the tiled CPU kernels overtake ``xla`` as the number of queries T grows: the
measurement behind ``dispatch.CHUNKED_MIN_QUERIES["cpu"]`` (``xla`` first below it).

Causal float32 attention of T queries against S cached keys (bottom-right aligned, as in
decoding or chunked prefill), forward only, ``jit``-compiled, timed in one process and
interleaved (one call of each kernel per round) after warm-up, compile time apart.
Reports each kernel's median ms and, per round, its time over ``xla``'s: min/median/max.

    python benchmarks/cpu_few_queries.py     # N 12, H 64: B 8, S 1024 and B 1, S 4096
    python benchmarks/cpu_few_queries.py --T 1 4 8 --rounds 30 --shapes 8x64 8x256

Run it on an idle machine, in a process of one CPU device (``cpu_flash`` is the default
only where nothing is partitioned).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_attn as ja
from jax_attn.apps import bench

RESULTS = Path(__file__).parent / "results"
KERNELS = ("xla", "cpu_flash", "chunked")
SHAPES = ("8x1024", "1x4096")  # B x S


def _inputs(B: int, T: int, S: int, N: int, H: int):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, N, H), np.float32)
    k, v = (rng.standard_normal((B, S, N, H), np.float32) for _ in range(2))
    return tuple(jnp.asarray(x) for x in (q, k, v))


def _compiled(kernel: str, args):
    def attend(q, k, v):
        return ja.dot_product_attention(q, k, v, is_causal=True, implementation=kernel)

    return jax.jit(attend).lower(*args).compile()


def measure(B: int, T: int, S: int, N: int, H: int, rounds: int, warmup: int) -> dict:
    """One shape: every kernel timed once per round, interleaved."""
    args = _inputs(B, T, S, N, H)
    programs = {kernel: _compiled(kernel, args) for kernel in KERNELS}
    times = {kernel: [] for kernel in KERNELS}
    for _ in range(warmup + rounds):  # warm-up rounds interleaved too, then dropped
        for kernel, program in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(program(*args))
            times[kernel].append(time.perf_counter() - start)
    times = {kernel: runs[warmup:] for kernel, runs in times.items()}
    row = {"B": B, "T": T, "S": S, "N": N, "H": H}
    for kernel, runs in times.items():
        ratios = [t / x for t, x in zip(runs, times["xla"], strict=True)]
        row[kernel] = {
            "median_ms": 1e3 * statistics.median(runs),
            "ratio_to_xla": [min(ratios), statistics.median(ratios), max(ratios)],
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="B x S, e.g. 8x1024")
    parser.add_argument("--N", type=int, default=12)
    parser.add_argument("--H", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if jax.device_count() != 1:
        raise SystemExit(f"run in a process of one device (found {jax.device_count()})")
    load_before = os.getloadavg()
    rows = []
    for B, S in (map(int, shape.split("x")) for shape in args.shapes):
        for T in args.T:
            row = measure(B, T, S, args.N, args.H, args.rounds, args.warmup)
            rows.append(row)
            cells = "  ".join(
                f"{k} {row[k]['median_ms']:.3f} ms ({row[k]['ratio_to_xla'][1]:.2f}x "
                f"[{row[k]['ratio_to_xla'][0]:.2f}-{row[k]['ratio_to_xla'][2]:.2f}])"
                for k in KERNELS
            )
            print(f"B {B} T {T:3d} S {S}: {cells}", flush=True)
    record = {
        "device": f"CPU: {bench._cpu_model()}",
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rounds": args.rounds,
        "rows": rows,
    }
    output = args.output or RESULTS / f"cpu_few_queries-cpu-{record['date']}.json"
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {output} (load {record['load_before']} -> {record['load_after']})")


if __name__ == "__main__":
    main()
