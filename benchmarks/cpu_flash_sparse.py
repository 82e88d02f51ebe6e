"""Block sparsity in the compiled CPU kernel: documents and a sliding window as ``mask_fn``.

    python benchmarks/cpu_flash_sparse.py            # B 1, N 4, H 64, float32, T 16384
    GRAD=1 python benchmarks/cpu_flash_sparse.py     # forward + grad of sum(out**2)
    T=4096 REPEATS=3 python benchmarks/cpu_flash_sparse.py

Issue 23's targets: 16 documents (causal inside each) at least 10x faster than
``is_causal=True``, a 256-wide causal window at least 16x (forward and forward+grad), both
given as a ``mask_fn``. Contestants, each under ``jax.jit``: ``causal`` (cpu_flash), and
for each mask ``cpu_flash`` and ``chunked`` named explicitly. Times are medians of
``REPEATS`` rounds run interleaved (one call of each per round, after a warm-up call each),
with min and max, and the load average before and after. Writes
``benchmarks/results/cpu_flash_sparse-cpu-<time>.json`` (or under ``$OUT``).
"""

import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_attn as ja

B, N, H = 1, 4, 64
T = int(os.environ.get("T", 16384))
REPEATS = int(os.environ.get("REPEATS", 5))
GRAD = os.environ.get("GRAD", "0") == "1"
WINDOW = 256
DOCUMENTS = 16
SEGMENT_IDS = jnp.asarray(np.repeat(np.arange(DOCUMENTS, dtype=np.int32), T // DOCUMENTS)[None])


def window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def documents(b, h, q_idx, kv_idx):
    return (SEGMENT_IDS[b, q_idx] == SEGMENT_IDS[b, kv_idx]) & (q_idx >= kv_idx)


CONTESTANTS = {
    "causal (cpu_flash)": {"is_causal": True, "implementation": "cpu_flash"},
    "documents (cpu_flash)": {"mask_fn": documents, "implementation": "cpu_flash"},
    "documents (chunked)": {"mask_fn": documents, "implementation": "chunked"},
    "window (cpu_flash)": {"mask_fn": window, "implementation": "cpu_flash"},
    "window (chunked)": {"mask_fn": window, "implementation": "chunked"},
}


def make_fn(options):
    def forward(q, k, v):
        return ja.dot_product_attention(q, k, v, **options)

    if not GRAD:
        return jax.jit(forward)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v) ** 2), argnums=(0, 1, 2)))


def main():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H), np.float32)) for _ in range(3))
    load_before = os.getloadavg()
    fns = {name: make_fn(options) for name, options in CONTESTANTS.items()}
    first_call_s = {}
    for name, fn in fns.items():  # warm-up: trace (tile tables included), compile, run
        start = time.perf_counter()
        jax.block_until_ready(fn(q, k, v))
        first_call_s[name] = round(time.perf_counter() - start, 2)
    times = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            times[name].append(time.perf_counter() - start)
    causal = statistics.median(times["causal (cpu_flash)"])
    rows = {
        name: {
            "median_s": round(statistics.median(ts), 4),
            "min_s": round(min(ts), 4),
            "max_s": round(max(ts), 4),
            "speedup_vs_causal_median": round(causal / statistics.median(ts), 2),
            "first_call_s": first_call_s[name],
        }
        for name, ts in times.items()
    }
    result = {
        "benchmark": "cpu_flash_sparse (issue 23: block sparsity in the compiled kernel)",
        "shape": {"B": B, "T": T, "N": N, "H": H, "dtype": "float32"},
        "grad": GRAD,
        "window": WINDOW,
        "documents": DOCUMENTS,
        "repeats": REPEATS,
        "load_average_before_after": [load_before, os.getloadavg()],
        "machine": {"processor": platform.processor(), "cpus": os.cpu_count()},
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "results": rows,
    }
    print(json.dumps(result, indent=2))
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "grad-" if GRAD else ""
    with open(os.path.join(folder, f"cpu_flash_sparse-cpu-{kind}T{T}-{stamp}.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
