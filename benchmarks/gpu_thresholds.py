"""The measurements behind the dispatcher's size rules on a platform (issue: tune them on a
GPU): where ``chunked`` overtakes ``xla`` as the number of queries grows
(``dispatch.CHUNKED_MIN_QUERIES``), as the float32 logits ``[B, N, T, S]`` grow
(``dispatch.CHUNKED_MIN_LOGIT_BYTES``), and which block budget suits ``chunked``
(``chunked.CHUNK_BUDGET``).

Three sweeps, each contestant timed once per round in a new random order, medians after
warm-up, compile time apart, every output checked against the reference first:

* ``queries``: causal attention of T queries against S keys (bottom-right, as in chunked
  prefill), T from 1 to 128: ``xla`` against ``chunked``;
* ``logits``: self-attention with key lengths (what cuDNN and ``pallas_gpu`` decline in
  float32), T = S growing: ``xla`` against ``chunked``, forward and forward + grad, with
  each one's peak memory where the device reports it;
* ``budget``: ``chunked`` at one long shape under several ``CHUNK_BUDGET`` entries.

Each sweep prints the crossover it finds and writes everything to JSON after every case.

    PYTHONPATH=. python benchmarks/gpu_thresholds.py                 # on the GPU, ~2-3 min
    PYTHONPATH=. python benchmarks/gpu_thresholds.py --quick         # tiny sizes (any device)
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
from jax_attn.apps.timing import interleaved_runs
from jax_attn.kernels import chunked

RESULTS = Path(__file__).parent / "results"
SIZES = {
    "full": {
        "queries": dict(B=8, S=4096, N=16, H=128, T=[1, 2, 4, 8, 16, 32, 64, 128]),
        "logits": dict(B=1, N=16, H=128, T=[1024, 2048, 4096, 8192, 16384]),
        "budget": dict(B=1, T=8192, N=16, H=128, budgets=[2**22, 2**23, 2**24, 2**25]),
    },
    "quick": {
        "queries": dict(B=1, S=256, N=2, H=16, T=[1, 8, 32]),
        "logits": dict(B=1, N=2, H=16, T=[128, 256]),
        "budget": dict(B=1, T=256, N=2, H=16, budgets=[2**12, 2**16]),
    },
}


def _arrays(B, T, S, N, H, dtype):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, N, H), np.float32)
    k, v = (rng.standard_normal((B, S, N, H), np.float32) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _program(implementation, options, grad, args):
    def attend(q, k, v):
        return ja.dot_product_attention(q, k, v, implementation=implementation, **options)

    fn = attend
    if grad:

        def fn(q, k, v):
            return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2))(
                q, k, v
            )

    return jax.jit(fn).lower(*args).compile()


def _peak_bytes(program) -> int | None:
    try:
        return int(program.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def _time(programs, args, rounds, warmup):
    runs = {name: (lambda p=p: jax.block_until_ready(p(*args))) for name, p in programs.items()}
    times = interleaved_runs(runs, rounds, warmup)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _checked(programs, args, options, dtype):
    q, k, v = args
    want = np.asarray(ja.reference.dot_product_attention(q, k, v, **options), np.float32)
    tolerance = 2e-3 if jnp.dtype(dtype).itemsize >= 4 else 3e-2
    for name, program in programs.items():
        got = np.asarray(program(*args), np.float32)
        error = float(np.abs(got - want).max())
        if not error <= tolerance:
            raise AssertionError(f"{name}: max |out - reference| = {error} > {tolerance}")


def sweep_queries(sizes, dtype, rounds, warmup, record, save):
    rows = record.setdefault("queries", [])
    for T in sizes["T"]:
        args = _arrays(sizes["B"], T, sizes["S"], sizes["N"], sizes["H"], dtype)
        options = {"is_causal": True}
        programs = {name: _program(name, options, False, args) for name in ("xla", "chunked")}
        _checked(programs, args, options, dtype)
        ms = _time(programs, args, rounds, warmup)
        rows.append({"T": T, **{f"{name}_ms": value for name, value in ms.items()}})
        save()
        print(
            f"queries T {T:4d} S {sizes['S']}: xla {ms['xla']:.3f} chunked {ms['chunked']:.3f} ms"
        )
    wins = [row["T"] for row in rows if row["chunked_ms"] <= row["xla_ms"]]
    record["queries_crossover_T"] = min(wins) if wins else None
    print(f"queries: chunked at or ahead of xla from T = {record['queries_crossover_T']}")


def sweep_logits(sizes, dtype, rounds, warmup, record, save):
    rows = record.setdefault("logits", [])
    for T in sizes["T"]:
        B, N = sizes["B"], sizes["N"]
        args = _arrays(B, T, T, N, sizes["H"], dtype)
        options = {"is_causal": True, "key_value_seq_lengths": jnp.full((B,), T - 1, jnp.int32)}
        row = {"T": T, "logit_bytes": 4 * B * N * T * T}
        for grad in (False, True):
            programs = {}
            for name in ("xla", "chunked"):
                try:
                    programs[name] = _program(name, options, grad, args)
                except Exception as error:  # noqa: BLE001 - out of memory at large T
                    row[f"{name}_{'grad' if grad else 'fwd'}_error"] = str(error)[:200]
            if not grad:
                _checked(programs, args, options, dtype)
            ms = _time(programs, args, rounds, warmup)
            kind = "grad" if grad else "fwd"
            for name, program in programs.items():
                row[f"{name}_{kind}_ms"] = ms[name]
                row[f"{name}_{kind}_temp_bytes"] = _peak_bytes(program)
        rows.append(row)
        save()
        print(f"logits T {T}: { ({k: v for k, v in row.items() if k.endswith('_ms')}) }")
    wins = [
        r["logit_bytes"] for r in rows if r.get("chunked_fwd_ms", 1e9) <= r.get("xla_fwd_ms", 0)
    ]
    record["logits_crossover_bytes"] = min(wins) if wins else None
    print(f"logits: chunked at or ahead of xla (forward) from {record['logits_crossover_bytes']} B")


def sweep_budget(sizes, dtype, rounds, warmup, record, save):
    platform = jax.default_backend()
    original = chunked.CHUNK_BUDGET.get(platform, chunked.CHUNK_BUDGET["cpu"])
    B, T, N, H = sizes["B"], sizes["T"], sizes["N"], sizes["H"]
    args = _arrays(B, T, T, N, H, dtype)
    options = {"is_causal": True, "key_value_seq_lengths": jnp.full((B,), T - 1, jnp.int32)}
    programs = {}
    try:
        for budget in sizes["budgets"]:
            chunked.CHUNK_BUDGET[platform] = (original[0], original[1], budget, original[3])
            chunks = chunked.default_chunk_sizes(B * N, platform)
            programs[f"budget {budget} chunks {chunks}"] = _program("chunked", options, False, args)
    finally:
        chunked.CHUNK_BUDGET[platform] = original
    _checked(programs, args, options, dtype)
    record["budget"] = {"shape": [B, T, N, H], "ms": _time(programs, args, rounds, warmup)}
    record["budget"]["current"] = list(original)
    save()
    for name, value in record["budget"]["ms"].items():
        print(f"budget: {name}: {value:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a check of the script)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    sizes = SIZES["quick" if args.quick else "full"]
    device = jax.devices()[0]
    label = str(getattr(device, "device_kind", device.platform))
    record = {
        "benchmark": "the dispatcher's size rules: xla against chunked, chunked's budget",
        "device": label,
        "jax": jax.__version__,
        "dtype": args.dtype,
        "date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "load": os.getloadavg(),
        "rounds": args.rounds,
    }
    slug = label.lower().replace(" ", "-")
    output = args.output or RESULTS / f"gpu_thresholds-{slug}-{record['date']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)

    def save():
        output.write_text(json.dumps(record, indent=1) + "\n")

    sweep_queries(sizes["queries"], args.dtype, args.rounds, args.warmup, record, save)
    sweep_logits(sizes["logits"], args.dtype, args.rounds, args.warmup, record, save)
    sweep_budget(sizes["budget"], args.dtype, args.rounds, args.warmup, record, save)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
