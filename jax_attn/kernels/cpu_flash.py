"""``"cpu_flash"``: fused flash attention for x86-64 CPUs, an XLA FFI custom call.

XLA:CPU runs the ``chunked`` kernel as a loop of separate small operations (logits
written and read back per block, about one core busy); ``cpu_flash.cc`` does the whole
online softmax per tile of 64 query rows in one pass, its matrix products in AVX2/FMA
registers, its work items on XLA's intra-op thread pool. The backward is
FlashAttention-2's, one item per (batch, key/value head, share of its key tiles). Both are
checked against the reference like every kernel.

It serves float32 (bfloat16 and float16 widened to float32 at its edge), causal or not,
local windows, query and key lengths, GQA/MQA, any ``T`` and ``S``, head dims up to 256
(``H_v`` may differ from ``H``), and ``mask_fn``/``block_mask`` by their block structure
(:mod:`jax_attn.kernels.cpu_flash_tiles`: empty tiles skipped, full ones unmasked, a bitmask
per partial tile evaluated in JAX). It declines a mask array, bias, dropout and
``score_fn`` (``chunked`` serves those), float64, and CPUs without AVX2 and FMA.

XLA cannot split a custom call over devices by itself: the three calls go through
:mod:`jax_attn.kernels.partitioned` (``jax.experimental.custom_partitioning``), which
splits them over batch and heads under a plain ``jax.jit`` of sharded arrays and under
``jax.set_mesh``; inside ``jax.shard_map`` over every mesh axis each device runs its share.
It declines inside a ``shard_map`` over some axes while XLA partitions others.

The C++ source ships with the package and is compiled on first use with the system
C++ compiler (``$CXX``, split like a shell command, else ``g++``, ``c++`` or ``clang++``)
against jaxlib's FFI headers (``jax.ffi.include_dir()``), once per source, jaxlib version,
compiler and flags (``$JAX_ATTN_CPU_FLASH_CFLAGS`` adds some); the library is cached in
``$JAX_ATTN_CACHE_DIR`` (default ``~/.cache/jax_attn``) with its size and SHA-256 beside it,
and loaded only if they match (else rebuilt). Without a compiler, or where the build fails,
the implementation declines with the reason and dispatch falls through to ``chunked``.
``JAX_ATTN_CPU_FLASH=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform as host
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.kernels import chunked, cpu_flash_tiles
from jax_attn.kernels.base import Implementation, cotangent_like, partitioned_axes, varying_like
from jax_attn.kernels.flash_autodiff import FlashRules, flash_attention
from jax_attn.kernels.partitioned import partitioned_call
from jax_attn.validation import AttentionCall, KernelInputs

__all__ = [
    "CACHE_ENV",
    "CFLAGS_ENV",
    "COMPILE_FLAGS",
    "ENABLE_ENV",
    "IMPLEMENTATION",
    "MAX_HEAD_DIM",
    "backward",
    "build_reason",
    "cpu_flash_attention",
    "forward",
    "tangent",
]

ENABLE_ENV = "JAX_ATTN_CPU_FLASH"
CACHE_ENV = "JAX_ATTN_CACHE_DIR"
# Extra compiler flags, split like a shell command, appended to COMPILE_FLAGS and part of
# the cache key (the sanitizer build: "-fsanitize=address,undefined ...").
CFLAGS_ENV = "JAX_ATTN_CPU_FLASH_CFLAGS"
COMPILE_FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-fPIC", "-shared")
MAX_HEAD_DIM = 256
# Half precision is widened to float32 at the call's edge: the kernel computes in float32.
_DTYPES = ("float32", "bfloat16", "float16")
_SOURCE = Path(__file__).with_name("cpu_flash.cc")
_TARGETS = {
    "jax_attn_cpu_flash_forward": "JaxAttnFlashForward",
    "jax_attn_cpu_flash_backward": "JaxAttnFlashBackward",
    "jax_attn_cpu_flash_tangent": "JaxAttnFlashTangent",
    "jax_attn_cpu_flash_forward_sparse": "JaxAttnFlashForwardSparse",
    "jax_attn_cpu_flash_backward_sparse": "JaxAttnFlashBackwardSparse",
    "jax_attn_cpu_flash_tangent_sparse": "JaxAttnFlashTangentSparse",
}


def _compiler() -> list[str] | None:
    """The compiler command: ``$CXX`` split like a shell command (``CXX="g++ -O2"`` is
    g++ with a flag), else the first of g++, c++, clang++ found; ``None`` if none is."""
    if os.environ.get("CXX"):
        command = shlex.split(os.environ["CXX"])
        path = shutil.which(command[0]) if command else None
        return [path, *command[1:]] if path else None
    found = (shutil.which(name) for name in ("g++", "c++", "clang++"))
    return next(([path] for path in found if path), None)


def _extra_flags() -> list[str]:
    return shlex.split(os.environ.get(CFLAGS_ENV, ""))


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


def _fingerprint(data: bytes) -> str:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _sidecar(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _intact(library: Path) -> bytes | None:
    """The library's bytes if they match the size and SHA-256 written beside it at build
    time (a truncated or overwritten file mapped by the loader can kill the process with
    SIGBUS, so nothing unchecked is loaded); ``None`` otherwise."""
    try:
        data, recorded = library.read_bytes(), _sidecar(library).read_text().strip()
    except OSError:
        return None
    return data if _fingerprint(data) == recorded else None


def _library_path(command: list[str]) -> Path:
    """Where the library built by ``command`` with this source, jaxlib and flags is cached."""
    import jaxlib

    flags = shlex.join([*COMPILE_FLAGS, *_extra_flags()])
    key = hashlib.sha256(_SOURCE.read_bytes())
    key.update(f"{jaxlib.__version__} {shlex.join(command)} {flags}".encode())
    return _cache_dir() / f"cpu_flash-{key.hexdigest()[:16]}.so"


def _build(compiler: str | list[str]) -> Path:
    """The compiled library for this source, jaxlib, compiler and flags (built if missing
    or if its checksum does not match); raises ``RuntimeError`` saying why it cannot."""
    command = shlex.split(compiler) if isinstance(compiler, str) else list(compiler)
    flags = [*COMPILE_FLAGS, *_extra_flags()]
    library = _library_path(command)
    cache = library.parent
    if _intact(library) is not None:  # a read-only cache holding a good build loads
        return library
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache / "cpu_flash.lock"):
            if _intact(library) is None:
                with tempfile.TemporaryDirectory(dir=cache) as tmp:
                    built = Path(tmp) / library.name
                    result = subprocess.run(
                        [*command, *flags, "-I", jax.ffi.include_dir(), str(_SOURCE)]
                        + ["-o", str(built)],
                        capture_output=True,
                        text=True,
                        timeout=600,
                    )
                    if result.returncode != 0:
                        raise RuntimeError(
                            f"{shlex.join(command)} failed: {result.stderr.strip()[-800:]}"
                        )
                    sidecar = Path(tmp) / _sidecar(library).name
                    sidecar.write_text(_fingerprint(built.read_bytes()) + "\n")
                    # The library first: a sidecar never vouches for an older file.
                    os.replace(built, library)
                    os.replace(sidecar, _sidecar(library))
    except OSError as error:
        raise RuntimeError(f"no intact build in {cache} and cannot build there: {error}") from None
    if _intact(library) is None:
        raise RuntimeError(f"{library} does not match its checksum after building")
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
    manual = jax.sharding.get_abstract_mesh().manual_axes
    if manual and (axes := partitioned_axes()):
        return (
            f"not inside a jax.shard_map over some mesh axes ({', '.join(manual)}) while XLA "
            f"partitions others ({', '.join(axes)}): custom_partitioning cannot split a "
            "custom call there (a shard_map over every axis, or none, is served)"
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


def forward(call: AttentionCall, q, k, v, q_lengths, kv_lengths, *tiles):
    """The kernel's forward: q ``[..., T, N, H]``, k ``[..., S, K, H]``, v ``[..., S, K, H_v]``
    float32, lengths int32 ``[...]`` -> (out ``[..., T, N, H_v]``, lse ``[..., N, T]``) float32.
    ``lse`` is each row's log-sum-exp of its scaled logits (about -2.4e38 for a row with
    nothing to attend, whose ``out`` is zeros). A plain function: no derivative rule.
    ``tiles``: none, or a mask's ``(table, bitmasks)`` (:func:`cpu_flash_tiles.tile_table`)."""
    out, lse = partitioned_call(
        _ffi_forward,
        call,
        (q, k, v, q_lengths, kv_lengths, *tiles),
        ("q", "kv", "kv", "lengths", "lengths", *_tile_roles(call, tiles)),
        ("q", "lse"),
    )
    return varying_like(out, q, k, v, q_lengths, kv_lengths, *tiles), varying_like(lse, q, k, v)


def _tile_roles(call: AttentionCall, tiles) -> tuple[str, ...]:
    """The partitioning roles of a tile table and its bitmasks (none without)."""
    if not tiles:
        return ()
    return ("tiles" if tiles[0].shape[-3] == call.N else "tiles_shared", "tile_bits")


def _target(name: str, tiles) -> str:
    return f"jax_attn_cpu_flash_{name}" + ("_sparse" if tiles else "")


def _ffi_forward(call: AttentionCall, q, k, v, q_lengths, kv_lengths, *tiles):
    *lead, T, N, _ = q.shape
    out_types = (
        jax.ShapeDtypeStruct((*lead, T, N, call.H_v), jnp.float32),
        # [..., N, T] log-sum-exp of each row's scaled logits
        jax.ShapeDtypeStruct((*lead, N, T), jnp.float32),
    )
    forward = jax.ffi.ffi_call(_target("forward", tiles), out_types, vmap_method="broadcast_all")
    return forward(q, k, v, q_lengths, kv_lengths, *tiles, **_attributes(call))


_forward = forward


def tangent(call: AttentionCall, q, k, v, q_lengths, kv_lengths, out, lse, dq, dk, dv, *tiles):
    """The forward-mode derivative (JVP) of :func:`forward`'s (out, lse) at (q, k, v) in the
    direction (dq, dk, dv) (shaped and typed as q, k, v), given that point's ``out`` and
    ``lse`` -> (d_out ``[..., T, N, H_v]``, d_lse ``[..., N, T]``) float32.

    Per row i over the keys j it attends, with s = scale q_i.k_j and P_ij = exp(s_ij - lse_i):
    ds_ij = scale (dq_i.k_j + q_i.dk_j), mu_i = sum_j P_ij ds_ij,
    d_out_i = sum_j P_ij (ds_ij v_j + dv_j) - mu_i out_i and d_lse_i = mu_i (zeros for a row
    with nothing to attend). ``tiles`` as for :func:`forward`."""
    d_out, d_lse = partitioned_call(
        _ffi_tangent,
        call,
        (q, k, v, q_lengths, kv_lengths, out, lse, dq, dk, dv, *tiles),
        ("q", "kv", "kv", "lengths", "lengths", "q", "lse", "q", "kv", "kv")
        + _tile_roles(call, tiles),
        ("q", "lse"),
    )
    varying = (q, k, v, q_lengths, kv_lengths, dq, dk, dv)
    return varying_like(d_out, *varying), varying_like(d_lse, *varying)


def _ffi_tangent(call: AttentionCall, q, k, v, q_lengths, kv_lengths, out, lse, dq, dk, dv, *tiles):
    out_types = (
        jax.ShapeDtypeStruct(out.shape, jnp.float32),
        jax.ShapeDtypeStruct(lse.shape, jnp.float32),
    )
    call_tangent = jax.ffi.ffi_call(
        _target("tangent", tiles), out_types, vmap_method="broadcast_all"
    )
    return call_tangent(
        q, k, v, q_lengths, kv_lengths, out, lse, dq, dk, dv, *tiles, **_attributes(call)
    )


def backward(call: AttentionCall, q, k, v, q_lengths, kv_lengths, out, lse, d_out, d_lse, *tiles):
    """The reverse-mode derivative (VJP) of :func:`forward`'s (out, lse): given that
    point's ``out`` and ``lse`` and the cotangents ``d_out`` (as out) and ``d_lse`` (as lse)
    -> (dq, dk, dv) float32, shaped as q, k, v. FlashAttention-2's backward with
    dS_ij = P_ij (dP_ij - (D_i - d_lse_i)), D_i = d_out_i . out_i. ``tiles`` as for
    :func:`forward`."""
    d_out, d_lse = d_out.astype(jnp.float32), d_lse.astype(jnp.float32)
    grads = partitioned_call(
        _ffi_backward,
        call,
        (q, k, v, q_lengths, kv_lengths, out, lse, d_out, d_lse, *tiles),
        ("q", "kv", "kv", "lengths", "lengths", "q", "lse", "q", "lse") + _tile_roles(call, tiles),
        ("q", "kv", "kv"),
    )
    return tuple(varying_like(g, q, k, v, d_out, d_lse) for g in grads)


def _ffi_backward(
    call: AttentionCall, q, k, v, q_lengths, kv_lengths, out, lse, d_out, d_lse, *tiles
):
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    call_backward = jax.ffi.ffi_call(
        _target("backward", tiles), out_types, vmap_method="broadcast_all"
    )
    return call_backward(
        q, k, v, q_lengths, kv_lengths, out, lse, d_out, d_lse, *tiles, **_attributes(call)
    )


@functools.cache
def _rules(call: AttentionCall) -> FlashRules:
    """The kernel's maps for :mod:`jax_attn.kernels.flash_autodiff`: ``diff = (q, k, v)``,
    ``nondiff = (q_lengths, kv_lengths)``; forward, tangent and backward compiled, the pure
    maps (differentiated only at second order) those of ``chunked`` on the same masks."""
    plan = chunked.position_plan(call.T, call.S, call.is_causal, call.window, call.scale, True)

    def forward_(diff, nondiff):
        return forward(call, *diff, *nondiff)

    def tangent_(diff, nondiff, out, lse, d_diff):
        return tangent(call, *diff, *nondiff, out, lse, *d_diff)

    def backward_(diff, nondiff, out, lse, d_out, d_lse):
        if d_lse is None:
            d_lse = jnp.zeros(lse.shape, jnp.float32)
        grads = backward(call, *diff, *nondiff, out, lse, d_out, d_lse)
        return tuple(cotangent_like(g, x) for g, x in zip(grads, diff, strict=True))

    return FlashRules(
        forward=forward_,
        tangent=tangent_,
        backward=backward_,
        tangent_pure=functools.partial(chunked.position_tangent, plan),
        backward_pure=functools.partial(chunked.position_backward, plan),
    )


def _flash(call: AttentionCall, q, k, v, q_lengths, kv_lengths):
    return flash_attention(_rules(call), (q, k, v), (q_lengths, kv_lengths))[0]


@functools.cache
def _sparse_rules(call: AttentionCall) -> FlashRules:
    """:func:`_rules` with a mask's tiles: ``nondiff = (q_lengths, kv_lengths, table,
    bitmasks)``; the pure maps are ``chunked``'s with the mask the table encodes."""
    plan = dataclasses.replace(
        chunked.position_plan(call.T, call.S, call.is_causal, call.window, call.scale, True),
        mask_fn=cpu_flash_tiles.table_mask_fn,
    )

    def forward_(diff, nondiff):
        return forward(call, *diff, *nondiff)

    def tangent_(diff, nondiff, out, lse, d_diff):
        return tangent(call, *diff, *nondiff[:2], out, lse, *d_diff, *nondiff[2:])

    def backward_(diff, nondiff, out, lse, d_out, d_lse):
        if d_lse is None:
            d_lse = jnp.zeros(lse.shape, jnp.float32)
        grads = backward(call, *diff, *nondiff[:2], out, lse, d_out, d_lse, *nondiff[2:])
        return tuple(cotangent_like(g, x) for g, x in zip(grads, diff, strict=True))

    return FlashRules(
        forward=forward_,
        tangent=tangent_,
        backward=backward_,
        tangent_pure=functools.partial(chunked.position_tangent, plan),
        backward_pure=functools.partial(chunked.position_backward, plan),
    )


def cpu_flash_attention(q, k, v, *, call: AttentionCall, inputs: KernelInputs):
    """q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, H_v]`` ->
    ``[B, T, N, H_v]`` in q's dtype through the compiled kernel (in float32, half precision
    widened and the output rounded once); of ``inputs`` the lengths and ``mask_fn`` /
    ``block_mask`` (the rest is declined by ``_cpu_flash_unsupported``)."""
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
    if inputs.mask_fn is not None and call.T > 0 and call.S > 0:
        table, bitmasks, fits = cpu_flash_tiles.tiles(call, inputs)

        def sparse(q, k, v):
            nondiff = (q_lengths, kv_lengths, table, bitmasks)
            return flash_attention(_sparse_rules(call), (q, k, v), nondiff)[0]

        def chunked_instead(q, k, v):  # more partial tiles than a traced table holds
            return chunked.chunked_attention(q, k, v, call=call, inputs=inputs)

        if fits is None:
            return sparse(q, k, v).astype(call.dtype)
        return jax.lax.cond(fits, sparse, chunked_instead, q, k, v).astype(call.dtype)
    return _flash(call, q, k, v, q_lengths, kv_lengths).astype(call.dtype)


IMPLEMENTATION = Implementation(
    name="cpu_flash",
    fn=cpu_flash_attention,
    unsupported=_cpu_flash_unsupported,
    platforms=("cpu",),
    description="fused flash attention in C++ (AVX2/FMA) through XLA's FFI, float32",
    functions=frozenset({"mask_fn", "block_mask"}),
)
