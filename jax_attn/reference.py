"""The oracle: einsum -> mask -> softmax -> dropout -> einsum, nothing clever.

Every implementation, module and sharded path is tested against
:func:`dot_product_attention` here. It materialises the full ``[B, N, T, S]`` logits,
works in any floating dtype (float64 included; float32 at least inside), and defines
the library's semantics:

* masks are boolean, True = may attend; ``-inf`` in ``bias`` also counts as masked;
* causal and window masks are bottom-right aligned (query ``t`` sits at key position
  ``t + S - T``);
* a query row with nothing to attend gives zero weights and a zero output;
* dropout drops weights with ``masks.make_dropout_mask`` and scales the kept ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jax_attn.masks import build_attention_mask, make_dropout_mask
from jax_attn.validation import AttentionCall, batched_inputs, check_attention_args

if TYPE_CHECKING:  # shape annotations only; see jax_attn.shapes
    from jax_attn.shapes import Array, Float, Keys, Lengths, Mask, Outputs, PRNGKey, Queries, Values

__all__ = ["dot_product_attention", "reference_attention"]


def dot_product_attention(
    query: Queries,
    key: Keys,
    value: Values,
    *,
    mask: Mask | None = None,
    bias: Float[Array, "*bias"] | None = None,
    is_causal=False,
    scale=None,
    query_seq_lengths: Lengths | None = None,
    key_value_seq_lengths: Lengths | None = None,
    local_window_size=None,
    dropout_rate=0.0,
    dropout_rng: PRNGKey | None = None,
    implementation=None,
) -> Outputs:
    """Reference attention. q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, H_v]``
    (or unbatched without ``B``) -> ``[B, T, N, H_v]`` in q's dtype.

    ``implementation`` is accepted for signature compatibility and must be None or
    ``"reference"``.

    >>> q = k = v = jnp.ones((1, 2, 1, 4))                 # [B, T, N, H]
    >>> mask = jnp.array([[True, True], [False, False]])   # query 1 may attend nothing
    >>> dot_product_attention(q, k, v, mask=mask)[0, :, 0, 0].tolist()
    [1.0, 0.0]
    """
    if implementation not in (None, "reference"):
        raise ValueError(
            f"reference.dot_product_attention: implementation must be None or 'reference', "
            f"got {implementation!r}"
        )
    call = check_attention_args(
        query,
        key,
        value,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        scale=scale,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    q, k, v = batched_inputs(call, query, key, value)
    out = reference_attention(
        q,
        k,
        v,
        call=call,
        mask=mask,
        bias=bias,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        dropout_rng=dropout_rng,
    )
    return out if call.batched else out[0]


def reference_attention(
    q,
    k,
    v,
    *,
    call: AttentionCall,
    mask=None,
    bias=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    dropout_rng=None,
):
    """The oracle on batched q ``[B, T, N, H]``, k, v ``[B, S, K, H(_v)]`` for an
    already validated ``call`` (what :func:`jax_attn.dispatch.dot_product_attention`
    dispatches to; it does not check its arguments again)."""
    B, T, N, H, S, K, G = call.B, call.T, call.N, call.H, call.S, call.K, call.G
    compute = jnp.promote_types(q.dtype, jnp.float32)
    q, k, v = q.astype(compute), k.astype(compute), v.astype(compute)

    # [B, K, G, T, S]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(B, T, K, G, H), k)
    logits = logits.reshape(B, N, T, S) * jnp.asarray(call.scale, compute)
    if bias is not None:
        bias = jnp.asarray(bias).astype(compute)
        logits = logits + bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    allowed = build_attention_mask(
        T,
        S,
        mask=mask,
        is_causal=call.is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=call.window,
    )
    allowed = logits > -jnp.inf if allowed is None else allowed & (logits > -jnp.inf)
    masked_logits = jnp.where(allowed, logits, -0.7 * jnp.finfo(compute).max)
    weights = jnp.where(allowed, jax.nn.softmax(masked_logits, axis=-1), 0.0)
    if call.dropout_rate > 0.0:
        keep = make_dropout_mask(dropout_rng, call.dropout_rate, (B, N, T, S))
        weights = jnp.where(keep, weights / (1.0 - call.dropout_rate), 0.0)

    # [B, T, K, G, H_v]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", weights.reshape(B, K, G, T, S), v)
    return out.reshape(B, T, N, call.H_v).astype(call.dtype)
