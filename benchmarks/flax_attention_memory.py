"""Flax's ``MultiHeadDotProductAttention`` with and without ``attention_fn=ja.flax_attention_fn``:
compiled temporary memory and run time, side by side in one process.

    python benchmarks/flax_attention_memory.py            # B 1, T 4096, D 256, 4 heads
    T=1024 REPEATS=3 python benchmarks/flax_attention_memory.py

Three contestants, forward and forward+grad of ``sum(y ** 2)``, causal:
- Flax's default attention, ``mask=nn.make_causal_mask(...)`` (float32 ``[B, 1, T, T]``);
- ``attention_fn=ja.flax_attention_fn`` with the same mask;
- ``attention_fn=partial(ja.flax_attention_fn, is_causal=True)`` and ``mask=None``.
The mask is built inside the jitted function, as a model would build it. Memory figures come
from ``compiled.memory_analysis()`` (independent of load); times are medians of ``REPEATS``
calls run interleaved (one call of each contestant per round), after one warm-up call each.
Writes ``benchmarks/results/flax_attention_memory-<device>.json`` (or under ``$OUT``).
"""

import functools
import json
import os
import platform
import statistics
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jax_attn as ja


def contestants():
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=D)
    causal_fn = functools.partial(ja.flax_attention_fn, is_causal=True)
    return {
        "flax default, causal mask": (flax_mha, True),
        "flax_attention_fn, causal mask": (flax_mha.clone(attention_fn=ja.flax_attention_fn), True),
        "flax_attention_fn, is_causal (no mask)": (flax_mha.clone(attention_fn=causal_fn), False),
    }


def make_fn(module, with_mask: bool, grad: bool):
    def forward(params, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2])) if with_mask else None
        return module.apply({"params": params}, x, mask=mask)

    if not grad:
        return jax.jit(forward)
    return jax.jit(jax.grad(lambda params, x: jnp.sum(forward(params, x) ** 2)))


def compile_stats(fn, params, x):
    start = time.perf_counter()
    compiled = fn.lower(params, x).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return compiled, {
        "compile_s": round(compile_s, 3),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
    }


def timed(compiled, params, x) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    return 1e3 * (time.perf_counter() - start)


def run_case(grad: bool, params, x):
    compiled, results = {}, {}
    for name, (module, with_mask) in contestants().items():
        compiled[name], results[name] = compile_stats(make_fn(module, with_mask, grad), params, x)
    reference = jax.block_until_ready(compiled["flax default, causal mask"](params, x))
    for name, fn in compiled.items():
        got = jax.block_until_ready(fn(params, x))
        pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True))
        results[name]["max_abs_diff_vs_flax"] = float(max(np.max(np.abs(a - b)) for a, b in pairs))
        # relative to the largest entry of the whole tree: the key bias's gradient is ~0
        results[name]["max_rel_diff_vs_flax"] = results[name]["max_abs_diff_vs_flax"] / float(
            max(np.max(np.abs(b)) for _, b in pairs)
        )
    times = {name: [] for name in compiled}
    for _ in range(REPEATS):
        for name, fn in compiled.items():
            times[name].append(timed(fn, params, x))
    base_temp = results["flax default, causal mask"]["temp_bytes"]
    base_ms = statistics.median(times["flax default, causal mask"])
    for name, ms in times.items():
        median = statistics.median(ms)
        results[name].update(
            times_ms=[round(t, 2) for t in ms],
            median_ms=round(median, 2),
            min_ms=round(min(ms), 2),
            max_ms=round(max(ms), 2),
            spread_over_20pct=(max(ms) - min(ms)) / median > 0.2,
            temp_ratio_flax_over_this=round(base_temp / max(results[name]["temp_bytes"], 1), 2),
            speedup_vs_flax=round(base_ms / median, 2),
        )
    return results


def main():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32))
    module = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=D)
    params = module.init(jax.random.key(0), x[:, :8])["params"]
    device = jax.devices()[0]
    report = {
        "what": "flax.linen.MultiHeadDotProductAttention: default attention_fn vs "
        "ja.flax_attention_fn",
        "note": "run on a machine shared with other engineers' processes: times are indicative; "
        "memory figures are compiled (memory_analysis) and do not depend on load",
        "shape": {"B": B, "T": T, "D": D, "N": N, "H": D // N, "dtype": "float32", "causal": True},
        "repeats": REPEATS,
        "device": {
            "platform": device.platform,
            "kind": device.device_kind,
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        },
        "versions": {
            "python": sys.version.split()[0],
            "jax": jax.__version__,
            "flax": flax.__version__,
            "jax_attn": ja.__version__,
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cases": {},
    }
    for grad in (False, True):
        label = "forward+grad" if grad else "forward"
        report["cases"][label] = run_case(grad, params, x)
        print(label, json.dumps(report["cases"][label], indent=1), flush=True)
    out_dir = os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out_dir, exist_ok=True)
    kind = device.device_kind.lower().replace(" ", "-")
    path = os.path.join(out_dir, f"flax_attention_memory-{device.platform}-{kind}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", path)


B, T, D, N = 1, int(os.environ.get("T", 4096)), 256, 4
REPEATS = int(os.environ.get("REPEATS", 5))

if __name__ == "__main__":
    main()
