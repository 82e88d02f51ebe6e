"""The oracle: einsum -> mask -> softmax -> dropout -> einsum, nothing clever.

Every implementation, module and sharded path is tested against
:func:`dot_product_attention` here. It materialises the full ``[B, N, T, S]`` logits,
works in any floating dtype (float64 included; float32 at least inside), and defines
the library's semantics:

* masks are boolean, True = may attend; ``-inf`` in ``bias`` also counts as masked;
* causal and window masks are bottom-right aligned (query ``t`` sits at key position
  ``t + S - T``);
* a query row with nothing to attend gives zero weights and a zero output;
* dropout drops weights with ``masks.make_dropout_mask`` and scales the kept ones;
* ``score_fn`` rewrites the scaled logits before ``bias`` is added; ``mask_fn`` is one
  more mask, evaluated on the full grid here (a ``block_mask`` changes nothing here).

:func:`dot_product_attention` has the signature of
:func:`jax_attn.dispatch.dot_product_attention` and shares its argument handling
(:func:`jax_attn.validation.attention_entry`); :func:`reference_attention` is the core
that runs on an already validated call.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_attn.mask_functions import evaluate_mask, evaluate_score
from jax_attn.masks import as_4d, build_attention_mask, make_dropout_mask
from jax_attn.validation import AttentionCall, KernelInputs, attention_entry

__all__ = ["call_mask", "dot_product_attention", "reference_attention"]


def call_mask(call: AttentionCall, mask=None, query_seq_lengths=None, key_value_seq_lengths=None):
    """Everything ``call`` masks (mask, causal, window, lengths) ANDed: bool broadcastable
    to ``[B, N, T, S]``, True = may attend, or ``None`` when nothing masks."""
    return build_attention_mask(
        call.T,
        call.S,
        mask=mask,
        is_causal=call.is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=call.window,
    )


def reference_attention(q, k, v, *, call: AttentionCall, inputs: KernelInputs):
    """The oracle on batched q ``[B, T, N, H]``, k, v ``[B, S, K, H(_v)]`` for an
    already validated ``call`` -> ``[B, T, N, H_v]`` in ``call.dtype`` (``inputs.block_mask``
    plans block skipping and changes nothing here)."""
    B, T, N, H, S, K, G = call.B, call.T, call.N, call.H, call.S, call.K, call.G
    compute = call.compute_dtype
    q, k, v = q.astype(compute), k.astype(compute), v.astype(compute)

    # [B, K, G, T, S]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(B, T, K, G, H), k)
    logits = logits.reshape(B, N, T, S) * jnp.asarray(call.scale, compute)
    q_idx, kv_idx = jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32)
    if inputs.score_fn is not None:
        logits = evaluate_score(inputs.score_fn, logits, q_idx, kv_idx)
    if inputs.bias is not None:
        logits = logits + as_4d(jnp.asarray(inputs.bias).astype(compute))
    allowed = call_mask(call, inputs.mask, inputs.query_seq_lengths, inputs.key_value_seq_lengths)
    if inputs.mask_fn is not None:
        by_fn = evaluate_mask(inputs.mask_fn, B, N, q_idx, kv_idx)
        allowed = by_fn if allowed is None else allowed & by_fn
    allowed = logits > -jnp.inf if allowed is None else allowed & (logits > -jnp.inf)
    masked_logits = jnp.where(allowed, logits, -0.7 * jnp.finfo(compute).max)
    weights = jnp.where(allowed, jax.nn.softmax(masked_logits, axis=-1), 0.0)
    if call.dropout_rate > 0.0:
        keep = make_dropout_mask(inputs.dropout_rng, call.dropout_rate, (B, N, T, S))
        weights = jnp.where(keep, weights / (1.0 - call.dropout_rate), 0.0)

    # [B, T, K, G, H_v]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", weights.reshape(B, K, G, T, S), v)
    return out.reshape(B, T, N, call.H_v).astype(call.dtype)


def _reference_only(call: AttentionCall, implementation) -> Callable:
    if implementation not in (None, "reference"):
        raise ValueError(
            f"reference.dot_product_attention: implementation must be None or 'reference', "
            f"got {implementation!r}"
        )
    return reference_attention


dot_product_attention = attention_entry(
    _reference_only,
    __name__,
    """Reference attention. q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, H_v]``
    (or unbatched without ``B``) -> ``[B, T, N, H_v]`` in q's dtype.

    The arguments are those of :func:`jax_attn.dispatch.dot_product_attention`;
    ``implementation`` must be None or ``"reference"``.

    >>> import jax.numpy as jnp
    >>> q = k = v = jnp.ones((1, 2, 1, 4))                 # [B, T, N, H]
    >>> mask = jnp.array([[True, True], [False, False]])   # query 1 may attend nothing
    >>> dot_product_attention(q, k, v, mask=mask)[0, :, 0, 0].tolist()
    [1.0, 0.0]
    """,
)
