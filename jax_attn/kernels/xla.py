"""``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` with this library's
semantics (bottom-right causal alignment, zero output for an empty row).

It materialises the ``[B, N, T, S]`` logits; fast for short sequences and decoding. A
``mask_fn`` is materialised beside them as one more mask; ``score_fn`` and
``block_mask`` it declines (``jax.nn`` takes no score function, and it visits every
block anyway).
The same adapter serves ``"cudnn"`` (:mod:`jax_attn.kernels.cudnn`).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jax_attn.kernels.contract import AttentionCall, Implementation, KernelInputs
from jax_attn.mask_functions import evaluate_mask
from jax_attn.masks import as_4d, build_attention_mask, call_mask


def _xla_unsupported(call: AttentionCall, platform: str) -> str | None:
    if call.dropout_rate > 0.0:
        return "no dropout (jax.nn.dot_product_attention has none)"
    if call.H_v != call.H:
        return f"needs value head dim equal to H={call.H}, got {call.H_v}"
    if call.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {call.dtype} (float32, bfloat16 and float16 only)"
    return None


def jax_nn_attention(
    q, k, v, *, call: AttentionCall, inputs: KernelInputs, implementation: Literal["xla", "cudnn"]
):
    """``jax.nn.dot_product_attention(implementation=...)`` ("xla" or "cudnn") as a kernel
    with this library's semantics (dropout is declined beforehand)."""
    T, S = call.T, call.S
    mask, bias = inputs.mask, inputs.bias
    if inputs.mask_fn is not None:
        index = (jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32))
        by_fn = evaluate_mask(inputs.mask_fn, call.B, call.N, *index)
        mask = by_fn if mask is None else as_4d(mask) & by_fn
    # jax.nn aligns causal and window masks top-left; ours are bottom-right. They agree
    # when T == S; otherwise the masks go in explicitly. cuDNN takes a left window only,
    # and only with the causal mask (which makes the right side irrelevant).
    native = T == S
    native_window = call.window
    if implementation == "cudnn" and call.window is not None:
        native_window = (call.window[0], 0) if call.is_causal else None
    native_window_ok = call.window is None or native_window is not None
    if bias is not None:
        bias = jnp.asarray(bias)
        finite = bias > -jnp.inf
        # float32 at least: a finite bias such as -1e9 must not round to -inf in float16.
        bias = jnp.where(finite, bias, 0.0).astype(call.compute_dtype)
        mask = finite if mask is None else as_4d(mask) & as_4d(finite)
    explicit_window = call.window is not None and not (native and native_window_ok)
    if (not native and call.is_causal) or explicit_window:
        mask = build_attention_mask(
            T,
            S,
            mask=mask,
            is_causal=call.is_causal and not native,
            local_window_size=call.window if explicit_window else None,
        )
    if implementation == "cudnn":
        mask, bias = cudnn_mask_and_bias(mask, bias, T, S, q.dtype)
    q_lengths, kv_lengths = (
        None if x is None else jnp.asarray(x, jnp.int32)
        for x in (inputs.query_seq_lengths, inputs.key_value_seq_lengths)
    )
    # jax.nn mixes half precision with its float32 logits implicitly: allowed here even
    # when the caller runs with jax_numpy_dtype_promotion="strict".
    with jax.numpy_dtype_promotion("standard"):
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            bias=None if bias is None else as_4d(bias),
            mask=None if mask is None else as_4d(mask),
            scale=call.scale,
            is_causal=call.is_causal and native,
            local_window_size=None if explicit_window else native_window,
            implementation=implementation,
            query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths,
        )
    # jax.nn spreads a fully masked row uniformly; ours is zero.
    can_empty = mask is not None or q_lengths is not None or kv_lengths is not None or T > S
    if can_empty:
        allowed = call_mask(call, mask, inputs.query_seq_lengths, inputs.key_value_seq_lengths)
        if allowed is None:  # T > S, nothing masks: a row is empty only when S == 0
            allowed = jnp.ones((1, 1, T, S), bool)
        # [B, N, T] -> [B, T, N, 1]
        row_has_keys = jnp.any(allowed, axis=-1)
        row_has_keys = jnp.broadcast_to(row_has_keys, (call.B, call.N, T))
        out = jnp.where(jnp.transpose(row_has_keys, (0, 2, 1))[..., None], out, 0)
    return out


def _half_as_float32(dtype) -> bool:
    """Whether half-precision inputs go to jax.nn as float32 (same float32 logits).

    On CPU: jax.nn asks dot_general for F16_F16_F32 precision, which XLA:CPU cannot
    compile under jax.jit (and it has no faster half matmul). Under strict dtype
    promotion: jax.nn's backward pass mixes the half inputs with its float32 logits.
    """
    half = dtype in (jnp.bfloat16, jnp.float16)
    # a flag with a context manager: read as an attribute, which jax's stubs do not declare
    strict = jax.config.jax_numpy_dtype_promotion == "strict"  # type: ignore[attr-defined]
    return half and (jax.default_backend() == "cpu" or strict)


def xla_attention(q, k, v, *, call: AttentionCall, inputs: KernelInputs):
    if _half_as_float32(q.dtype):
        wide = (x.astype(jnp.float32) for x in (q, k, v))
        out = jax_nn_attention(*wide, call=call, inputs=inputs, implementation="xla")
        return out.astype(q.dtype)
    return jax_nn_attention(q, k, v, call=call, inputs=inputs, implementation="xla")


IMPLEMENTATION = Implementation(
    name="xla",
    fn=xla_attention,
    unsupported=_xla_unsupported,
    description="jax.nn.dot_product_attention(implementation='xla')",
    functions=frozenset({"mask_fn"}),
)


def cudnn_mask_and_bias(mask, bias, T, S, dtype):
    """cuDNN takes a mask or bias with full ``T`` and ``S`` dims, in the input dtype."""
    if bias is not None:
        limit = float(jnp.finfo(dtype).max)
        bias = as_4d(jnp.clip(bias, -limit, limit).astype(dtype))
        bias = jnp.broadcast_to(bias, (*bias.shape[:2], T, S))
    if mask is not None:
        mask = as_4d(mask)
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], T, S))
    return mask, bias
