"""What the library adds around its default kernel: the same call timed three ways, side
by side in one process, and the compiled program of each taken apart.

* ``default``: ``jax_attn.dot_product_attention`` (validation, the NaN policy's check and
  ``lax.cond``, the selected kernel);
* ``kernel only``: the selected kernel's registered function called directly (its
  adapter, e.g. the layout and masks ``xla``/``cudnn`` build, and its derivative rules;
  no NaN policy);
* ``jax.nn <name>``: ``jax.nn.dot_product_attention`` with the same implementation where
  it has one (``cudnn`` on an NVIDIA GPU, else ``xla``): the floor for the wrappers;
* ``torch sdpa``: PyTorch on the same device, where it sees it.

For each, the compiled HLO's inventory: conditionals (on a GPU a ``conditional`` may copy
its predicate to the host and wait), custom calls by target, transposes, fusions and
reductions. Forward, and forward + grad of a weighted sum.

    PYTHONPATH=. python benchmarks/dispatch_overhead.py                 # GPU: bf16
    PYTHONPATH=. python benchmarks/dispatch_overhead.py --dtype float32 --cases small
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_attn as ja
from jax_attn import dispatch
from jax_attn.apps.timing import interleaved_runs
from jax_attn.kernels.contract import KernelInputs
from jax_attn.validation import check_attention_args

RESULTS = Path(__file__).parent / "results"
# Untimed pause after each call: torch's OpenMP threads spin for a while after a call
# (GOMP_SPINCOUNT), and on a machine of few cores they slow whatever runs next.
SETTLE_S = 0.01
# name: (B, T, N, H), causal self-attention
CASES = {
    "small": (1, 256, 4, 64),
    "B1 T1024": (1, 1024, 16, 128),
    "B1 T4096": (1, 4096, 16, 128),
    "B4 T4096": (4, 4096, 16, 128),
}
_OPS = ("conditional", "transpose", "fusion", "reduce", "while", "copy")


def inventory(compiled) -> dict:
    """Counts of a compiled program's HLO operations that cost launches or syncs."""
    text = compiled.as_text()
    counts = collections.Counter()
    for line in text.splitlines():
        match = re.search(r"=\s*\S+\s+([a-z\-]+)\(", line)
        if match and match.group(1) in _OPS:
            counts[match.group(1)] += 1
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target:
            counts[f"custom-call {target.group(1)}"] += 1
    return dict(sorted(counts.items()))


def _contestants(q, k, v, grad: bool):
    call = check_attention_args(q, k, v, is_causal=True)
    name = dispatch.select_implementation(call)
    kernel = dispatch._REGISTRY[name].fn
    nn_name = "cudnn" if name == "cudnn" else "xla"
    functions = {
        "default": lambda q, k, v: ja.dot_product_attention(q, k, v, is_causal=True),
        f"kernel only ({name})": lambda q, k, v: kernel(q, k, v, call=call, inputs=KernelInputs()),
        f"jax.nn {nn_name}": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=nn_name
        ),
    }
    weights = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), q.dtype)
    programs = {}
    for label, fn in functions.items():
        if grad:

            def loss(q, k, v, fn=fn):
                return jnp.sum((fn(q, k, v) * weights).astype(jnp.float32))

            fn = jax.grad(loss, argnums=(0, 1, 2))
        try:
            programs[label] = jax.jit(fn).lower(q, k, v).compile()
        except Exception as error:  # noqa: BLE001 - record it, time the others
            programs[label] = f"{type(error).__name__}: {error}"[:300]
    return name, programs


def _torch_run(arrays, dtype, grad: bool):
    try:
        import torch
    except ImportError:
        return None
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cpu" and jax.default_backend() != "cpu":
        return None
    q, k, v = (
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
        .to(device, getattr(torch, dtype))
        .requires_grad_(grad)
        for x in arrays
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        if grad:
            out.sum().backward()
        sync()

    return run


def measure(case: str, dtype: str, grad: bool, rounds: int, warmup: int) -> dict:
    B, T, N, H = CASES[case]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((B, T, N, H), np.float32) for _ in range(3)]
    q, k, v = (jnp.asarray(x, dtype) for x in arrays)
    kernel, programs = _contestants(q, k, v, grad)
    row = {"case": case, "B": B, "T": T, "N": N, "H": H, "grad": grad, "kernel": kernel}
    runs = {}
    for label, program in programs.items():
        if isinstance(program, str):
            row[label] = {"error": program}
            continue
        row[label] = {"hlo": inventory(program)}
        runs[label] = lambda program=program: jax.block_until_ready(program(q, k, v))
    torch_run = _torch_run(arrays, dtype, grad)
    if torch_run is not None:
        runs["torch sdpa"] = torch_run
        row["torch sdpa"] = {}
    times = interleaved_runs(runs, rounds, warmup, settle_s=SETTLE_S)
    for label, runs_ in times.items():
        row[label].update(
            median_ms=1e3 * statistics.median(runs_),
            min_ms=1e3 * min(runs_),
            max_ms=1e3 * max(runs_),
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["B1 T1024", "B1 T4096", "B4 T4096"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    device = jax.devices()[0]
    label = str(getattr(device, "device_kind", device.platform))
    record = {
        "benchmark": "what the library adds around its default kernel",
        "device": label,
        "jax": jax.__version__,
        "dtype": args.dtype,
        "date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "load": os.getloadavg(),
        "rounds": args.rounds,
        "rows": [],
    }
    slug = label.lower().replace(" ", "-")
    output = args.output or RESULTS / f"dispatch_overhead-{slug}-{record['date']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        for grad in (False, True):
            row = measure(case, args.dtype, grad, args.rounds, args.warmup)
            record["rows"].append(row)
            # written after every row: a run cut short by a timeout keeps what it measured
            output.write_text(json.dumps(record, indent=1) + "\n")
            print(f"{case} {'fwd+grad' if grad else 'fwd'} (kernel {row['kernel']}):")
            for label_, cell in row.items():
                if isinstance(cell, dict):
                    timing = f"{cell['median_ms']:.3f} ms" if "median_ms" in cell else ""
                    print(f"  {label_:28s} {timing:>10s}  {cell.get('hlo', cell.get('error', ''))}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
