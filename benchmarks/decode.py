"""One decoding step's attention against a KV cache, side by side with PyTorch SDPA.

A step attends ``T = 1`` new query per sequence over a cache of ``S_max`` slots of which
``filled`` hold keys (the new token's own key included), as ``kv_cache.attend_cache``
does inside a user's jitted decode loop. Contestants, each timed once per round,
interleaved (in a new random order each round), after warm-up, compile time
apart:

* ``jax_attn default`` / ``jax_attn <name>``: ``kv_cache.attend_cache`` (the library's
  decode path: the filled slots as key lengths), the default and each implementation
  that serves the call on this platform;
* ``jax.nn xla`` (and ``jax.nn cudnn`` on an NVIDIA GPU): ``jax.nn.dot_product_attention``
  with ``key_value_seq_lengths``;
* ``torch masked``: ``scaled_dot_product_attention`` over the whole static cache with a
  boolean mask (a static cache, as Hugging Face's ``StaticCache``);
* ``torch sliced``: the same over the filled slots only (a cache that grows).

Every contestant's output is checked against ``jax_attn.reference`` before timing.
Ratios are per round against ``torch masked`` (min/median/max). Shapes: GPT-2 small
(B 8, N 12, H 64, cache 1024) and a Llama-like GQA layer (B 4, N 32, K 8, H 128, cache
4096), each half and all filled.

    PYTHONPATH=. python benchmarks/decode.py                       # float32 (CPU)
    PYTHONPATH=. python benchmarks/decode.py --dtype bfloat16      # GPU
    PYTHONPATH=. python benchmarks/decode.py --cases gpt2 --rounds 5  # quick

Run it on an idle machine; on a CPU, in a process of one device.
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
from jax_attn import dispatch, kv_cache, reference
from jax_attn.apps import bench
from jax_attn.apps.timing import interleaved_runs
from jax_attn.validation import check_attention_args

RESULTS = Path(__file__).parent / "results"
# Untimed pause after each call: torch's OpenMP threads spin for a while after a call
# (GOMP_SPINCOUNT), and on a machine of few cores they slow whatever runs next.
SETTLE_S = 0.01
# name: (B, N, K, H, S_max)
CASES = {
    "gpt2": (8, 12, 12, 64, 1024),
    "llama_gqa": (4, 32, 8, 128, 4096),
}
PEER = "torch masked"


def _inputs(B, N, K, H, S_max, filled, dtype):
    """q ``[B, 1, N, H]``, a cache of ``S_max`` slots with ``filled`` written, and the new
    token's slot ``start [B]`` (``filled - 1``), as float32 numpy and as jax arrays."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, 1, N, H), np.float32)
    k, v = (rng.standard_normal((B, S_max, K, H), np.float32) for _ in range(2))
    k[:, filled:] = 0.0  # an empty slot holds zeros, as init_cache leaves it
    v[:, filled:] = 0.0
    cache = kv_cache.KVCache(
        jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.full((B,), filled, jnp.int32)
    )
    return (q, k, v), jnp.asarray(q, dtype), cache, jnp.full((B,), filled - 1, jnp.int32)


def _jax_contestants(q, cache, start, filled):
    """name -> a blocking call, for the library's decode path and jax.nn."""
    runs = {}

    def attend(implementation):
        step = jax.jit(
            lambda cache, q, start: kv_cache.attend_cache(
                cache, q, start=start, implementation=implementation
            )
        )
        return lambda: step(cache, q, start).block_until_ready()

    runs["jax_attn default"] = attend(None)
    probe = check_attention_args(q, cache.key, cache.value, key_value_seq_lengths=start + 1)
    platform = jax.default_backend()
    for name in ja.available_implementations():
        if name != "reference" and dispatch.unsupported_reason(name, probe, platform) is None:
            runs[f"jax_attn {name}"] = attend(name)
    lengths = jnp.full((q.shape[0],), filled, jnp.int32)
    jax_nn = ["xla"] + (["cudnn"] if platform == "gpu" else [])
    for implementation in jax_nn:
        nn = jax.jit(
            lambda q, k, v, lengths, implementation=implementation: jax.nn.dot_product_attention(
                q, k, v, key_value_seq_lengths=lengths, implementation=implementation
            )
        )
        runs[f"jax.nn {implementation}"] = lambda nn=nn: nn(
            q, cache.key, cache.value, lengths
        ).block_until_ready()
    return runs


def _torch_contestants(arrays, filled, dtype):
    """(name -> a blocking call of torch SDPA on the same numbers, its output as numpy
    ``[B, 1, N, H]``); ``({}, None)`` without torch."""
    try:
        import torch
    except ImportError:
        return {}, None
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cpu" and jax.default_backend() != "cpu":
        return {}, None  # torch cannot see this accelerator: no like-for-like comparison
    torch_dtype = getattr(torch, dtype)
    # [B, N, 1, H], [B, K, S_max, H]: torch's head-major layout
    q, k, v = (
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).to(device, torch_dtype)
        for x in arrays
    )
    S_max = k.shape[2]
    mask = (torch.arange(S_max, device=device) < filled)[None, None, None, :]
    gqa = q.shape[1] != k.shape[1]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def masked():
        out = sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa)
        sync()
        return out

    def sliced():
        out = sdpa(q, k[:, :, :filled], v[:, :, :filled], enable_gqa=gqa)
        sync()
        return out

    return {
        PEER: masked,
        "torch sliced": sliced,
    }, lambda out: out.float().cpu().numpy().transpose(0, 2, 1, 3)


def measure(case, filled, dtype, rounds, warmup):
    B, N, K, H, S_max = CASES[case]
    arrays, q, cache, start = _inputs(B, N, K, H, S_max, filled, dtype)
    want = np.asarray(
        reference.dot_product_attention(
            jnp.asarray(arrays[0]),
            jnp.asarray(arrays[1]),
            jnp.asarray(arrays[2]),
            key_value_seq_lengths=jnp.full((B,), filled),
        )
    )
    tolerance = 1e-4 if jnp.dtype(dtype).itemsize >= 4 else 2e-2
    runs = _jax_contestants(q, cache, start, filled)
    torch_runs, from_torch = _torch_contestants(arrays, filled, dtype)
    runs.update(torch_runs)
    to_numpy = dict.fromkeys(torch_runs, from_torch)
    errors = {}
    for name, run in list(runs.items()):
        try:
            out = run()
            got = to_numpy[name](out) if name in to_numpy else np.asarray(out, np.float32)
            error = float(np.abs(got - want).max())
            if not error <= tolerance:
                raise AssertionError(f"max |out - reference| = {error} > {tolerance}")
        except Exception as failure:  # noqa: BLE001 - record it and leave the contestant out
            errors[name] = f"{type(failure).__name__}: {failure}"[:300]
            del runs[name]
    times = interleaved_runs(runs, rounds, warmup, settle_s=SETTLE_S)
    row = {"case": case, "B": B, "N": N, "K": K, "H": H, "S_max": S_max, "filled": filled}
    row["default"] = dispatch.select_implementation(
        check_attention_args(q, cache.key, cache.value, key_value_seq_lengths=start + 1)
    )
    for name, runs_ in times.items():
        cell = {"median_ms": 1e3 * statistics.median(runs_), "min_ms": 1e3 * min(runs_)}
        cell["max_ms"] = 1e3 * max(runs_)
        if PEER in times:
            ratios = [t / p for t, p in zip(runs_, times[PEER], strict=True)]
            cell["ratio_to_torch_masked"] = [min(ratios), statistics.median(ratios), max(ratios)]
        row[name] = cell
    row["errors"] = errors
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--fills", nargs="+", type=float, default=[0.5, 1.0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if jax.default_backend() == "cpu" and jax.device_count() != 1:
        raise SystemExit(f"run in a process of one device (found {jax.device_count()})")
    load_before = os.getloadavg()
    device = jax.devices()[0]
    label = (
        f"CPU: {bench._cpu_model()}"
        if device.platform == "cpu"
        else str(getattr(device, "device_kind", device.platform))
    )
    record = {
        "benchmark": "decode step attention (T 1 against a KV cache)",
        "device": label,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "dtype": args.dtype,
        "date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "load_before": load_before,
        "rounds": args.rounds,
        "rows": [],
    }
    slug = "cpu" if device.platform == "cpu" else label.lower().replace(" ", "-")
    output = args.output or RESULTS / f"decode-{slug}-{args.dtype}-{record['date']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        for fill in args.fills:
            filled = max(1, int(round(fill * CASES[case][-1])))
            row = measure(case, filled, args.dtype, args.rounds, args.warmup)
            record["rows"].append(row)
            record["load_after"] = os.getloadavg()
            # written after every row: a run cut short by a timeout keeps what it measured
            output.write_text(json.dumps(record, indent=1) + "\n")
            cells = "  ".join(
                f"{name} {cell['median_ms']:.3f} ms"
                + (
                    f" ({cell['ratio_to_torch_masked'][1]:.2f}x)"
                    if "ratio_to_torch_masked" in cell
                    else ""
                )
                for name, cell in row.items()
                if isinstance(cell, dict) and "median_ms" in cell
            )
            print(f"{case} filled {filled}/{row['S_max']} (default {row['default']}): {cells}")
            for name, error in row["errors"].items():
                print(f"  {name} left out: {error}")
    print(f"wrote {output} (load {record['load_before']} -> {record['load_after']})")


if __name__ == "__main__":
    main()
