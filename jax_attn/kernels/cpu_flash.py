"""``"cpu_flash"``: fused flash attention for x86-64 CPUs, an XLA FFI custom call.

XLA:CPU runs the ``chunked`` kernel as a loop of separate small operations (logits
written and read back per block, about one core busy); ``cpu_flash.cc`` does the whole
online softmax per tile of 64 query rows in one pass, its matrix products in AVX2/FMA
registers, its work items on XLA's intra-op thread pool. The backward is
FlashAttention-2's, one item per (batch, key/value head, share of its key tiles). Both are
checked against the reference like every kernel.

It serves float32 (bfloat16 and float16 widened to float32 at its edge), causal or not,
local windows, query and key lengths, a boolean ``mask`` and an additive ``bias``
broadcastable to ``[B, N, T, S]`` (passed as given: the kernel reads an axis of size 1
with stride 0, never a broadcast copy; ``bias`` differentiable, its gradient summed over
its broadcast axes), GQA/MQA, any ``T`` and ``S``, head dims up to 256 (``H_v`` may differ
from ``H``), ``logit_soft_cap`` and ``alibi_slopes`` natively (the slopes as constants: no
derivative with respect to them), and dropout: the library's hash
(:func:`jax_attn.masks.make_dropout_mask`) finished per weight in the kernel from each
``(b, n)``'s hash state (:func:`jax_attn.masks.dropout_row_seeds`, computed here in JAX,
so ``jax.vmap`` and splitting over devices keep the reference's indices), dropping exactly
the reference's weights, and ``mask_fn``/``block_mask`` by their block structure
(:mod:`jax_attn.kernels.cpu_flash_tiles`: empty tiles skipped, full ones unmasked, a bitmask
per partial tile evaluated in JAX). It declines a caller's own ``score_fn`` (``chunked``
serves it), float64, and CPUs without AVX2 and FMA.

XLA cannot split a custom call over devices by itself: the three calls go through
:mod:`jax_attn.kernels.partitioned` (``jax.experimental.custom_partitioning``), which
splits them over batch and heads under a plain ``jax.jit`` of sharded arrays and under
``jax.set_mesh``; inside ``jax.shard_map`` over every mesh axis each device runs its share.
It declines inside a ``shard_map`` over some axes while XLA partitions others, and a
``bias`` where XLA partitions a mesh axis (the bias gradient of a batch or head share is
a partial sum: the backward of a bias broadcast over batch or heads runs whole).

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
from jax_attn.kernels.contract import AttentionCall, KernelInputs
from jax_attn.kernels.flash_autodiff import FlashRules, flash_attention, zero_filling
from jax_attn.kernels.partitioned import partitioned_call
from jax_attn.mask_functions import soft_cap_then_alibi
from jax_attn.masks import as_4d, dropout_row_seeds, dropout_threshold

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
    "jax_attn_cpu_flash_non_finite": "JaxAttnFlashNonFinite",
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
    if call.has_bias and partitioned_axes():
        return (
            f"no bias where XLA partitions mesh axes ({', '.join(partitioned_axes())}): its "
            "gradient would sum over the split axes"
        )
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
        **_score_and_dropout_attributes(call),
    )


def _score_and_dropout_attributes(call: AttentionCall) -> dict:
    """The kernel's score options and dropout: off where the call has none."""
    rate = call.dropout_rate
    return dict(
        soft_cap=np.float32(call.logit_soft_cap or 0.0),
        alibi=bool(call.has_alibi_slopes),
        dropout=rate > 0.0,
        dropout_threshold=np.int64(dropout_threshold(rate)),
        dropout_scale=np.float32(1.0 / (1.0 - rate)),
    )


def _rows(q, row_seeds, slopes):
    """The kernel's ``[..., N]`` row seeds (uint32) and slopes (float32), zeros for the
    ones not given (the kernel reads them only where the call asks)."""
    *lead, _, N, _ = q.shape
    if row_seeds is None:
        row_seeds = jnp.zeros((*lead, N), jnp.uint32)
    if slopes is None:
        slopes = jnp.zeros((*lead, N), jnp.float32)
    return row_seeds, slopes


# The shape of the empty mask or bias operand that stands for none.
_NO_DENSE = (1, 1, 1, 0)


def _dense(mask, bias):
    """The kernel's mask and bias operands: bool and float32 ``[..., N|1, T|1, S|1]`` as
    given (leading axes 1 or q's), or empty where ``None``."""
    mask = jnp.zeros(_NO_DENSE, jnp.bool_) if mask is None else mask.astype(jnp.bool_)
    bias = jnp.zeros(_NO_DENSE, jnp.float32) if bias is None else bias.astype(jnp.float32)
    return mask, bias


def _tiles(call: AttentionCall, tiles):
    """The kernel's tile table and bitmasks (:func:`cpu_flash_tiles.tile_table`) and their
    partitioning roles; empty operands (no block sparsity) where ``tiles`` is ``None``."""
    if tiles is None:
        empty = (jnp.zeros(_NO_DENSE, jnp.int32), jnp.zeros(_NO_DENSE, jnp.uint32))
        return empty, ("dense", "dense")
    table, bitmasks = tiles
    return tiles, ("tiles" if table.shape[-3] == call.N else "tiles_shared", "tile_bits")


def forward(
    call: AttentionCall,
    q,
    k,
    v,
    q_lengths,
    kv_lengths,
    row_seeds=None,
    slopes=None,
    mask=None,
    bias=None,
    tiles=None,
):
    """The kernel's forward: q ``[..., T, N, H]``, k ``[..., S, K, H]``, v ``[..., S, K, H_v]``
    float32, lengths int32 ``[...]`` -> (out ``[..., T, N, H_v]``, lse ``[..., N, T]``) float32.
    ``lse`` is each row's log-sum-exp of its scaled logits (about -2.4e38 for a row with
    nothing to attend, whose ``out`` is zeros; a key masked by ``mask`` or by a bias of -inf
    is not attended). With ``call.dropout_rate > 0``, ``row_seeds`` uint32 ``[..., N]``
    (:func:`jax_attn.masks.dropout_row_seeds`); with ``call.has_alibi_slopes``, ``slopes``
    float32 ``[..., N]``; optionally ``mask`` (bool) and ``bias`` (float32)
    ``[..., N|1, T|1, S|1]`` with q's rank; ``tiles``: a ``mask_fn``'s ``(table, bitmasks)``
    (:func:`jax_attn.kernels.cpu_flash_tiles.tile_table`). A plain function: no derivative
    rule."""
    row_seeds, slopes = _rows(q, row_seeds, slopes)
    mask, bias = _dense(mask, bias)
    tiles, tile_roles = _tiles(call, tiles)
    operands = (q, k, v, q_lengths, kv_lengths, row_seeds, slopes, mask, bias, *tiles)
    out, lse = partitioned_call(
        _ffi_forward,
        call,
        operands,
        ("q", "kv", "kv", "lengths", "lengths", "heads", "heads", "dense", "dense", *tile_roles),
        ("q", "lse"),
    )
    return varying_like(out, *operands), varying_like(lse, q, k, v, *operands[5:])


def _ffi_forward(call: AttentionCall, *operands):
    """The compiled forward on :func:`forward`'s operands (q, k, v, q_lengths, kv_lengths,
    row_seeds, slopes, mask, bias, table, bitmasks)."""
    *lead, T, N, _ = operands[0].shape
    out_types = (
        jax.ShapeDtypeStruct((*lead, T, N, call.H_v), jnp.float32),
        # [..., N, T] log-sum-exp of each row's scaled logits
        jax.ShapeDtypeStruct((*lead, N, T), jnp.float32),
    )
    forward = jax.ffi.ffi_call("jax_attn_cpu_flash_forward", out_types, vmap_method="broadcast_all")
    return forward(*operands, **_attributes(call))


_forward = forward


def finds_non_finite(call: AttentionCall, q, k, v, kv_lengths):
    """bool ``[]``: whether q, or a key or value the kernel may read, holds a NaN or Inf
    (the NaN policy's check, ``validation.nan_policy_attention``, for this kernel); ``None``
    where its custom call would not run whole on its inputs (:func:`_unsplit`), and the
    policy's own sums check instead.

    One compiled pass that reads q and, per sequence, its keys and values below its
    length rounded up to a 64-key tile: the forward and tangent read no others, and the
    backward computes with no others (its gradients there are zeros), so a NaN left in a
    KV cache's unfilled slots changes nothing and is not looked for. XLA's three sums
    read every element, at about 1 ns an element on this machine's CPU
    (docs/performance.md)."""
    if not _unsplit():
        return None
    reason = _load()
    if reason is not None:
        raise ValueError(f"cpu_flash: {reason}")
    if kv_lengths is None or call.has_mask_fn or call.has_block_mask:
        # a mask_fn's call may fall back to chunked, which reads every key
        kv_lengths = jnp.full(q.shape[:-3], call.S, jnp.int32)
    # a flag, not a function of the values to differentiate
    q, k, v = (jax.lax.stop_gradient(x).astype(jnp.float32) for x in (q, k, v))
    operands = (q, k, v, jnp.asarray(kv_lengths).astype(jnp.int32))
    found = jax.ffi.ffi_call(
        "jax_attn_cpu_flash_non_finite",
        jax.ShapeDtypeStruct((), jnp.bool_),
        vmap_method="broadcast_all",
    )
    return varying_like(found(*operands), *operands)


def _unsplit() -> bool:
    """Whether a custom call traced now runs whole on its inputs: in a process of one
    device, or inside ``jax.shard_map`` over every mesh axis (a plain ``jit`` of sharded
    arrays would gather them for it; the kernel's own calls are partitioned instead)."""
    if jax.sharding.get_abstract_mesh().empty:
        return jax.device_count() == 1
    return not partitioned_axes()


def tangent(
    call: AttentionCall,
    q,
    k,
    v,
    q_lengths,
    kv_lengths,
    out,
    lse,
    dq,
    dk,
    dv,
    row_seeds=None,
    slopes=None,
    mask=None,
    bias=None,
    d_bias=None,
    tiles=None,
):
    """The forward-mode derivative (JVP) of :func:`forward`'s (out, lse) at (q, k, v[, bias])
    in the direction (dq, dk, dv[, d_bias]) (shaped and typed as q, k, v, bias), given that
    point's ``out`` and ``lse`` -> (d_out ``[..., T, N, H_v]``, d_lse ``[..., N, T]``)
    float32. ``d_bias`` enters ``ds`` below as it is.

    Per row i over the keys j it attends, with s = scale q_i.k_j and P_ij = exp(s_ij - lse_i):
    ds_ij = scale (dq_i.k_j + q_i.dk_j), mu_i = sum_j P_ij ds_ij,
    d_out_i = sum_j P_ij (ds_ij v_j + dv_j) - mu_i out_i and d_lse_i = mu_i (zeros for a row
    with nothing to attend). ``row_seeds``, ``slopes``, ``mask`` and ``bias`` as for
    :func:`forward` (with dropout, P_ij in the sums over v and dv is the dropped, rescaled
    weight; mu's is not)."""
    row_seeds, slopes = _rows(q, row_seeds, slopes)
    mask, bias = _dense(mask, bias)
    d_bias = _dense(None, d_bias)[1]
    tiles, tile_roles = _tiles(call, tiles)
    extra = (row_seeds, slopes, mask, bias, d_bias, *tiles)
    d_out, d_lse = partitioned_call(
        _ffi_tangent,
        call,
        (q, k, v, q_lengths, kv_lengths, out, lse, dq, dk, dv, *extra),
        ("q", "kv", "kv", "lengths", "lengths", "q", "lse", "q", "kv", "kv")
        + ("heads", "heads", "dense", "dense", "dense", *tile_roles),
        ("q", "lse"),
    )
    varying = (q, k, v, q_lengths, kv_lengths, dq, dk, dv, *extra)
    return varying_like(d_out, *varying), varying_like(d_lse, *varying)


def _ffi_tangent(call: AttentionCall, *operands):
    """The compiled tangent on :func:`tangent`'s operands (q, k, v, q_lengths, kv_lengths,
    out, lse, dq, dk, dv, row_seeds, slopes, mask, bias, d_bias, table, bitmasks)."""
    out, lse = operands[5:7]
    out_types = (
        jax.ShapeDtypeStruct(out.shape, jnp.float32),
        jax.ShapeDtypeStruct(lse.shape, jnp.float32),
    )
    call_tangent = jax.ffi.ffi_call(
        "jax_attn_cpu_flash_tangent", out_types, vmap_method="broadcast_all"
    )
    return call_tangent(*operands, **_attributes(call))


def backward(
    call: AttentionCall,
    q,
    k,
    v,
    q_lengths,
    kv_lengths,
    out,
    lse,
    d_out,
    d_lse,
    row_seeds=None,
    slopes=None,
    mask=None,
    bias=None,
    tiles=None,
):
    """The reverse-mode derivative (VJP) of :func:`forward`'s (out, lse): given that
    point's ``out`` and ``lse`` and the cotangents ``d_out`` (as out) and ``d_lse`` (as lse)
    -> (dq, dk, dv) float32, shaped as q, k, v, and dbias (shaped as ``bias``: dS summed
    over its broadcast axes) where a bias came. FlashAttention-2's backward with
    dS_ij = P_ij (dP_ij - (D_i - d_lse_i)), D_i = d_out_i . out_i (with dropout factors f_ij:
    dP_ij times f_ij, dV from f_ij P_ij). The other arguments as for :func:`forward`."""
    d_out, d_lse = d_out.astype(jnp.float32), d_lse.astype(jnp.float32)
    has_bias = bias is not None
    # A share of the batch or heads gives a partial sum of a bias broadcast over them:
    # that backward runs whole (XLA gathers its operands), the rest splits.
    whole = has_bias and any(
        size == 1 < full
        for size, full in zip(bias.shape[:2], (q.shape[0], q.shape[2]), strict=True)
    )
    row_seeds, slopes = _rows(q, row_seeds, slopes)
    mask, bias = _dense(mask, bias)
    tiles, tile_roles = _tiles(call, tiles)
    extra = (row_seeds, slopes, mask, bias, *tiles)
    operands = (q, k, v, q_lengths, kv_lengths, out, lse, d_out, d_lse, *extra)
    if whole:
        grads = _ffi_backward(call, *operands)
    else:
        grads = partitioned_call(
            _ffi_backward,
            call,
            operands,
            ("q", "kv", "kv", "lengths", "lengths", "q", "lse", "q", "lse")
            + ("heads", "heads", "dense", "dense", *tile_roles),
            ("q", "kv", "kv", "dense"),
        )
    grads = tuple(varying_like(g, q, k, v, d_out, d_lse, *extra) for g in grads)
    return grads if has_bias else grads[:3]


def _ffi_backward(call: AttentionCall, *operands):
    """The compiled backward on :func:`backward`'s operands (q, k, v, q_lengths, kv_lengths,
    out, lse, d_out, d_lse, row_seeds, slopes, mask, bias, table, bitmasks): (dq, dk, dv,
    dbias)."""
    q, k, v = operands[:3]
    bias = operands[12]
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v, bias))
    call_backward = jax.ffi.ffi_call(
        "jax_attn_cpu_flash_backward", out_types, vmap_method="broadcast_all"
    )
    return call_backward(*operands, **_attributes(call))


@functools.cache
def _rules(call: AttentionCall) -> FlashRules:
    """The kernel's maps for :mod:`jax_attn.kernels.flash_autodiff`: ``diff = (q, k, v[,
    bias])``, ``nondiff = (q_lengths, kv_lengths, rng, slopes, mask, tiles, non_finite)``
    (the dropout key, the ALiBi slopes ``[B, N]``, the boolean mask, a ``mask_fn``'s tile
    table and bitmasks, and the NaN policy's condition, each ``None`` where the call has
    none); forward, tangent and backward compiled, the pure maps (differentiated only at
    second order) those of ``chunked`` on the same masks (the ``mask_fn`` the tiles
    encode), dropout and score options.

    Where ``non_finite`` (a traced bool) holds, every map runs as on ``diff`` with its NaN
    and Inf zero-filled, and the derivatives are 0 at those entries (the NaN policy inside
    the maps: :func:`jax_attn.kernels.flash_autodiff.zero_filling`)."""
    plan = chunked.position_plan(call.T, call.S, call.is_causal, call.window, call.scale, True)
    if call.dropout_rate > 0.0 or call.logit_soft_cap is not None or call.has_alibi_slopes:
        plan = dataclasses.replace(
            plan,
            dropout_rate=call.dropout_rate,
            score_fn=_options_score_fn(call.logit_soft_cap, call.has_alibi_slopes, call.S - call.T),
        )
    if call.has_mask_fn or call.has_block_mask:
        plan = dataclasses.replace(plan, mask_fn=cpu_flash_tiles.table_mask_fn)

    def extra(diff, nondiff):
        """The compiled maps' keywords: row seeds from the dropout key, slopes, mask, bias,
        tiles."""
        rng, slopes, mask, tiles = nondiff[2:6]
        B, _, N, _ = diff[0].shape
        row_seeds = None if rng is None else dropout_row_seeds(rng, B, N)
        return dict(row_seeds=row_seeds, slopes=slopes, mask=mask, bias=_bias(diff), tiles=tiles)

    def forward_(diff, nondiff):
        return forward(call, *diff[:3], *nondiff[:2], **extra(diff, nondiff))

    def tangent_(diff, nondiff, out, lse, d_diff):
        return tangent(
            call,
            *diff[:3],
            *nondiff[:2],
            out,
            lse,
            *d_diff[:3],
            **extra(diff, nondiff),
            d_bias=_bias(d_diff),
        )

    def backward_(diff, nondiff, out, lse, d_out, d_lse):
        if d_lse is None:
            d_lse = jnp.zeros(lse.shape, jnp.float32)
        grads = backward(
            call, *diff[:3], *nondiff[:2], out, lse, d_out, d_lse, **extra(diff, nondiff)
        )
        return tuple(cotangent_like(g, x) for g, x in zip(grads, diff, strict=True))

    def pure(fn):
        def with_options(diff, nondiff, *args):
            q_lengths, kv_lengths, rng, slopes, mask, tiles, _ = nondiff
            consts = () if slopes is None else (slopes,)
            positions = (q_lengths, kv_lengths) if mask is None else (q_lengths, kv_lengths, mask)
            mask_consts = () if tiles is None else tuple(tiles)
            return fn(
                plan,
                diff,
                positions,
                *args,
                rng=rng,
                score_consts=consts,
                mask_consts=mask_consts,
            )

        return with_options

    rules = FlashRules(
        forward=forward_,
        tangent=tangent_,
        backward=backward_,
        tangent_pure=pure(chunked.position_tangent),
        backward_pure=pure(chunked.position_backward),
    )
    # the condition may come from finds_non_finite, which skips keys the compiled maps never
    # read but chunked's pure maps do
    return zero_filling(rules, non_finite_at=6, pure_check_all=True)


@functools.cache
def _options_score_fn(cap: float | None, alibi: bool, shift: int):
    """The score options as a closure-converted ``score_fn(score, b, h, q_idx, kv_idx,
    *slopes)`` for ``chunked``'s pure maps, as :func:`jax_attn.mask_functions.score_options`
    (``shift = S - T``; ``slopes [B, N]`` given where ``alibi``)."""

    def score_fn(score, b, h, q_idx, kv_idx, *slopes):
        slope = slopes[0][b, h] if alibi else None
        return soft_cap_then_alibi(score, cap, slope, q_idx, kv_idx, shift)

    return score_fn


def _bias(diff):
    return diff[3] if len(diff) > 3 else None


def _flash(
    call: AttentionCall,
    q,
    k,
    v,
    q_lengths,
    kv_lengths,
    rng=None,
    slopes=None,
    mask=None,
    bias=None,
    tiles=None,
    non_finite=None,
):
    diff = (q, k, v) if bias is None else (q, k, v, bias)
    nondiff = (q_lengths, kv_lengths, rng, slopes, mask, tiles, non_finite)
    return flash_attention(_rules(call), diff, nondiff)[0]


def cpu_flash_attention(q, k, v, *, call: AttentionCall, inputs: KernelInputs, non_finite=None):
    """q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, H_v]`` ->
    ``[B, T, N, H_v]`` in q's dtype through the compiled kernel (in float32, half precision
    widened and the output rounded once); of ``inputs`` the lengths, ``mask`` and ``bias``
    (as given, 4-d), the dropout key, the ALiBi slopes and ``mask_fn`` / ``block_mask`` by
    their tiles (the rest is declined by ``_cpu_flash_unsupported``; the ``score_fn`` it
    gets is only those options, served natively). ``non_finite``: the NaN policy's traced
    condition (``validation.nan_policy_attention``), under which the kernel runs on the
    inputs with their NaN and Inf zero-filled, or ``None``."""
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
    rng = inputs.dropout_rng if call.dropout_rate > 0.0 else None
    slopes = None
    if call.has_alibi_slopes:
        # constants: the kernel takes no derivative for them (stop_gradient says so)
        given = jax.lax.stop_gradient(jnp.asarray(inputs.alibi_slopes))
        slopes = jnp.broadcast_to(given.astype(jnp.float32), (call.B, call.N))
    mask = None if inputs.mask is None else as_4d(inputs.mask)
    bias = None if inputs.bias is None else as_4d(inputs.bias).astype(jnp.float32)
    args = (q_lengths, kv_lengths, rng, slopes, mask, bias)
    if inputs.mask_fn is None or call.T == 0 or call.S == 0:
        return _flash(call, q, k, v, *args, non_finite=non_finite).astype(call.dtype)
    table, bitmasks, fits = cpu_flash_tiles.tiles(call, inputs)

    def sparse(q, k, v):
        return _flash(call, q, k, v, *args, tiles=(table, bitmasks), non_finite=non_finite)

    # More partial tiles than a traced table holds: the rare path, rematerialised under
    # differentiation so that the cond keeps no residuals of its own.
    @jax.checkpoint
    def chunked_instead(q, k, v):
        return chunked.chunked_attention(q, k, v, call=call, inputs=inputs, non_finite=non_finite)

    if fits is None:
        return sparse(q, k, v).astype(call.dtype)
    return jax.lax.cond(fits, sparse, chunked_instead, q, k, v).astype(call.dtype)


# nan_policy_attention passes its traced condition as `non_finite` (see _rules)
cpu_flash_attention.takes_non_finite = True  # type: ignore[attr-defined]
cpu_flash_attention.finds_non_finite = finds_non_finite  # type: ignore[attr-defined]

IMPLEMENTATION = Implementation(
    name="cpu_flash",
    fn=cpu_flash_attention,
    unsupported=_cpu_flash_unsupported,
    platforms=("cpu",),
    description="fused flash attention in C++ (AVX2/FMA) through XLA's FFI, float32",
    score_options=True,
    functions=frozenset({"mask_fn", "block_mask"}),
)
