"""``"cpu_flash"``: fused flash attention for x86-64 CPUs, an XLA FFI custom call.

XLA:CPU runs the ``chunked`` kernel as a loop of separate small operations (logits
written and read back per block, about one core busy); ``cpu_flash.cc`` does the whole
online softmax per tile of 64 query rows in one pass, its matrix products in AVX2/FMA
registers, its work items on XLA's intra-op thread pool. The backward is
FlashAttention-2's, one item per (batch, key/value head, share of its key tiles). Both are
checked against the reference like every kernel.

It serves float32 (bfloat16 and float16 widened to float32 at its edge), causal or not,
local windows, query and key lengths, GQA/MQA, any ``T`` and ``S``, head dims up to 256
(``H_v`` may differ from ``H``). It declines a mask array, bias, dropout and
``mask_fn``/``score_fn``/``block_mask`` (``chunked`` serves those), float64, and CPUs
without AVX2 and FMA.

XLA cannot split a custom call over devices. Under a multi-device ``jax.set_mesh`` it
declines (``chunked`` partitions), and the default dispatch takes it only where nothing
is partitioned: in a single-device process, or inside ``jax.shard_map`` over every mesh
axis, where it runs on each device's share (``jax_attn.dispatch.CUSTOM_CALLS``). Named
explicitly under a plain ``jax.jit`` of sharded arrays, XLA gathers its inputs and runs it
whole on every device.

The C++ source ships with the package and is compiled on first use with the system
C++ compiler (``$CXX``, else ``g++``, ``c++`` or ``clang++``) against jaxlib's FFI headers
(``jax.ffi.include_dir()``), once per source, jaxlib version and compiler; the library is
cached in ``$JAX_ATTN_CACHE_DIR`` (default ``~/.cache/jax_attn``). Without a compiler the
implementation declines with the reason and dispatch falls through to ``chunked``.
``JAX_ATTN_CPU_FLASH=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform as host
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.kernels import chunked
from jax_attn.kernels.base import Implementation, cotangent_like, partitioned_axes, varying_like
from jax_attn.kernels.flash_autodiff import FlashRules, flash_attention
from jax_attn.validation import AttentionCall, KernelInputs

__all__ = [
    "CACHE_ENV",
    "COMPILE_FLAGS",
    "ENABLE_ENV",
    "IMPLEMENTATION",
    "MAX_HEAD_DIM",
    "build_reason",
    "cpu_flash_attention",
]

ENABLE_ENV = "JAX_ATTN_CPU_FLASH"
CACHE_ENV = "JAX_ATTN_CACHE_DIR"
COMPILE_FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-fPIC", "-shared")
MAX_HEAD_DIM = 256
# Half precision is widened to float32 at the call's edge: the kernel computes in float32.
_DTYPES = ("float32", "bfloat16", "float16")
_SOURCE = Path(__file__).with_name("cpu_flash.cc")
_TARGETS = {
    "jax_attn_cpu_flash_forward": "JaxAttnFlashForward",
    "jax_attn_cpu_flash_backward": "JaxAttnFlashBackward",
}


def _compiler() -> str | None:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for name in names if (path := shutil.which(name))), None)


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jax_attn"


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (parallel test workers build the library once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, a concurrent build only repeats the work
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build(compiler: str) -> Path:
    """The compiled library for this source, jaxlib and compiler (built if missing)."""
    import jaxlib

    key = hashlib.sha256(_SOURCE.read_bytes())
    key.update(f"{jaxlib.__version__} {compiler} {' '.join(COMPILE_FLAGS)}".encode())
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    library = cache / f"cpu_flash-{key.hexdigest()[:16]}.so"
    with _locked(cache / "cpu_flash.lock"):
        if not library.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / library.name
                command = [compiler, *COMPILE_FLAGS, "-I", jax.ffi.include_dir()]
                result = subprocess.run(
                    [*command, str(_SOURCE), "-o", str(built)],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if result.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-800:]}")
                os.replace(built, library)
    return library


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernel once per process; the reason it cannot, or
    ``None`` when it is ready."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return f"turned off ({ENABLE_ENV}=0)"
    if host.machine().lower() not in ("x86_64", "amd64"):
        return f"x86-64 CPUs only (AVX2 and FMA), this is {host.machine()}"
    compiler = _compiler()
    if compiler is None:
        return "needs a C++ compiler to build its kernel ($CXX, g++, c++ or clang++): none found"
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return f"could not build its kernel from {_SOURCE.name}: {error}"
    if not library.JaxAttnCpuSupported():
        return "this CPU lacks AVX2 or FMA"
    for target, symbol in _TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    return None


def build_reason() -> str | None:
    """Why the compiled kernel is not available here (``None``: it is)."""
    return _load()


def _cpu_flash_unsupported(call: AttentionCall, platform: str) -> str | None:
    del platform  # CPU only: the dispatcher checks IMPLEMENTATION.platforms first
    if call.dtype.name not in _DTYPES:
        return f"dtype {call.dtype} ({', '.join(_DTYPES)} only)"
    if call.has_mask or call.has_bias:
        return "no mask or bias (causal, window and lengths are served)"
    if call.dropout_rate > 0.0:
        return f"no dropout, got dropout_rate={call.dropout_rate}"
    if max(call.H, call.H_v) > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM}, got H={call.H}, H_v={call.H_v}"
    if axes := partitioned_axes():
        return (
            f"not under a mesh that XLA partitions (axes {axes} of jax.set_mesh): a custom "
            "call cannot be split over devices (inside jax.shard_map it runs per device)"
        )
    return build_reason()


def _attributes(call: AttentionCall) -> dict:
    left, right = call.window if call.window is not None else (-1, -1)
    return dict(
        scale=np.float32(call.scale),
        causal=bool(call.is_causal),
        window_left=np.int64(left),
        window_right=np.int64(right),
    )


def _forward(call: AttentionCall, q, k, v, q_lengths, kv_lengths):
    *lead, T, N, _ = q.shape
    out_types = (
        jax.ShapeDtypeStruct((*lead, T, N, call.H_v), jnp.float32),
        # [..., N, T] log-sum-exp of each row's scaled logits
        jax.ShapeDtypeStruct((*lead, N, T), jnp.float32),
    )
    forward = jax.ffi.ffi_call("jax_attn_cpu_flash_forward", out_types, vmap_method="broadcast_all")
    out, lse = forward(q, k, v, q_lengths, kv_lengths, **_attributes(call))
    return varying_like(out, q, k, v, q_lengths, kv_lengths), varying_like(lse, q, k, v)


def _ffi_backward(call: AttentionCall, diff, nondiff, out, lse, d_out, d_lse):
    """The compiled FlashAttention-2 backward: ``(dq, dk, dv)``."""
    (q, k, v), (q_lengths, kv_lengths) = diff, nondiff
    del d_lse  # TODO: the compiled backward's lse cotangent
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    backward = jax.ffi.ffi_call(
        "jax_attn_cpu_flash_backward", out_types, vmap_method="broadcast_all"
    )
    d_out = d_out.astype(jnp.float32)
    grads = backward(q, k, v, q_lengths, kv_lengths, out, lse, d_out, **_attributes(call))
    dq, dk, dv = (varying_like(g, q, k, v, d_out) for g in grads)
    return cotangent_like(dq, q), cotangent_like(dk, k), cotangent_like(dv, v)


@functools.cache
def _rules(call: AttentionCall) -> FlashRules:
    """The kernel's maps for :mod:`jax_attn.kernels.flash_autodiff`: ``diff = (q, k, v)``,
    ``nondiff = (q_lengths, kv_lengths)``; forward and backward compiled, the tangent and
    the pure maps (second order) those of ``chunked`` on the same position masks."""
    plans = [
        chunked.position_plan(call.T, call.S, call.is_causal, call.window, call.scale, static)
        for static in (False, True)
    ]

    def forward(diff, nondiff):
        return _forward(call, *diff, *nondiff)

    return FlashRules(
        forward=forward,
        tangent=functools.partial(chunked.position_tangent, plans[0]),
        backward=functools.partial(chunked.position_backward, plans[0]),
        tangent_pure=functools.partial(chunked.position_tangent, plans[1]),
        backward_pure=functools.partial(chunked.position_backward, plans[1]),
    )


def _flash(call: AttentionCall, q, k, v, q_lengths, kv_lengths):
    return flash_attention(_rules(call), (q, k, v), (q_lengths, kv_lengths))[0]


def cpu_flash_attention(q, k, v, *, call: AttentionCall, inputs: KernelInputs):
    """q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, H_v]`` ->
    ``[B, T, N, H_v]`` in q's dtype through the compiled kernel (in float32, half precision
    widened and the output rounded once); of ``inputs`` only the lengths (the rest is
    declined by ``_cpu_flash_unsupported``)."""
    reason = build_reason()
    if reason is not None:
        raise ValueError(f"cpu_flash: {reason}")

    def lengths(given, full: int):
        if given is None:
            return jnp.full((call.B,), full, jnp.int32)
        return jnp.asarray(given).astype(jnp.int32)

    q_lengths = lengths(inputs.query_seq_lengths, call.T)
    kv_lengths = lengths(inputs.key_value_seq_lengths, call.S)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return _flash(call, q, k, v, q_lengths, kv_lengths).astype(call.dtype)


IMPLEMENTATION = Implementation(
    name="cpu_flash",
    fn=cpu_flash_attention,
    unsupported=_cpu_flash_unsupported,
    platforms=("cpu",),
    description="fused flash attention in C++ (AVX2/FMA) through XLA's FFI, float32",
)
