"""Masks as functions on CPU: a causal sliding window and a document mask against plain causal.

    python benchmarks/mask_fn_speed.py                 # B 1, N 4, H 64, float32, T 16384
    T=4096 REPEATS=3 python benchmarks/mask_fn_speed.py
    GRAD=1 python benchmarks/mask_fn_speed.py          # forward + grad of sum(out**2)

Issue 12's target: a 256-wide causal sliding window and a 16-document causal mask, each
given as a ``mask_fn``, at least 5x faster than ``is_causal=True`` (forward). Contestants,
all through ``ja.dot_product_attention`` (the default implementation: chunked):
- ``causal``: ``is_causal=True``;
- ``window (mask_fn)`` / ``document (mask_fn)``: the ``mask_fn`` alone, so each call also
  computes its block mask;
- ``window (block_mask)`` / ``document (block_mask)``: with ``block_mask=`` made once
  outside (FlexAttention's usage: one block mask for every layer).
Times are medians of ``REPEATS`` rounds run interleaved (one call of each contestant per
round, after one warm-up call each), with min and max. Writes
``benchmarks/results/mask_fn_speed-cpu-<time>.json`` (or under ``$OUT``).
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


def window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


SEGMENT_IDS = jnp.asarray(np.repeat(np.arange(DOCUMENTS, dtype=np.int32), T // DOCUMENTS)[None])


def document(b, h, q_idx, kv_idx):
    return (SEGMENT_IDS[b, q_idx] == SEGMENT_IDS[b, kv_idx]) & (q_idx >= kv_idx)


def contestants():
    window_blocks = ja.make_block_mask(window, 1, 1, T, T)
    document_blocks = ja.make_block_mask(document, 1, 1, T, T)
    return {
        "causal": {"is_causal": True},
        "window (mask_fn)": {"mask_fn": window},
        "window (block_mask)": {"block_mask": window_blocks},
        "document (mask_fn)": {"mask_fn": document},
        "document (block_mask)": {"block_mask": document_blocks},
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
    start = time.perf_counter()
    make_block_mask_s = []
    for fn in (window, document):
        start = time.perf_counter()
        jax.block_until_ready(ja.make_block_mask(fn, 1, 1, T, T).any_blocks)
        make_block_mask_s.append(time.perf_counter() - start)
    fns = {name: make_fn(options) for name, options in contestants().items()}
    for fn in fns.values():  # warm-up: compile and run once
        jax.block_until_ready(fn(q, k, v))
    times = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            times[name].append(time.perf_counter() - start)
    causal = statistics.median(times["causal"])
    rows = {
        name: {
            "median_s": round(statistics.median(ts), 4),
            "min_s": round(min(ts), 4),
            "max_s": round(max(ts), 4),
            "speedup_vs_causal_median": round(causal / statistics.median(ts), 2),
            "speedup_vs_causal_range": [
                round(min(times["causal"]) / max(ts), 2),
                round(max(times["causal"]) / min(ts), 2),
            ],
        }
        for name, ts in times.items()
    }
    result = {
        "benchmark": "mask_fn_speed (issue 12: masks as functions)",
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "jax": jax.__version__,
        "shape": {"B": B, "T": T, "N": N, "H": H, "dtype": "float32"},
        "window": WINDOW,
        "documents": DOCUMENTS,
        "repeats": REPEATS,
        "method": f"{'forward+grad' if GRAD else 'forward only'}, jitted, interleaved rounds, "
        "medians after one warm-up call",
        "load": "machine shared with other jobs (other sessions compiling and testing)",
        "make_block_mask_s (window, document; first call, includes compile)": [
            round(x, 3) for x in make_block_mask_s
        ],
        "results": rows,
    }
    print(json.dumps(result, indent=2))
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kind = "grad-" if GRAD else ""
    path = os.path.join(folder, f"mask_fn_speed-cpu-{kind}T{T}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
