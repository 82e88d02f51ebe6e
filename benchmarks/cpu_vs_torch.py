"""jax_attn on CPU against PyTorch's ``scaled_dot_product_attention``, side by side.

Causal float32 attention, forward and forward+grad (``jax.grad`` of ``sum(out)`` with
respect to q, k, v under ``jit`` against ``sum(out).backward()``), timed in one process
and interleaved (A, B, A, B, ... one call each per round) after warm-up, compile time
apart. Contestants: ``jax_attn`` default dispatch (``cpu_flash`` where it builds), named
implementations (``--implementations chunked``), and the ``chunked`` kernel with
explicit ``(query_chunk_size, key_chunk_size)`` pairs (``--chunks``). Reports per-round
ratios (jax / torch) as min/median/max, the matmul floor (``--floor``) and the load.

    python benchmarks/cpu_vs_torch.py                      # GPT-2 small: B 8, T 1024, N 12, H 64
    python benchmarks/cpu_vs_torch.py --chunks 128x64,128x512 --T 4096 --B 1
    python benchmarks/cpu_vs_torch.py --K 4                # GQA: 12 query heads, 4 kv heads

XLA:CPU runs its dots and fusions on an Eigen pool with one thread per core (2 here);
torch is set to 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jax_attn as ja
from jax_attn.apps.arguments import add_name_list
from jax_attn.kernels import chunked
from jax_attn.validation import check_attention_args

RESULTS = Path(__file__).parent / "results"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def matmul_floor(sizes=((1024, 1024, 1024), (2048, 2048, 2048)), rounds=5):
    """float32 GFLOP/s of a jitted ``jnp.dot``, best of ``rounds``, per size, plus the rate of
    the batched block product the kernel runs ``[96] x 128x64 . 64x128``."""
    rates = {}
    for m, k, n in sizes:
        a = jnp.ones((m, k), jnp.float32)
        b = jnp.ones((k, n), jnp.float32)
        f = jax.jit(jnp.dot)
        f(a, b).block_until_ready()
        best = _best(f, a, b, rounds)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    for bh, tq, h, sk in ((96, 128, 64, 64), (96, 128, 64, 512), (96, 256, 64, 256)):
        a = jnp.ones((bh, tq, h), jnp.float32)
        b = jnp.ones((bh, h, sk), jnp.float32)
        f = jax.jit(lambda a, b: jnp.einsum("bth,bhs->bts", a, b))
        f(a, b).block_until_ready()
        best = _best(f, a, b, rounds)
        rates[f"batched[{bh}] {tq}x{h}x{sk}"] = 2 * bh * tq * h * sk / best / 1e9
    return rates


def _best(f, a, b, rounds) -> float:
    return min(_time(lambda: f(a, b).block_until_ready()) for _ in range(rounds))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_contestants(args, grad: bool):
    B, T, N, K, H = args.B, args.T, args.N, args.K, args.H
    rng = np.random.default_rng(0)
    q_np = rng.standard_normal((B, T, N, H), dtype=np.float32)
    k_np = rng.standard_normal((B, T, K, H), dtype=np.float32)
    v_np = rng.standard_normal((B, T, K, H), dtype=np.float32)
    q, k, v = (jnp.asarray(x) for x in (q_np, k_np, v_np))
    call = check_attention_args(q, k, v, is_causal=True)

    def jax_fn(attend):
        if not grad:
            f = jax.jit(attend)
        else:
            f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))
        return lambda: jax.block_until_ready(f(q, k, v))

    contestants = {
        "jax_attn default": jax_fn(
            lambda q, k, v: ja.dot_product_attention(q, k, v, is_causal=True)
        )
    }
    for name in args.implementations:
        contestants[f"jax_attn {name}"] = jax_fn(
            lambda q, k, v, name=name: ja.dot_product_attention(
                q, k, v, is_causal=True, implementation=name
            )
        )
    for pair in args.chunks:
        tq, sk = pair
        contestants[f"chunked {tq}x{sk}"] = jax_fn(
            lambda q, k, v, tq=tq, sk=sk: chunked.chunked_attention(
                q, k, v, call=call, query_chunk_size=tq, key_chunk_size=sk
            )
        )

    # torch layout [B, N, T, H]
    tq_, tk_, tv_ = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q_np, k_np, v_np))
    gqa = {"enable_gqa": True} if K != N else {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if not grad:

        def torch_fn():
            with torch.no_grad():
                sdpa(tq_, tk_, tv_, is_causal=True, **gqa)
    else:
        for x in (tq_, tk_, tv_):
            x.requires_grad_(True)

        def torch_fn():
            for x in (tq_, tk_, tv_):
                x.grad = None
            sdpa(tq_, tk_, tv_, is_causal=True, **gqa).sum().backward()

    contestants["torch sdpa"] = torch_fn
    return contestants


def run_case(args, grad: bool):
    contestants = make_contestants(args, grad)
    compile_s = {}
    for name, fn in contestants.items():
        compile_s[name] = _time(fn)
        for _ in range(args.warmup):
            fn()
    times = {name: [] for name in contestants}
    cpu = {name: [] for name in contestants}
    for _ in range(args.rounds):
        for name, fn in contestants.items():
            c0 = time.process_time()
            times[name].append(_time(fn) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    torch_ms = times["torch sdpa"]
    rows = {}
    for name, ms in times.items():
        ratios = [a / b for a, b in zip(ms, torch_ms, strict=True)]
        rows[name] = {
            "median_ms": statistics.median(ms),
            "min_ms": min(ms),
            "max_ms": max(ms),
            "first_call_s": compile_s[name],
            # process CPU time (all threads): less sensitive than wall time to other
            # processes on a shared machine, but it counts spin-waiting threads
            "cpu_median_ms": statistics.median(cpu[name]),
            "ratio_vs_torch": {
                "min": min(ratios),
                "median": statistics.median(ratios),
                "max": max(ratios),
            },
            "per_round_ratio": [round(r, 4) for r in ratios],
        }
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--N", type=int, default=12)
    parser.add_argument("--K", type=int, default=None, help="kv heads (default N)")
    parser.add_argument("--H", type=int, default=64)
    parser.add_argument("--chunks", default="", help="e.g. 128x64,128x512 (chunked kernel)")
    add_name_list(parser, "--implementations", "NAME", "named ones beside the default")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-grad", action="store_true")
    parser.add_argument("--no-forward", action="store_true")
    parser.add_argument("--floor", action="store_true", help="measure the matmul floor")
    parser.add_argument("--out", default=str(RESULTS / "cpu_vs_torch.json"))
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    args.K = args.K or args.N
    args.chunks = [tuple(int(x) for x in p.split("x")) for p in args.chunks.split(",") if p]
    args.implementations = args.implementations or []
    torch.set_num_threads(2)

    B, T, N, H = args.B, args.T, args.N, args.H
    flops_fwd = 2 * 2 * B * N * T * T * H / 2  # causal half, q k^T and p v
    result = {
        "device": f"CPU, {os.cpu_count()} cores, shared ({platform.processor() or 'x86_64'})",
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "threads": {"torch": torch.get_num_threads(), "xla": "intra-op pool, one per core"},
        "shape": {"B": B, "T": T, "N": N, "K": args.K, "H": H, "dtype": "float32", "causal": True},
        "default_implementation": ja.dispatch.select_implementation(
            check_attention_args(
                *(jnp.zeros((B, T, heads, H), jnp.float32) for heads in (N, args.K, args.K)),
                is_causal=True,
            )
        ),
        "default_chunks": chunked.default_chunk_sizes(B * N),
        "flops_forward": flops_fwd,
        "flops_forward_grad": flops_fwd * 3.5,  # fwd 2 products; bwd 5 (q k^T recomputed)
        "rounds": args.rounds,
        "note": args.note,
        "load_before": load(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.floor:
        result["matmul_gflops"] = matmul_floor()
    if not args.no_forward:
        result["forward"] = run_case(args, grad=False)
    if not args.no_grad:
        result["forward_grad"] = run_case(args, grad=True)
    result["load_after"] = load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{result['device']}; load {result['load_before']} -> {result['load_after']}")
    if "matmul_gflops" in result:
        for size, rate in result["matmul_gflops"].items():
            print(f"  matmul {size}: {rate:.0f} GFLOP/s")
    for case in ("forward", "forward_grad"):
        if case not in result:
            continue
        print(
            f"{case} (B {B}, T {T}, N {N}, K {args.K}, H {H}; "
            f"{result['flops_' + case] / 1e9:.1f} GFLOP)"
        )
        for name, row in result[case].items():
            r = row["ratio_vs_torch"]
            print(
                f"  {name:22s} {row['median_ms']:8.1f} ms  (min {row['min_ms']:.1f})  "
                f"x torch {r['min']:.2f}/{r['median']:.2f}/{r['max']:.2f}  "
                f"cpu {row['cpu_median_ms']:.0f} ms  "
                f"first call {row['first_call_s']:.2f} s"
            )


if __name__ == "__main__":
    main()
