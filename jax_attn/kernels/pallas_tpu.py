"""``"pallas_tpu"``: JAX's splash attention (Pallas, TPU) with this library's semantics.

The kernels are ``jax.experimental.pallas.ops.tpu.splash_attention``'s
``make_splash_mha`` (``K > 1``: MHA and GQA) and ``make_splash_mqa`` (``K == 1``),
forward and their ``custom_vjp`` backward, vmapped over the batch:

* causal and local-window masks are splash's ``CausalMask``/``LocalMask`` with offset
  ``S - T`` (bottom-right alignment); a causal window is ``LocalMask((left, 0))``;
* ``T`` and ``S`` are padded to multiples of 128; padded keys, and keys past
  ``key_value_seq_lengths``, are a key segment of their own (splash's ``SegmentIds``);
* rows past ``query_seq_lengths``, and rows with nothing to attend, are set to zero;
* the logit scale is applied to ``q`` (splash has none);
* float32 and bfloat16; masks, bias and dropout are declined.

TPU only, or anywhere in interpret mode with ``JAX_ATTN_PALLAS_INTERPRET=1`` (see
:mod:`jax_attn.kernels.pallas_gpu`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.kernels.contract import AttentionCall, KernelInputs
from jax_attn.kernels.pallas_gpu import (
    INTERPRET_ENV,
    interpret_requested,
    pallas_implementation,
    rows_with_keys,
    zero_empty_rows,
)

__all__ = ["IMPLEMENTATION", "SEQUENCE_BLOCKS", "pallas_tpu_attention"]

# Sequences are padded to a multiple of 128 (the TPU lane width); the block is the largest
# of these that divides the padded length.
SEQUENCE_BLOCKS = (512, 256, 128)
_DTYPES = ("float32", "bfloat16")
_API = (
    "BlockSizes",
    "CausalMask",
    "FullMask",
    "LocalMask",
    "MultiHeadMask",
    "SegmentIds",
    "make_splash_mha",
    "make_splash_mqa",
)
_BLOCK_FIELDS = (
    "block_q",
    "block_kv",
    "block_kv_compute",
    "block_q_dkv",
    "block_kv_dkv",
    "block_kv_dkv_compute",
    "block_q_dq",
    "block_kv_dq",
)


@functools.cache
def _kernel_api():
    """``(splash module, None)``, or ``(None, reason)`` when this jax's splash attention
    lacks what this adapter calls."""
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention
    except Exception as error:  # noqa: BLE001 - any import failure means "not here"
        return None, f"cannot import jax.experimental.pallas.ops.tpu.splash_attention ({error})"
    missing = [name for name in _API if not hasattr(splash_attention, name)]
    if not missing:
        fields = {f.name for f in dataclasses.fields(splash_attention.BlockSizes)}
        missing = [f"BlockSizes.{name}" for name in _BLOCK_FIELDS if name not in fields]
    if missing:
        return None, f"this jax's splash attention (jax {jax.__version__}) lacks {missing}"
    return splash_attention, None


def _pallas_tpu_unsupported(call: AttentionCall, platform: str) -> str | None:
    if platform != "tpu" and not interpret_requested():
        return f"runs on TPUs only, not on {platform} (or set {INTERPRET_ENV}=1)"
    _, reason = _kernel_api()
    if reason is not None:
        return reason
    if call.dtype.name not in _DTYPES:
        return f"dtype {call.dtype} (float32 and bfloat16 only)"
    if call.T == 0 or call.S == 0:
        return f"empty sequences (T={call.T}, S={call.S})"
    if call.has_mask or call.has_bias:
        return "no mask or bias (splash takes static masks only)"
    if call.dropout_rate > 0.0:
        return f"no dropout (splash has none), got dropout_rate={call.dropout_rate}"
    return None


def _padded(L: int) -> tuple[int, int]:
    """``L`` padded to a multiple of 128, and the block size that divides it."""
    padded = -(-L // 128) * 128
    return padded, next(b for b in SEQUENCE_BLOCKS if padded % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(N, T_pad, S_pad, offset, is_causal, window, block_q, block_kv, mqa, interpret):
    splash, _ = _kernel_api()
    shape = (T_pad, S_pad)
    if window is not None:
        left, right = window
        mask = splash.LocalMask(shape, (left, 0 if is_causal else right), offset)
    elif is_causal:
        mask = splash.CausalMask(shape, offset)
    else:
        mask = splash.FullMask(shape)
    # Forward and backward tiles alike: block_q for the query fields, block_kv for the rest.
    sizes = splash.BlockSizes(
        **{name: block_q if name.startswith("block_q") else block_kv for name in _BLOCK_FIELDS}
    )
    make = splash.make_splash_mqa if mqa else splash.make_splash_mha
    # The kernel's block tables are built eagerly (not as tracers of the calling trace) and
    # kept as numpy: cached jax arrays would enter later traces as captured constants,
    # which ahead-of-time compiled calls (jit(...).lower().compile()) reject.
    with jax.ensure_compile_time_eval():
        kernel = make(
            splash.MultiHeadMask([mask] * N),
            block_sizes=sizes,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )
    return jax.tree.map(np.asarray, kernel)


def _pad_sequence(x, size: int):
    return jnp.pad(x, ((0, 0), (0, size - x.shape[1]), (0, 0), (0, 0)))


def pallas_tpu_attention(q, k, v, *, call: AttentionCall, inputs: KernelInputs):
    """q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, H_v]`` -> ``[B, T, N, H_v]``
    through splash attention (interpret mode off the TPU); of ``inputs`` only the lengths
    (the others are declined by ``_pallas_tpu_unsupported``)."""
    key_value_seq_lengths = inputs.key_value_seq_lengths
    splash, reason = _kernel_api()
    if reason is not None:
        raise ValueError(f"pallas_tpu: {reason}")
    B, T, S, N, K = call.B, call.T, call.S, call.N, call.K
    T_pad, block_q = _padded(T)
    S_pad, block_kv = _padded(S)
    kernel = _splash_kernel(
        N,
        T_pad,
        S_pad,
        S - T,
        call.is_causal,
        call.window,
        block_q,
        block_kv,
        K == 1,
        jax.default_backend() != "tpu",
    )
    scaled = (q.astype(jnp.float32) * call.scale).astype(q.dtype)
    # [B, T, N, H] -> [B, N, T_pad, H]; [B, S, K, H] -> [B, K, S_pad, H]
    q_heads = jnp.swapaxes(_pad_sequence(scaled, T_pad), 1, 2)
    k_heads, v_heads = (jnp.swapaxes(_pad_sequence(x, S_pad), 1, 2) for x in (k, v))
    if K == 1:
        k_heads, v_heads = k_heads[:, 0], v_heads[:, 0]
    segments = None
    if S_pad > S or key_value_seq_lengths is not None:
        limit = jnp.full((B, 1), S, jnp.int32)
        if key_value_seq_lengths is not None:
            limit = jnp.asarray(key_value_seq_lengths).astype(jnp.int32)[:, None]
        # [B, S_pad]: keys past the length are segment 1, which no query (segment 0) sees.
        kv_ids = (jnp.arange(S_pad, dtype=jnp.int32)[None] >= limit).astype(jnp.int32)
        segments = splash.SegmentIds(q=jnp.zeros((B, T_pad), jnp.int32), kv=kv_ids)
    if segments is None:
        out = jax.vmap(kernel)(q_heads, k_heads, v_heads)
    else:
        out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(
            q_heads, k_heads, v_heads, segments
        )
    # [B, N, T_pad, H_v] -> [B, T, N, H_v]
    out = jnp.swapaxes(out, 1, 2)[:, :T]
    has_keys = rows_with_keys(call, inputs.query_seq_lengths, key_value_seq_lengths)
    return zero_empty_rows(out, has_keys)


IMPLEMENTATION = pallas_implementation(
    "tpu",
    pallas_tpu_attention,
    _pallas_tpu_unsupported,
    "jax.experimental.pallas.ops.tpu.splash_attention: splash (flash) attention",
)
