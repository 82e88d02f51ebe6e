"""``"pallas_gpu_decode"``: JAX's Pallas (Triton) decoding kernel on NVIDIA GPUs, for one
query per sequence against a KV cache, with this library's semantics.

The kernel is ``jax.experimental.pallas.ops.gpu.decode_attention.gqa``: split-K
flash decoding (each of ``k_splits`` programs reduces its share of the keys to a
partial ``(out, max, sum)``; XLA combines them, as ``kernels.online_softmax`` does),
the ``G`` query heads of a key/value head read its keys once. It is called on
``q [B, N, H]`` and the cache ``k, v [B, S, K, H]`` as laid out, with no copy:

* ``T == 1`` (one new token): its query sits at key position ``S - 1`` (bottom-right),
  so the causal mask keeps every key; ``key_value_seq_lengths`` (the filled slots, as
  ``kv_cache.attend_cache`` passes them) end each sequence's keys and a left window
  ``w`` starts them at ``S - 1 - w``; a query length of 0 is a zero row;
* ``S`` is split into ``k_splits <= 16`` shares of a power of two of at least 16
  keys (Triton's block shapes), so ``S`` must be ``k_splits * 2^m``; ``H`` a power
  of two in ``[16, 256]`` and ``H_v == H``. Padding either would copy the cache on
  every step, so those calls are declined and the others serve them;
* masks, bias and dropout are declined (the kernel has none).

It has no reverse-mode rule of its own: derivatives come from ``chunked``'s maps
(:func:`jax_attn.kernels.composable.composable` with ``own_backward=False``).
``JAX_ATTN_PALLAS_INTERPRET=1`` runs it on any platform in Pallas interpret mode.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

from jax_attn.kernels.composable import composable
from jax_attn.kernels.contract import AttentionCall, Implementation, KernelInputs
from jax_attn.kernels.online_softmax import (
    MASKED_LOGIT,
    PartialAttention,
    combine_partials,
    finalize,
)
from jax_attn.kernels.pallas_gpu import (
    INTERPRET_ENV,
    interpret_requested,
    rows_with_keys,
    zero_empty_rows,
)

__all__ = ["IMPLEMENTATION", "MAX_SPLITS", "decode_attention", "key_splits"]

# At most this many programs share one (batch, kv head)'s keys (the kernel's default).
MAX_SPLITS = 16
# Keys per program step: the kernel's default for gqa, and at most the share's size.
BLOCK_K = 128
# Query heads per program (the kernel's default; fewer are masked loads).
BLOCK_H = 16
MIN_SHARE = 16
HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = ("float32", "bfloat16", "float16")
_FULL_FLOAT32 = ("highest", "float32", "f32_f32_f32", "tf32_tf32_f32_x3", "bf16_bf16_f32_x6")


@functools.cache
def _kernel_api():
    """``(decode_attention module, None)``, or ``(None, reason)`` where this jax lacks it."""
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention
    except Exception as error:  # noqa: BLE001 - any import failure means "not here"
        return None, f"cannot import jax.experimental.pallas.ops.gpu.decode_attention ({error})"
    wanted = {"sm_scale", "block_k", "block_h", "num_heads"}
    try:
        parameters = inspect.signature(decode_attention.attn_forward_kernel).parameters
        missing = sorted(wanted - set(parameters))
    except (AttributeError, TypeError, ValueError) as error:
        missing = [f"attn_forward_kernel ({error})"]
    if missing:
        return None, f"this jax's Pallas decode attention (jax {jax.__version__}) lacks {missing}"
    return decode_attention, None


def key_splits(S: int) -> int | None:
    """The most programs, at most :data:`MAX_SPLITS`, that split ``S`` keys into equal
    shares of a power of two >= 16 keys; ``None`` where no count does."""
    for splits in range(MAX_SPLITS, 0, -1):
        share, rest = divmod(S, splits)
        if not rest and share >= MIN_SHARE and share & (share - 1) == 0:
            return splits
    return None


def _unsupported(call: AttentionCall, platform: str) -> str | None:
    compiled = platform == "gpu"
    if not compiled and not interpret_requested():
        return f"runs on NVIDIA GPUs only, not on {platform} (or set {INTERPRET_ENV}=1)"
    if compiled and "nvidia" not in str(getattr(jax.devices()[0], "device_kind", "")).lower():
        return "needs an NVIDIA GPU (Triton)"
    _, reason = _kernel_api()
    if reason is not None:
        return reason
    if call.T != 1:
        return f"decodes one query per sequence (T == 1), got T={call.T}"
    if call.dtype.name not in _DTYPES:
        return f"dtype {call.dtype} (float32, bfloat16 and float16 only)"
    precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
    if compiled and call.dtype.name == "float32" and str(precision).lower() in _FULL_FLOAT32:
        return (
            f"float32 with jax_default_matmul_precision={precision!r}: the Triton kernel's "
            "matmuls use TF32"
        )
    if call.H not in HEAD_DIMS or call.H_v != call.H:
        return (
            f"head dims H == H_v in {list(HEAD_DIMS)} (padding would copy the cache on every "
            f"step), got H={call.H}, H_v={call.H_v}"
        )
    if key_splits(call.S) is None:
        return (
            f"S must split into at most {MAX_SPLITS} equal shares of a power of two >= "
            f"{MIN_SHARE} keys (e.g. 1024, 768, 4096), got S={call.S}"
        )
    if call.has_mask or call.has_bias:
        return "no mask or bias (the kernel has neither; the KV cache passes key lengths)"
    if call.dropout_rate > 0.0:
        return f"no dropout (the kernel has none), got dropout_rate={call.dropout_rate}"
    return None


def _split_partials(kernel, q, k, v, start, kv_length, *, scale, splits, interpret):
    """One (batch, kv head): q ``[G, H]``, k, v ``[S, H]`` -> each key share's partial
    ``(acc [splits, G, H], row_sum [splits, G], row_max [splits, G])`` in float32, from
    JAX's kernel body (``attn_forward_kernel``) in a ``pallas_call`` of our own that
    keeps the partial outputs in float32: the kernel's ``mqa``/``gqa`` store them in the
    input dtype and combine them there, which for bfloat16 costs several ulps more than
    the reference's one rounding."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    G, H = q.shape
    share = k.shape[0] // splits
    body = functools.partial(
        kernel.attn_forward_kernel,
        sm_scale=scale,
        block_k=min(BLOCK_K, share),
        block_h=BLOCK_H,
        num_heads=G,
    )
    scalar = pl.BlockSpec((), lambda i, j: ())
    call = pl.pallas_call(
        body,
        grid=(pl.cdiv(G, BLOCK_H), splits),
        in_specs=[
            pl.BlockSpec((BLOCK_H, H), lambda i, j: (i, 0)),
            pl.BlockSpec((None, share, H), lambda i, j: (j, 0, 0)),
            pl.BlockSpec((None, share, H), lambda i, j: (j, 0, 0)),
            None if start is None else scalar,
            None if kv_length is None else scalar,
        ],
        out_specs=[
            pl.BlockSpec((None, BLOCK_H, H), lambda i, j: (j, i, 0)),
            pl.BlockSpec((None, BLOCK_H), lambda i, j: (j, i)),
            pl.BlockSpec((None, BLOCK_H), lambda i, j: (j, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, G, H), jnp.float32),
            jax.ShapeDtypeStruct((splits, G), jnp.float32),
            jax.ShapeDtypeStruct((splits, G), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="jax_attn_decode",
    )
    # The kernel body multiplies a bool mask by a float: under a caller's strict dtype
    # promotion it is traced with the standard one (JAX's code, not the caller's).
    with jax.numpy_dtype_promotion("standard"):
        return call(q, k.reshape(splits, share, H), v.reshape(splits, share, H), start, kv_length)


def decode_attention(q, k, v, *, call: AttentionCall, inputs: KernelInputs):
    """q ``[B, 1, N, H]``, k, v ``[B, S, K, H]`` -> ``[B, 1, N, H]`` through the Pallas
    decoding kernel (interpret mode off the GPU); of ``inputs`` the key and query lengths
    (the others are declined by ``_unsupported``). The key shares' partials combine by
    :func:`~jax_attn.kernels.online_softmax.combine_partials`."""
    kernel, reason = _kernel_api()
    if reason is not None:
        raise ValueError(f"pallas_gpu_decode: {reason}")
    B, S, K, G = call.B, call.S, call.K, call.G
    splits = key_splits(S)
    assert splits is not None  # _unsupported declines the others
    lengths = inputs.key_value_seq_lengths
    kv_lengths = None
    if lengths is not None:
        # [B, K]: the kernel reads one length per program
        kv_lengths = jnp.broadcast_to(jnp.asarray(lengths).astype(jnp.int32)[:, None], (B, K))
    start = None
    if call.window is not None and S - 1 - call.window[0] > 0:
        # the query's position is S - 1: a left window w starts its keys at S - 1 - w
        start = jnp.full((B, K), S - 1 - call.window[0], jnp.int32)
    one_pair = functools.partial(
        _split_partials,
        kernel,
        scale=call.scale,
        splits=splits,
        interpret=jax.default_backend() != "gpu",
    )
    # [B, K, G, H] queries; [B, K, S, H] keys and values
    queries = q[:, 0].reshape(B, K, G, call.H)
    keys, values = (jnp.swapaxes(x, 1, 2) for x in (k, v))
    # [B, K, splits, G, H], [B, K, splits, G] twice
    acc, row_sum, row_max = jax.vmap(jax.vmap(one_pair))(queries, keys, values, start, kv_lengths)
    # the kernel leaves an empty share at finfo.min, below MASKED_LOGIT: clamp for finalize
    row_max = jnp.maximum(row_max, MASKED_LOGIT)
    shares = [
        # [B, K, G, 1, H] and [B, K, G, 1]: the online softmax's layout with T = 1
        PartialAttention(
            acc[:, :, i, :, None], row_max[:, :, i, :, None], row_sum[:, :, i, :, None]
        )
        for i in range(splits)
    ]
    out, _ = finalize(functools.reduce(combine_partials, shares))
    # [B, K, G, 1, H] -> [B, 1, N, H]
    out = jnp.moveaxis(out, 3, 1).reshape(B, 1, call.N, call.H).astype(call.dtype)
    return zero_empty_rows(out, rows_with_keys(call, inputs.query_seq_lengths, lengths))


IMPLEMENTATION = Implementation(
    name="pallas_gpu_decode",
    fn=composable(decode_attention, own_backward=False),
    unsupported=_unsupported,
    platforms=("gpu",),
    runs_anywhere=interpret_requested,
    description="jax.experimental.pallas.ops.gpu.decode_attention.gqa: split-K decoding",
    half_products=True,
)
