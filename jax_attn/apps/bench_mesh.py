"""``jax-attn bench --mesh data=2,model=4`` / ``--mesh seq=8``: sharded attention against
one device.

* ``data``/``model`` axes: :class:`jax_attn.MultiHeadAttention` with
  :func:`jax_attn.sharding.shard_params` (tensor-parallel over ``model``, batch over
  ``data``) against the same module on one device.
* ``seq`` axis: :func:`jax_attn.sharding.ring_attention` on ``seq = 1, 2, 4, ...`` up to
  the requested size (``data`` splits the batch), against
  :func:`jax_attn.dot_product_attention` on one device.

For each it prints the per-device memory of the compiled program
(``compiled.memory_analysis()``: arguments + outputs + temporaries) and the min / median /
max time of ``--repeats`` runs, flagging with ``!`` a spread ``(max - min) / median`` over
20% as ``jax-attn bench`` does (:mod:`jax_attn.apps.timing`), and writes JSON under
``benchmarks/results/``. On a CPU-only host the devices are virtual
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set here before jax is imported):
they share the host's cores, so their memory figures are real per-device figures but their
times show no parallel speed-up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from jax_attn.apps import timing

AXES = ("data", "model", "seq")
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4, "seq": 1}``."""
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(
                f"--mesh must look like data=2,model=4 or seq=8 (axes {', '.join(AXES)}, "
                f"sizes >= 1), got {spec!r}"
            )
        sizes[name] = int(value)
    if sizes["seq"] > 1 and sizes["model"] > 1:
        raise ValueError(f"--mesh: combine seq with data, not with model; got {spec!r}")
    return sizes


def request_host_devices(count: int) -> None:
    """Asks XLA's CPU backend for ``count`` virtual devices. XLA reads the flag when jax
    first starts its backends, so this works after ``import jax`` but not after a first
    computation or ``jax.devices()``; it never changes GPU or TPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={count}".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-attn bench --mesh",
        description="Sharded attention (tensor- or sequence-parallel) against one device.",
    )
    add_mesh_arguments(parser, mesh_required=True)
    return parser


def add_mesh_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, mesh_required: bool
) -> None:
    """The options of ``jax-attn bench --mesh``: ``bench --help`` lists them too."""
    parser.add_argument(
        "--mesh",
        required=mesh_required,
        metavar="AXIS=SIZE,...",
        help="benchmark sharded attention on this mesh, e.g. data=2,model=4 or seq=8",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="B (default 8 for data/model, 1 for seq x data)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="T (default 256 for data/model, 2048 for seq)"
    )
    parser.add_argument(
        "--d-model", type=int, default=512, help="D for data/model meshes (default %(default)s)"
    )
    parser.add_argument("--heads", type=int, default=8, help="N (default %(default)s)")
    parser.add_argument(
        "--kv-heads", type=int, default=None, help="K for seq meshes (GQA; default N)"
    )
    parser.add_argument(
        "--head-dim", type=int, default=64, help="H for seq meshes (default %(default)s)"
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="ring attention: queries and keys per inner block (default: "
        "the largest divisor of the local chunk up to 512)",
    )
    parser.add_argument("--not-causal", action="store_true", help="ring attention without mask")
    parser.add_argument(
        "--backward",
        action="store_true",
        help="measure forward + backward (gradients of q, k, v / params)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="(default %(default)s)"
    )
    parser.add_argument(
        "--implementation",
        default=None,
        help="attention implementation on one device and inside the sharded "
        "MultiHeadAttention (default: the library's choice for this device)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default %(default)s)")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="compile and report memory without running (sizes beyond this host)",
    )
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")


#: The timing fields of a row (``None`` with ``--compile-only``).
TIMING_KEYS = ("min_ms", "median_ms", "max_ms", "spread", "noisy", "times_ms")


def memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program (its memory analysis)."""
    stats = compiled.memory_analysis()
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
    )
    found = {
        name.removesuffix("_size_in_bytes"): int(getattr(stats, name, 0) or 0) for name in fields
    }
    found["total"] = found["argument"] + found["output"] + found["temp"] - found["alias"]
    return found


def measure(fn, args, repeats: int) -> dict:
    """Compile time, per-device memory and run times of ``jit(fn)(*args)``: min / median /
    max in ms, the spread and whether it is noisy (:func:`jax_attn.apps.timing.summary_ms`),
    after one untimed run; ``repeats=0`` compiles only (``args`` may be
    ``jax.ShapeDtypeStruct``) and leaves the times ``None``."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    if repeats == 0:
        times = dict.fromkeys(TIMING_KEYS)
    else:
        runs = timing.time_runs(lambda: jax.block_until_ready(compiled(*args)), repeats)
        times = timing.summary_ms(runs)
    return {
        "compile_s": compile_s,
        **times,
        "memory_bytes": memory(compiled),
        "hlo": compiled.as_text(),
    }


def collective_counts(hlo: str) -> dict[str, int]:
    import re

    ops = re.findall(
        r"= \S+ (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
        r"(?:-start)?\(",
        hlo,
    )
    return {op: ops.count(op) for op in sorted(set(ops))}


def bench_tensor_parallel(args, sizes, devices) -> tuple[dict, list[dict]]:
    import jax
    import jax.numpy as jnp

    import jax_attn as ja
    from jax_attn import sharding

    B = args.batch or 8
    T = args.seq_len or 256
    dtype = jnp.dtype(args.dtype)
    module = ja.MultiHeadAttention(
        args.d_model, args.d_model, T, 0.0, args.heads, implementation=args.implementation
    )
    x = jax.random.normal(jax.random.key(0), (B, T, args.d_model), dtype)
    params = module.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), params)

    def forward(p, x):
        return module.apply({"params": p}, x)

    def forward_backward(p, x):
        return jax.value_and_grad(lambda p: jnp.sum(forward(p, x).astype(jnp.float32) ** 2))(p)

    fn = forward_backward if args.backward else forward
    if args.compile_only:
        raise ValueError("--compile-only is for seq meshes (ring attention)")
    one = devices[0]
    H = args.d_model // args.heads
    chosen = implementation_name(args.implementation, (B, T, args.heads, H), dtype)
    rows = [
        {
            "name": f"MultiHeadAttention ({chosen}), 1 device",
            "mesh": "1",
            **measure(fn, jax.device_put((params, x), one), args.repeats),
        }
    ]
    mesh = sharding.make_mesh(devices=devices, **sizes)
    placed = sharding.shard_params(params, mesh, num_heads=args.heads)
    rows.append(
        {
            "name": f"MultiHeadAttention ({chosen}), sharded",
            "mesh": mesh_label(sizes),
            **measure(fn, (placed, sharding.shard_batch(x, mesh)), args.repeats),
        }
    )
    config = {"B": B, "T": T, "D": args.d_model, "N": args.heads, "causal": True}
    return config, rows


def bench_ring(args, sizes, devices) -> tuple[dict, list[dict]]:
    import jax
    import jax.numpy as jnp

    import jax_attn as ja
    from jax_attn import sharding

    data, seq = sizes["data"], sizes["seq"]
    B = args.batch or data
    T = args.seq_len or 2048
    N, H = args.heads, args.head_dim
    K = args.kv_heads or N
    causal = not args.not_causal
    dtype = jnp.dtype(args.dtype)
    shapes = ((B, T, N, H), (B, T, K, H), (B, T, K, H))
    # abstract (ShapeDtypeStruct) with --compile-only, else arrays
    qkv: tuple[Any, ...]
    if args.compile_only:
        qkv = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape in shapes)
        on_one_device = qkv
    else:
        keys = jax.random.split(jax.random.key(0), 3)
        qkv = tuple(
            jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes, strict=True)
        )
        on_one_device = jax.device_put(qkv, devices[0])
    q, k, v = qkv
    repeats = 0 if args.compile_only else args.repeats

    def with_grads(attention):
        def run(q, k, v):
            return jax.value_and_grad(
                lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) ** 2),
                argnums=(0, 1, 2),
            )(q, k, v)

        return run if args.backward else attention

    single = with_grads(
        lambda q, k, v: ja.dot_product_attention(
            q, k, v, is_causal=causal, implementation=args.implementation
        )
    )
    chosen = implementation_name(args.implementation, (B, T, N, H), dtype, K, causal)
    rows = [
        {
            "name": f"dot_product_attention ({chosen}), 1 device",
            "mesh": "1",
            **measure(single, on_one_device, repeats),
        }
    ]
    ring_sizes = sorted({2**i for i in range(int(math.log2(seq)) + 1)} | {seq})
    for ring_size in ring_sizes:
        if ring_size > seq or T % (2 * ring_size if causal and ring_size > 1 else ring_size):
            continue
        used = devices[: data * ring_size]
        mesh = sharding.make_mesh(data=data, seq=ring_size, devices=used)
        ring = with_grads(
            lambda q, k, v, mesh=mesh: sharding.ring_attention(
                q,
                k,
                v,
                mesh=mesh,
                axis_name="seq",
                is_causal=causal,
                block_size=args.block_size,
                batch_axis_name="data" if data > 1 else None,
            )
        )
        label = mesh_label({"data": data, "model": 1, "seq": ring_size})
        rows.append({"name": "ring_attention", "mesh": label, **measure(ring, (q, k, v), repeats)})
    config = {
        "B": B,
        "T": T,
        "N": N,
        "K": K,
        "H": H,
        "causal": causal,
        "block_size": args.block_size,
    }
    return config, rows


def implementation_name(requested, q_shape, dtype, K=None, is_causal=True) -> str:
    """The implementation ``dot_product_attention`` runs for this call on this device."""
    if requested is not None:
        return requested
    import numpy as np

    from jax_attn import dispatch
    from jax_attn.validation import check_attention_args

    B, T, N, H = q_shape
    # zero-stride views: the shapes without the memory
    q = np.broadcast_to(np.zeros((), dtype), q_shape)
    k = np.broadcast_to(np.zeros((), dtype), (B, T, K or N, H))
    try:
        call = check_attention_args(q, k, k, is_causal=is_causal)
        return dispatch.select_implementation(call)
    except Exception:  # noqa: BLE001 - a label only
        return "default"


def mesh_label(sizes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "1"


def print_table(rows: list[dict], baseline: dict) -> None:
    mib = 2**20
    print(
        f"{'what':<44} {'mesh':<16} {'MiB/device':>11} {'temp MiB':>9} {'vs 1 dev':>8} "
        f"{'min ms':>9} {'median ms':>10} {'max ms':>9} {'spread':>7} {'compile s':>9}  "
        "collectives"
    )
    for row in rows:
        mem = row["memory_bytes"]
        ratio = mem["total"] / baseline["memory_bytes"]["total"]
        ops = ", ".join(f"{n}x{op}" for op, n in row["collectives"].items()) or "-"
        print(
            f"{row['name']:<44} {row['mesh']:<16} {mem['total'] / mib:>11.2f} "
            f"{mem['temp'] / mib:>9.2f} {ratio:>8.3f} {_ms(row['min_ms']):>9} "
            f"{_ms(row['median_ms']):>10} {_ms(row['max_ms']):>9} {_spread(row):>7} "
            f"{row['compile_s']:>9.2f}  {ops}"
        )
    note = timing.noisy_note(noisy_rows(rows))
    if note:
        print(note)


def noisy_rows(rows: list[dict]) -> list[str]:
    """``name [mesh]`` of each row whose spread is over :data:`timing.NOISY_SPREAD`."""
    return [f"{row['name']} [{row['mesh']}]" for row in rows if row.get("noisy")]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _spread(row: dict) -> str:
    if row.get("spread") is None:
        return "-"
    return f"{row['spread']:.0%}" + ("!" if row["noisy"] else " ")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = parse_mesh(args.mesh)
    except ValueError as error:
        print(f"jax-attn bench: {error}", file=sys.stderr)
        return 2
    needed = math.prod(sizes.values())
    request_host_devices(needed)

    import jax

    devices = jax.devices()
    if len(devices) < needed:
        print(
            f"jax-attn bench: --mesh {args.mesh} needs {needed} devices, found {len(devices)} "
            f"{devices[0].platform} device(s). On CPU set XLA_FLAGS={_DEVICE_FLAG}={needed} "
            "before jax is imported.",
            file=sys.stderr,
        )
        return 2
    devices = devices[:needed]
    try:
        if sizes["seq"] > 1:
            config, rows = bench_ring(args, sizes, devices)
        else:
            config, rows = bench_tensor_parallel(args, sizes, devices)
    except ValueError as error:
        print(f"jax-attn bench: {error}", file=sys.stderr)
        return 2
    for row in rows:
        row["collectives"] = collective_counts(row.pop("hlo"))

    device = devices[0]
    virtual = device.platform == "cpu" and needed > 1
    print(
        f"jax-attn bench --mesh {args.mesh}: {config}, dtype {args.dtype}, "
        f"{'forward+backward' if args.backward else 'forward'}; "
        f"{needed} x {device.device_kind} ({device.platform})"
        + (
            " virtual devices sharing the host's cores: times show no parallel speed-up"
            if virtual
            else ""
        )
    )
    print_table(rows, rows[0])

    result = {
        "command": f"jax-attn bench {' '.join(argv or sys.argv[1:])}".strip(),
        "mesh": sizes,
        "config": config,
        "dtype": args.dtype,
        "backward": args.backward,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": needed,
        "virtual_devices": virtual,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "time_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "memory_note": "per device, from compiled.memory_analysis(): "
        "argument + output + temp - alias bytes",
        "rows": rows,
        "noisy": noisy_rows(rows),
    }
    if args.out:
        path = Path(args.out)
    else:
        stamp = result["time_utc"].replace(":", "").replace("-", "")
        label = mesh_label(sizes).replace(",", "_").replace("=", "")
        path = Path("benchmarks/results") / f"mesh_{label}_{device.platform}_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
