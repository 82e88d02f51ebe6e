"""``jax-attn bench``: this library and its peers side by side, in one process, same inputs.

Contestants, per case kind:

* ``attention`` (q, k, v ``[B, T, N, H]``): ``jax_attn`` with the default dispatch and with
  each implementation named, ``jax.nn.dot_product_attention`` (xla; cudnn on NVIDIA GPUs)
  and PyTorch ``scaled_dot_product_attention`` when torch is installed;
* ``module`` (x ``[B, T, D]``, projections included): ``jax_attn.MultiHeadAttention`` vs
  flax.linen ``MultiHeadDotProductAttention`` and a PyTorch module around SDPA;
* ``memory``: a fresh subprocess runs one long-context call and reports its peak RSS
  (CPU) or the device's peak bytes in use (GPU).

Times are min / median / max after warm-up, the contestants of a case timed in turn,
round after round (so that load from other processes falls on all alike); a case whose
spread ``(max - min) / median`` is over 20% is flagged. Contestants that lower to the same
program (the default dispatch and the implementation it resolves to, ``jax_attn xla`` and
``jax.nn xla``) are timed once; the other row is reported as its alias. Compile time is apart.
Writes JSON (and a PNG of time against sequence length) under ``benchmarks/results/``
with the device named.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.apps import bench_mesh, timing
from jax_attn.apps.arguments import add_name_list
from jax_attn.apps.config import CONFIG_DIR, check_choice, load_dataclass
from jax_attn.apps.extras import require

__all__ = [
    "BenchCase",
    "BenchConfig",
    "MemoryCase",
    "SweepConfig",
    "build_parser",
    "load_bench_config",
    "main",
]


# --- configuration --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CaseSettings:
    """What a timed case and the sweep share: the inputs' batch, heads and dtype, whether
    causal, who is timed (``contestants``; empty: every one available for the kind) and
    how often (``repeats``; ``None``: the config's)."""

    batch: int
    num_heads: int
    head_dim: int
    dtype: str = "float32"
    causal: bool = True
    contestants: tuple[str, ...] = ()
    repeats: int | None = None


@dataclasses.dataclass(frozen=True)
class BenchCase(_CaseSettings):
    """One timed shape. ``kind`` is ``"attention"`` or ``"module"``; ``kv_len`` defaults to
    ``seq_len``. The settings it shares with the sweep are keyword-only."""

    name: str
    kind: str
    seq_len: int
    num_kv_heads: int | None = None
    kv_len: int | None = None
    grad: bool = False

    def __post_init__(self):
        check_choice(f"case {self.name!r}: kind", self.kind, ("attention", "module"))
        if self.kind == "module" and (self.kv_len or self.num_kv_heads):
            raise ValueError(f"case {self.name!r}: a module case has no kv_len/num_kv_heads")


@dataclasses.dataclass(frozen=True)
class SweepConfig(_CaseSettings):
    """Attention forward timed at several sequence lengths (the PNG plot)."""

    seq_lens: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MemoryCase:
    """A long-context call run in a fresh subprocess; its peak memory must stay under
    ``limit_mib``."""

    name: str
    seq_len: int
    num_heads: int
    head_dim: int
    limit_mib: int
    batch: int = 1
    grad: bool = False
    implementation: str = "chunked"
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    name: str
    warmup: int = 2
    repeats: int = 5
    output_dir: str = "benchmarks/results"
    torch: bool = True
    memory_timeout_s: int = 900
    matmul_size: int = 2048
    cases: tuple[BenchCase, ...] = ()
    sweep: SweepConfig | None = None
    memory: tuple[MemoryCase, ...] = ()


def load_bench_config(path) -> BenchConfig:
    return load_dataclass(path, BenchConfig)


# --- device and peers -----------------------------------------------------------------------


def device_info() -> dict:
    device = jax.devices()[0]
    info = {
        "platform": jax.default_backend(),
        "device": str(getattr(device, "device_kind", device.platform)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    try:
        import flax

        info["flax"] = flax.__version__
    except ImportError:
        pass
    torch = _torch()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"model name\s*:\s*(.+)", text)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_TORCH = "unset"


def _torch():
    """torch, with as many threads as this process' CPUs, or None when not installed."""
    global _TORCH
    if _TORCH == "unset":
        try:
            import torch

            torch.set_num_threads(
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            )
            _TORCH = torch
        except ImportError:
            _TORCH = None
    return _TORCH


def _torch_device():
    """ "cuda" when jax runs on a GPU and torch sees one, "cpu" when both are on CPU, else
    None (no fair comparison)."""
    torch = _torch()
    if torch is None:
        return None
    if jax.default_backend() == "gpu":
        return "cuda" if torch.cuda.is_available() else None
    return "cpu" if jax.default_backend() == "cpu" else None


# --- contestants ----------------------------------------------------------------------------
#: The rows that call the default dispatch: when one runs the same program as a named
#: implementation, the named row is timed and the default row points to it.
DEFAULT_ROWS = frozenset({"jax_attn (default)", "jax_attn MultiHeadAttention"})
#: Implementations this command does not time: the oracle, and ring attention, which needs
#: a mesh (``jax-attn bench --mesh`` times it).
NOT_TIMED = frozenset({"reference", "ring"})
# Each builder returns (kind, fn, args): kind "jax" (fn is jitted here) or "torch".


def _attention_inputs(case: BenchCase, seed=0):
    K = case.num_kv_heads or case.num_heads
    S = case.kv_len or case.seq_len
    keys = jax.random.split(jax.random.key(seed), 3)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(keys[0], (case.batch, case.seq_len, case.num_heads, case.head_dim), dtype)
    k = jax.random.normal(keys[1], (case.batch, S, K, case.head_dim), dtype)
    v = jax.random.normal(keys[2], (case.batch, S, K, case.head_dim), dtype)
    return q, k, v


def _with_grad(fn):
    """Forward and the gradient of the sum w.r.t. every input."""

    def loss(*args):
        return jnp.sum(fn(*args).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=tuple(range(3)))


def attention_contestants(case: BenchCase, torch: bool = True) -> dict:
    """name -> zero-argument builder of ("jax" | "torch", fn, args)."""
    import jax_attn as ja
    from jax_attn import dispatch

    contestants = {}
    causal = case.causal

    def ours(implementation):
        def build():
            q, k, v = _attention_inputs(case)
            fn = lambda q, k, v: ja.dot_product_attention(  # noqa: E731
                q, k, v, is_causal=causal, implementation=implementation
            )
            return "jax", _with_grad(fn) if case.grad else fn, (q, k, v)

        return build

    def jax_nn(implementation):
        def build():
            q, k, v = _attention_inputs(case)
            fn = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
                q, k, v, is_causal=causal, implementation=implementation
            )
            return "jax", _with_grad(fn) if case.grad else fn, (q, k, v)

        return build

    contestants["jax_attn (default)"] = ours(None)
    for name in dispatch.available_implementations():
        if name not in NOT_TIMED:
            contestants[f"jax_attn {name}"] = ours(name)
    same_length = (case.kv_len or case.seq_len) == case.seq_len
    if same_length or not causal:  # jax.nn aligns causal masks top-left
        contestants["jax.nn xla"] = jax_nn("xla")
        if "cudnn" in dispatch.available_implementations():
            contestants["jax.nn cudnn"] = jax_nn("cudnn")
    device = _torch_device() if torch else None
    if device is not None and (same_length or not causal):
        contestants["torch sdpa"] = lambda: _torch_sdpa(case, device)
    return contestants


def _torch_sdpa(case: BenchCase, device):
    torch = _torch()
    q, k, v = (np.asarray(x.astype(jnp.float32)) for x in _attention_inputs(case))
    dtype = getattr(torch, case.dtype)
    # [B, N, T, H]
    tq, tk, tv = (
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).to(device, dtype)
        for x in (q, k, v)
    )
    G = case.num_heads // (case.num_kv_heads or case.num_heads)
    if G > 1:
        tk, tv = tk.repeat_interleave(G, dim=1), tv.repeat_interleave(G, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if case.grad:
        tq, tk, tv = (x.requires_grad_(True) for x in (tq, tk, tv))

        def fn():
            out = sdpa(tq, tk, tv, is_causal=case.causal)
            out.float().sum().backward()
            return out
    else:

        def fn():
            with torch.no_grad():
                return sdpa(tq, tk, tv, is_causal=case.causal)

    return "torch", fn, ()


def module_contestants(case: BenchCase, torch: bool = True) -> dict:
    """``MultiHeadAttention`` (default dispatch and each implementation) vs flax and torch."""
    import flax.linen as nn

    import jax_attn as ja
    from jax_attn import dispatch

    B, T, N, H = case.batch, case.seq_len, case.num_heads, case.head_dim
    D = N * H
    dtype = jnp.dtype(case.dtype)
    x = jax.random.normal(jax.random.key(0), (B, T, D), dtype)
    contestants = {}
    # Flax options both JAX modules take, set alike: params and compute in the case's dtype.
    flax_options = {"dtype": dtype, "param_dtype": dtype, "deterministic": True}

    def ours(implementation):
        def build():
            module = ja.MultiHeadAttention(
                D,
                D,
                T,
                0.0,
                N,
                is_causal=case.causal,
                implementation=implementation,
                **flax_options,
            )
            params = jax.jit(module.init)(jax.random.key(1), x)
            fn = lambda params, x: module.apply(params, x)  # noqa: E731
            return "jax", _module_grad(fn) if case.grad else fn, (params, x)

        return build

    def flax_module():
        module = nn.MultiHeadDotProductAttention(
            num_heads=N, qkv_features=D, out_features=D, **flax_options
        )
        # The mask is an argument, as in a model that builds it once per batch.
        mask = nn.make_causal_mask(jnp.ones((B, T))) if case.causal else None
        params = jax.jit(module.init)(jax.random.key(1), x, mask=mask)
        fn = lambda params, x, mask: module.apply(params, x, mask=mask)  # noqa: E731
        return "jax", _module_grad(fn) if case.grad else fn, (params, x, mask)

    contestants["jax_attn MultiHeadAttention"] = ours(None)
    for name in dispatch.available_implementations():
        if name not in NOT_TIMED:
            contestants[f"jax_attn MultiHeadAttention {name}"] = ours(name)
    contestants["flax MultiHeadDotProductAttention"] = flax_module
    device = _torch_device() if torch else None
    if device is not None:
        contestants["torch MHA (sdpa)"] = lambda: _torch_module(case, x, device)
    return contestants


def _module_grad(fn):
    def loss(params, *args):
        return jnp.sum(fn(params, *args).astype(jnp.float32))

    return jax.value_and_grad(loss)


def _torch_module(case: BenchCase, x, device):
    """The book's MultiHeadAttention in PyTorch with SDPA inside (as PyTorch users write it)."""
    torch = _torch()
    N, H = case.num_heads, case.head_dim
    D = N * H

    module_base: Any = torch.nn.Module  # torch is imported at run time

    class TorchMHA(module_base):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(D, 3 * D, bias=False)
            self.out_proj = torch.nn.Linear(D, D)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, N, H).permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
            return self.out_proj(out.transpose(1, 2).reshape(B, T, D))

    dtype = getattr(torch, case.dtype)
    module = TorchMHA().to(device, dtype)
    tx = torch.from_numpy(np.array(x.astype(jnp.float32))).to(device, dtype)
    if case.grad:

        def fn():
            out = module(tx)
            out.float().sum().backward()
            return out
    else:

        def fn():
            with torch.no_grad():
                return module(tx)

    return "torch", fn, ()


# --- timing ---------------------------------------------------------------------------------


def _sync_torch():
    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclasses.dataclass
class Built:
    """A contestant ready to compile: ``program`` is its lowered text (jax) or ``None``."""

    kind: str
    fn: Callable
    args: tuple
    lowered: Any = None
    program: str | None = None


def build_contestant(build) -> Built:
    """Builds a contestant and, for jax, lowers it (not compiled yet)."""
    kind, fn, args = build()
    if kind != "jax":
        return Built(kind, fn, args)
    lowered = jax.jit(fn).lower(*args)
    return Built(kind, fn, args, lowered, re.sub(r"module @\S+", "module", lowered.as_text()))


def find_aliases(programs: dict[str, str | None]) -> dict[str, str]:
    """name -> the row it repeats, for contestants whose lowered programs are identical
    (e.g. the default dispatch and the implementation it resolves to). The named row
    is timed; the default rows are the aliases."""
    first_with: dict[str, str] = {}
    aliases = {}
    for name in sorted(programs, key=lambda n: n in DEFAULT_ROWS):
        program = programs[name]
        if program is None:
            continue
        if program in first_with:
            aliases[name] = first_with[program]
        else:
            first_with[program] = name
    return aliases


def prepare_contestant(built: Built) -> tuple[dict, Callable]:
    """Compiles a built contestant: its compile time and the compiled program's temporary
    memory (jax), and a zero-argument function that runs it to completion."""
    result: dict[str, Any] = {}
    if built.kind == "jax":
        start = time.perf_counter()
        compiled = built.lowered.compile()
        result["compile_s"] = time.perf_counter() - start
        try:
            analysis = compiled.memory_analysis()
            result["temp_bytes"] = int(analysis.temp_size_in_bytes)
        except Exception:  # noqa: BLE001 - not every backend reports it
            result["temp_bytes"] = None
        args = built.args
        run = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
    else:
        fn = built.fn
        run = lambda: (fn(), _sync_torch())  # noqa: E731
        start = time.perf_counter()
        run()
        result["compile_s"] = None
        result["first_call_s"] = time.perf_counter() - start
    return result, run


def time_interleaved(
    runs: dict, warmup: int, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict:
    """Times every contestant once per round, ``repeats`` rounds after ``warmup`` runs each,
    so that load from other processes falls on all of them alike. name -> seconds."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name] += timing.time_runs(run, 1, warmup=0, clock=clock)
    return times


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matrix-product rate of this device (GFLOP/s)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    seconds = timing.median_seconds(lambda: jax.block_until_ready(f(a)), repeats)
    return 2 * size**3 / seconds / 1e9


def case_gflop(case: BenchCase) -> float:
    """Matrix-product work of the case in GFLOP, counting only the causal half (flash
    attention's work) and, for modules, the four projections."""
    B, T, N, H = case.batch, case.seq_len, case.num_heads, case.head_dim
    S = case.kv_len or T
    pairs: float = T * S
    if case.causal:
        pairs = sum(min(S, t + S - T + 1) for t in range(T)) if S >= T else T * S / 2
    flops = 2 * 2 * B * N * pairs * H
    if case.kind == "module":
        flops += 4 * 2 * B * T * (N * H) ** 2
    if case.grad:
        flops *= 3.5 if case.kind == "attention" else 3.0
    return flops / 1e9


def _ratios(results: dict, baseline: str | None, peer: str | None) -> None:
    for result in results.values():
        if "median_ms" not in result:
            continue
        for key, name in (("vs_baseline", baseline), ("vs_torch", peer)):
            other = results.get(name, {}) if name else {}
            if "median_ms" in other:
                result[key] = result["median_ms"] / other["median_ms"]


TIMING_KEYS = ("min_ms", "median_ms", "max_ms", "spread", "noisy", "times_ms")


def _contestants(case: BenchCase, config: BenchConfig) -> dict:
    make = attention_contestants if case.kind == "attention" else module_contestants
    contestants = make(case, torch=config.torch)
    if case.contestants:
        contestants = {n: b for n, b in contestants.items() if n in case.contestants}
    return contestants


def _error(error: Exception) -> dict:
    return {"error": f"{type(error).__name__}: {str(error)[:300]}"}


def run_case(case: BenchCase, config: BenchConfig, progress=None, clock=time.perf_counter) -> dict:
    """Times the case's contestants in turn; identical programs are timed once (the other
    rows say ``alias_of``); a row whose spread is over 20% is listed in ``noisy``."""
    results, built = {}, {}
    for name, build in _contestants(case, config).items():
        try:
            built[name] = build_contestant(build)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: report, go on
            results[name] = _error(error)
    aliases = find_aliases({name: b.program for name, b in built.items()})
    runs = {}
    for name, contestant in built.items():
        if name in aliases:
            results[name] = {"alias_of": aliases[name]}
        else:
            try:
                results[name], runs[name] = prepare_contestant(contestant)
            except Exception as error:  # noqa: BLE001 - e.g. out of memory: report, go on
                results[name] = _error(error)
        if progress is not None:
            progress()
    repeats = case.repeats or config.repeats
    for name, times in time_interleaved(runs, config.warmup, repeats, clock).items():
        results[name].update(timing.summary_ms(times))
    for name, target in aliases.items():
        timed = results[target]
        results[name].update({key: timed[key] for key in TIMING_KEYS if key in timed})
    if case.kind == "attention" and "jax_attn (default)" in results:
        results["jax_attn (default)"]["resolves_to"] = default_implementation(case)
    baseline = "flax MultiHeadDotProductAttention" if case.kind == "module" else "jax.nn xla"
    peer = "torch MHA (sdpa)" if case.kind == "module" else "torch sdpa"
    _ratios(results, baseline if baseline in results else None, peer)
    return {
        "case": dataclasses.asdict(case),
        "gflop": case_gflop(case),
        "baseline": baseline,
        "results": results,
        "noisy": [n for n, r in results.items() if r.get("noisy") and "alias_of" not in r],
    }


def default_implementation(case: BenchCase) -> str:
    """The implementation ``implementation=None`` picks for the case on this device
    (found by tracing shapes only: nothing is allocated)."""
    from jax_attn import dispatch
    from jax_attn.validation import check_attention_args

    picked = []

    def probe(q, k, v):
        call = check_attention_args(q, k, v, is_causal=case.causal)
        picked.append(dispatch.select_implementation(call))
        return q

    jax.eval_shape(probe, *jax.eval_shape(lambda: _attention_inputs(case)))
    return picked[0]


def count_contestants(case: BenchCase, config: BenchConfig) -> int:
    """How many contestants :func:`run_case` will time (for the progress bar)."""
    return len(_contestants(case, config))


def sweep_cases(sweep: SweepConfig) -> list[BenchCase]:
    """One attention case per sequence length, with the sweep's settings."""
    settings = {f.name: getattr(sweep, f.name) for f in dataclasses.fields(_CaseSettings)}
    return [
        BenchCase(name=f"sweep T={T}", kind="attention", seq_len=T, **settings)
        for T in sweep.seq_lens
    ]


# --- long-context memory, in a fresh process ------------------------------------------------


def run_memory_case(case: MemoryCase, timeout_s: float = 900) -> dict:
    """Runs ``case`` in a fresh ``python -m jax_attn.apps.bench --memory-worker`` process."""
    spec = json.dumps(dataclasses.asdict(case))
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    start = time.perf_counter()
    result: dict[str, Any] = {"case": dataclasses.asdict(case)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "jax_attn.apps.bench", "--memory-worker", spec],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {**result, "error": f"timed out after {timeout_s} s", "passed": False}
    result["wall_s"] = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        result["error"] = (proc.stderr or proc.stdout)[-600:]
        result["passed"] = False
        return result
    result.update(json.loads(lines[-1]))
    result["passed"] = result["peak_mib"] < case.limit_mib
    result["plain_xla_temp_mib"] = _plain_temp_mib(case)
    return result


def _plain_temp_mib(case: MemoryCase) -> float | None:
    """What ``jax.nn.dot_product_attention`` (xla) would ask for, from its compiled program
    (compiled only, never run). On a GPU it compiles without autotuning: XLA's autotuner
    allocates the operands to time candidate matmuls, 1 TiB of logits at T 131072, and
    fails the compile with a page of errors (seen on an H200)."""
    try:
        shape = (case.batch, case.seq_len, case.num_heads, case.head_dim)
        spec = jax.ShapeDtypeStruct(shape, jnp.dtype(case.dtype))
        fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        if case.grad:
            fn = _with_grad(fn)
        options: dict[str, Any] | None = (
            {"xla_gpu_autotune_level": 0} if jax.default_backend() == "gpu" else None
        )
        compiled = jax.jit(fn).lower(spec, spec, spec).compile(options)
        analysis = compiled.memory_analysis()
        return None if analysis is None else analysis.temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001 - optional information
        return None


def _peak_rss_mib() -> float:
    """This process' peak resident memory. ``VmHWM`` belongs to the address space, so it
    starts afresh at ``exec``; ``ru_maxrss`` (the fallback) keeps the parent's peak across
    fork + exec on Linux and would report the benchmark process' own peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _memory_worker(spec: str) -> int:
    """Child process: one long-context call; prints a JSON line with its peak memory."""
    import jax_attn as ja

    case = MemoryCase(**json.loads(spec))
    shape = (case.batch, case.seq_len, case.num_heads, case.head_dim)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.dtype(case.dtype)) for key in keys)
    fn = lambda q, k, v: ja.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, implementation=case.implementation
    )
    if case.grad:
        fn = _with_grad(fn)
    jax.block_until_ready((q, k, v))
    rss_inputs = _peak_rss_mib()
    compiled = jax.jit(fn).lower(q, k, v).compile()
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    seconds = time.perf_counter() - start
    device = jax.devices()[0]
    result = {
        "seconds": seconds,
        "rss_after_inputs_mib": rss_inputs,
        "platform": jax.default_backend(),
    }
    stats = device.memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        result["peak_mib"] = stats["peak_bytes_in_use"] / 2**20
        result["measure"] = "device peak_bytes_in_use"
    else:
        result["peak_mib"] = _peak_rss_mib()
        result["measure"] = "process peak RSS (VmHWM)"
    print(json.dumps(result), flush=True)
    return 0


# --- report ---------------------------------------------------------------------------------


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_case(entry: dict, floor_ms: float | None) -> str:
    """The case's table: min / median / max per contestant, its spread (``!`` over 20%),
    alias rows pointing to the row that ran the same program."""
    case = entry["case"]
    shape = (
        f"B={case['batch']} T={case['seq_len']} N={case['num_heads']} "
        f"H={case['head_dim']} {case['dtype']}{' causal' if case['causal'] else ''}"
        f"{' fwd+grad' if case['grad'] else ' fwd'}"
    )
    lines = [
        f"\n{case['name']} [{case['kind']}] {shape}; {entry['gflop']:.1f} GFLOP"
        + (f", matmul floor {floor_ms:.0f} ms" if floor_ms else "")
    ]
    lines.append(
        f"  {'contestant':<40} {'min ms':>9} {'median ms':>10} {'max ms':>9} {'spread':>7} "
        f"{'compile s':>9} {'temp MiB':>9} {'x base':>7} {'x torch':>8}"
    )
    lines += [_format_row(name, r) for name, r in entry["results"].items()]
    if entry.get("noisy"):
        lines.append(
            f"  ! spread (max - min) / median over {timing.NOISY_SPREAD:.0%}: "
            + ", ".join(entry["noisy"])
            + " (a busy machine: rerun when it is idle)"
        )
    return "\n".join(lines)


def _format_row(name: str, r: dict) -> str:
    if "error" in r:
        return f"  {name:<40} error: {r['error'][:70]}"
    if "alias_of" in r:
        return f"  {name:<40} = {r['alias_of']} (the same program, timed once)"
    temp = None if r.get("temp_bytes") is None else r["temp_bytes"] / 2**20
    spread = f"{r['spread']:.0%}" + ("!" if r["noisy"] else " ")
    resolved = f" -> {r['resolves_to']}" if "resolves_to" in r else ""
    return (
        f"  {name + resolved:<40} {r['min_ms']:>9.2f} {r['median_ms']:>10.2f} "
        f"{r['max_ms']:>9.2f} {spread:>7} "
        f"{_fmt(r.get('compile_s'), '9.2f'):>9} {_fmt(temp, '9.1f'):>9} "
        f"{_fmt(r.get('vs_baseline'), '7.2f'):>7} {_fmt(r.get('vs_torch'), '8.2f'):>8}"
    )


def format_memory(entry: dict) -> str:
    case = entry["case"]
    what = (
        f"{case['name']}: {case['implementation']}, T={case['seq_len']} N={case['num_heads']} "
        f"H={case['head_dim']}{' jax.grad' if case['grad'] else ' forward'}"
    )
    if "error" in entry:
        return f"  {what}: FAILED {entry['error'][-200:]}"
    plain = entry.get("plain_xla_temp_mib")
    plain_text = "" if plain is None else f"; plain xla would need {plain / 1024:.1f} GiB temp"
    verdict = "under" if entry["passed"] else "OVER"
    return (
        f"  {what}: peak {entry['peak_mib']:.0f} MiB ({entry['measure']}), {verdict} the "
        f"{case['limit_mib']} MiB limit, {entry['seconds']:.1f} s{plain_text}"
    )


def plot_sweep(entries: list[dict], path: Path, title: str) -> None:
    require("matplotlib").use("Agg")
    plt = require("matplotlib.pyplot")

    series: dict[str, tuple[list, list]] = {}
    for entry in entries:
        T = entry["case"]["seq_len"]
        for name, r in entry["results"].items():
            if "median_ms" in r and "alias_of" not in r:
                xs, ys = series.setdefault(name, ([], []))
                xs.append(T)
                ys.append(r["median_ms"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("median time per call (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def run_bench(
    config: BenchConfig,
    *,
    output_dir: str | None = None,
    note: str = "",
    show_progress: bool = True,
    skip_memory: bool = False,
) -> dict:
    tqdm = require("tqdm.auto").tqdm
    info = device_info()
    print(
        f"jax-attn bench '{config.name}' on {info['platform']}: {info['device']} "
        f"({info['cpu']}, {info['cpu_count']} CPUs), jax {info['jax']}"
        + (
            f", torch {info['torch']} ({info['torch_threads']} threads)"
            if "torch" in info
            else ", torch not installed"
        ),
        flush=True,
    )
    rate = matmul_gflops(config.matmul_size)
    print(f"float32 matmul rate ({config.matmul_size}^3): {rate:.0f} GFLOP/s", flush=True)
    cases = list(config.cases)
    sweep = sweep_cases(config.sweep) if config.sweep else []
    total = sum(count_contestants(c, config) for c in cases + sweep)
    total += 0 if skip_memory else len(config.memory)
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=not show_progress)
    report: dict[str, Any] = {
        "config": config.name,
        "note": note,
        "info": info,
        "matmul_gflops": rate,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cases": [],
        "sweep": [],
        "memory": [],
    }
    out_dir = Path(output_dir or config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    stem = f"bench-{_slug(config.name)}-{_slug(info['device'])}-{stamp}"
    json_path = out_dir / f"{stem}.json"

    def save():  # after every entry, so a run cut short still leaves its results
        json_path.write_text(json.dumps(report, indent=1))

    for case in cases:
        entry = run_case(case, config, progress=bar.update)
        entry["floor_ms"] = 1e3 * entry["gflop"] / rate
        report["cases"].append(entry)
        save()
        bar.write(format_case(entry, entry["floor_ms"]))
    for case in sweep:
        report["sweep"].append(run_case(case, config, progress=bar.update))
        save()
    if sweep:
        bar.write(format_sweep(report["sweep"]))
        png = out_dir / f"{stem}.png"
        sweep_cfg = config.sweep
        assert sweep_cfg is not None  # cases in the sweep come from it
        plot_sweep(
            report["sweep"],
            png,
            f"attention forward, B={sweep_cfg.batch} N={sweep_cfg.num_heads} "
            f"H={sweep_cfg.head_dim} {sweep_cfg.dtype}"
            f"{' causal' if sweep_cfg.causal else ''} — {info['device']}",
        )
        report["plot"] = str(png)
        save()
        bar.write(f"wrote {png}")
    if not skip_memory:
        if config.memory:
            bar.write("\nlong context, peak memory of a fresh process:")
        for memory_case in config.memory:
            entry = run_memory_case(memory_case, timeout_s=config.memory_timeout_s)
            report["memory"].append(entry)
            save()
            bar.update()
            bar.write(format_memory(entry))
    bar.close()
    report["summary"] = summarize(report)
    if report["summary"]:
        print("\nsummary:\n" + "\n".join(f"  {line}" for line in report["summary"]))
    save()
    print(f"wrote {json_path}")
    report["json"] = str(json_path)
    return report


def summarize(report: dict) -> list[str]:
    """One line per headline ratio: the default path against flax / jax.nn and PyTorch,
    and each long-context run against its memory limit."""
    lines = []
    for entry in report["cases"]:
        ours = (
            "jax_attn MultiHeadAttention"
            if entry["case"]["kind"] == "module"
            else "jax_attn (default)"
        )
        result = entry["results"].get(ours, {})
        if "median_ms" not in result:
            continue
        parts = [f"{entry['case']['name']}: {ours} {result['median_ms']:.1f} ms"]
        if "vs_baseline" in result:
            parts.append(f"{result['vs_baseline']:.2f}x {entry['baseline']}")
        if "vs_torch" in result:
            parts.append(f"{result['vs_torch']:.2f}x PyTorch")
        if entry.get("noisy"):
            parts.append(f"noisy ({', '.join(entry['noisy'])})")
        lines.append(", ".join(parts))
    for entry in report["memory"]:
        case = entry["case"]
        if "peak_mib" in entry:
            verdict = "under" if entry["passed"] else "OVER"
            lines.append(
                f"{case['name']} (T={case['seq_len']}): peak {entry['peak_mib']:.0f} MiB, "
                f"{verdict} {case['limit_mib']} MiB"
            )
        else:
            lines.append(f"{case['name']} (T={case['seq_len']}): failed")
    return lines


def format_sweep(entries: list[dict]) -> str:
    names = []
    for entry in entries:
        names += [n for n in entry["results"] if n not in names]
    lines = [
        "\nsweep: median ms by sequence length (! spread over 20%)",
        "  " + f"{'T':>7} " + " ".join(f"{n[:18]:>18}" for n in names),
    ]
    for entry in entries:
        cells = []
        for name in names:
            r = entry["results"].get(name, {})
            cells.append(_sweep_cell(r))
        lines.append("  " + f"{entry['case']['seq_len']:>7} " + " ".join(cells))
    return "\n".join(lines)


def _sweep_cell(r: dict) -> str:
    if "median_ms" not in r:
        return f"{'-':>18}"
    return f"{r['median_ms']:>17.2f}" + ("!" if r["noisy"] else " ")


def build_parser() -> argparse.ArgumentParser:
    """``jax-attn bench``'s options, the ``--mesh`` ones in their own group."""
    parser = argparse.ArgumentParser(
        prog="jax-attn bench",
        description="jax_attn and its peers (flax, jax.nn, PyTorch SDPA) side by side.",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="bench TOML (default: configs/bench-gpu.toml on a GPU, else configs/bench-cpu.toml)",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where JSON and PNG go (default: the config's output_dir)",
    )
    add_name_list(parser, "--only", "NAME", "only the cases whose name contains one of these")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sequence-length sweep")
    parser.add_argument("--no-memory", action="store_true", help="skip the long-context runs")
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench_mesh.add_mesh_arguments(
        parser.add_argument_group(
            "sharded attention",
            "jax-attn bench --mesh AXIS=SIZE,... [these options] (docs/sharding.md); "
            "the options above do not apply",
        ),
        mesh_required=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--memory-worker"]:
        return _memory_worker(argv[1])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mesh is not None:
        # `jax-attn bench --mesh` comes here only when called from Python: the command line
        # goes to bench_mesh before jax is imported (it sets the CPU device count).
        return bench_mesh.main(argv)
    mesh_defaults = vars(bench_mesh.build_parser().parse_args(["--mesh", "unused"]))
    mesh_only = [
        f"--{dest.replace('_', '-')}"
        for dest, default in mesh_defaults.items()
        if dest != "mesh" and getattr(args, dest) != default
    ]
    if mesh_only:
        parser.error(f"{', '.join(mesh_only)}: only with --mesh")
    if args.config is None:
        name = "bench-gpu.toml" if jax.default_backend() == "gpu" else "bench-cpu.toml"
        args.config = str(CONFIG_DIR / name)
    config = load_bench_config(args.config)
    if args.only:
        config = dataclasses.replace(
            config, cases=tuple(c for c in config.cases if any(o in c.name for o in args.only))
        )
    if args.no_sweep:
        config = dataclasses.replace(config, sweep=None)
    run_bench(
        config,
        output_dir=args.output_dir,
        note=args.note,
        show_progress=not args.no_progress,
        skip_memory=args.no_memory,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
