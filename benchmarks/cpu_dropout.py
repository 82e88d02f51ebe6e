"""GPT-2-small attention forward+grad with attention dropout 0.1 against the same call
without dropout, on the compiled CPU kernel (and on ``chunked``, the path dropout took
before the kernel served it): interleaved rounds in one process, medians and spread.

    python benchmarks/cpu_dropout.py [--rounds 5] [--B 8 --T 1024 --N 12 --H 64]
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_attn as ja


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    for name, default in (("B", 8), ("T", 1024), ("N", 12), ("H", 64)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--no-chunked", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.B, args.T, args.N, args.H)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
    key = jax.random.key(0)

    def step(implementation, rate):
        def loss(q, k, v, key):
            out = ja.dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                dropout_rate=rate,
                dropout_rng=key if rate > 0 else None,
                implementation=implementation,
            )
            return jnp.sum(out * out)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    variants = {
        "cpu_flash, no dropout": step("cpu_flash", 0.0),
        f"cpu_flash, dropout {args.rate}": step("cpu_flash", args.rate),
    }
    if not args.no_chunked:
        variants[f"chunked, dropout {args.rate}"] = step("chunked", args.rate)
    for fn in variants.values():  # compile and warm
        jax.block_until_ready(fn(q, k, v, key))
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v, key))
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["cpu_flash, no dropout"])
    print(f"B {args.B} T {args.T} N {args.N} H {args.H} causal fwd+grad, {args.rounds} rounds")
    print(f"load average before/after: {os.getloadavg()}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:<28} median {1e3 * med:8.1f} ms  min {1e3 * min(ts):8.1f}  "
            f"max {1e3 * max(ts):8.1f}  ratio {med / base:5.2f}x"
        )


if __name__ == "__main__":
    main()
