"""Time the GPU attention kernels side by side in one process: JAX's Pallas GPU flash
attention (raw, at three block sizes, and through jax_attn's dispatcher as "pallas_gpu"),
cuDNN (through jax.nn), XLA (jax.nn), and jax_attn's default and chunked paths.

    OUT=results python benchmarks/gpu_kernels.py
    OUT=results ONLY=f32 python benchmarks/gpu_kernels.py      # cases whose name has "f32"

Each case checks every contestant's output against jax_attn's reference (float32 logits)
before timing it; a contestant that fails to compile or disagrees is recorded with its error.
Times are medians of `repeats` calls after `warmup`, compile time apart, min and max kept.
"""

import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

import jax_attn as ja
from jax_attn import dispatch, validation

CASES = [
    # name, B, T, N, H, dtype, causal, grad
    ("B4 T4096 N16 H128 bf16 causal fwd", 4, 4096, 16, 128, "bfloat16", True, False),
    ("B4 T4096 N16 H128 bf16 causal fwd+grad", 4, 4096, 16, 128, "bfloat16", True, True),
    ("B1 T16384 N16 H128 bf16 causal fwd", 1, 16384, 16, 128, "bfloat16", True, False),
    ("B8 T1024 N12 H64 f32 causal fwd (GPT-2 small)", 8, 1024, 12, 64, "float32", True, False),
    ("B8 T1024 N12 H64 f32 causal fwd+grad (GPT-2 small)", 8, 1024, 12, 64, "float32", True, True),
    ("B4 T4096 N16 H128 f32 causal fwd", 4, 4096, 16, 128, "float32", True, False),
]


def pallas_gpu(q, k, v, causal, block_q=128, block_k=128):
    from jax.experimental.pallas.ops.gpu import attention

    sizes = attention.BlockSizes(
        block_q=block_q,
        block_k=block_k,
        block_q_dkv=32,
        block_kv_dkv=32,
        block_q_dq=32,
        block_kv_dq=32,
    )
    scale = 1.0 / (q.shape[-1] ** 0.5)
    return attention.mha(q, k, v, None, sm_scale=scale, causal=causal, block_sizes=sizes)


def contestants(causal):
    return {
        "jax_attn default": lambda q, k, v: ja.dot_product_attention(q, k, v, is_causal=causal),
        "jax_attn chunked": lambda q, k, v: ja.dot_product_attention(
            q, k, v, is_causal=causal, implementation="chunked"
        ),
        "jax_attn pallas_gpu": lambda q, k, v: ja.dot_product_attention(
            q, k, v, is_causal=causal, implementation="pallas_gpu"
        ),
        "jax.nn xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"
        ),
        "jax.nn cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        ),
        "pallas_gpu 128x128": functools.partial(pallas_gpu, causal=causal),
        "pallas_gpu 64x64": functools.partial(pallas_gpu, causal=causal, block_q=64, block_k=64),
        "pallas_gpu 128x64": functools.partial(pallas_gpu, causal=causal, block_q=128, block_k=64),
    }


def timed(fn, args, warmup=2, repeats=7):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, times


def main():
    out_dir = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    device = jax.devices()[0]
    record = {
        "device": getattr(device, "device_kind", str(device)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": stamp,
        "cases": [],
    }
    print(record["device"], record["jax"], flush=True)
    record["default_by_case"] = {}
    only = os.environ.get("ONLY", "")
    for name, B, T, N, H, dtype, causal, grad in CASES:
        if only not in name:
            continue
        dt = jnp.dtype(dtype)
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(kk, (B, T, N, H), dt) for kk in keys)
        call = validation.check_attention_args(q, k, v, is_causal=causal)
        record["default_by_case"][name] = dispatch.select_implementation(call)
        print(name, "default:", record["default_by_case"][name], flush=True)
        ref = None
        if not grad and T <= 4096:
            ref = jax.jit(functools.partial(ja.reference.dot_product_attention, is_causal=causal))(
                q, k, v
            )
        rows = []
        for cname, fn in contestants(causal).items():
            row = {"contestant": cname}
            try:
                if grad:

                    def loss(q, k, v, fn=fn):
                        return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)

                    run = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                else:
                    run = jax.jit(fn)
                if ref is not None:
                    got = run(q, k, v)
                    row["max_abs_err_vs_reference"] = float(
                        jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32)))
                    )
                compile_s, times = timed(run, (q, k, v))
                row.update(
                    compile_s=compile_s,
                    median_ms=1e3 * statistics.median(times),
                    min_ms=1e3 * min(times),
                    max_ms=1e3 * max(times),
                )
            except Exception as e:  # recorded, not hidden
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                traceback.print_exc(limit=2)
            print(name, row, flush=True)
            rows.append(row)
        record["cases"].append(
            {
                "name": name,
                "B": B,
                "T": T,
                "N": N,
                "H": H,
                "dtype": dtype,
                "causal": causal,
                "grad": grad,
                "rows": rows,
            }
        )
        with open(os.path.join(out_dir, f"gpu-kernels-{stamp}.json"), "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
