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
  more mask, evaluated on the full grid here (a ``block_mask`` changes nothing here);
* NaN or Inf at a masked position changes no output or gradient; at a live position it
  makes exactly the outputs that attend it NaN (``validation.nan_policy_attention``).

:func:`dot_product_attention` has the signature of
:func:`jax_attn.dispatch.dot_product_attention` and shares its argument handling
and NaN policy (:func:`jax_attn.validation.run_attention`); :func:`reference_attention`
is the core that runs on an already validated call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jax_attn.kernels.contract import AttentionCall, KernelInputs
from jax_attn.mask_functions import BlockMask, evaluate_mask, evaluate_score
from jax_attn.masks import as_4d, call_mask, make_dropout_mask, masked_logit
from jax_attn.validation import run_attention

if TYPE_CHECKING:  # shape annotations only; see jax_attn.shapes
    from jax_attn.shapes import Array, Float, Keys, Lengths, Mask, Outputs, PRNGKey, Queries, Values

__all__ = ["dot_product_attention", "reference_attention"]


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
    masked_logits = jnp.where(allowed, logits, masked_logit(compute))
    weights = jnp.where(allowed, jax.nn.softmax(masked_logits, axis=-1), 0.0)
    if call.dropout_rate > 0.0:
        assert inputs.dropout_rng is not None  # check_dropout refused a rate without a key
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


def dot_product_attention(
    query: Queries,
    key: Keys,
    value: Values,
    *,
    mask: Mask | None = None,
    bias: Float[Array, "*bias"] | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    query_seq_lengths: Lengths | None = None,
    key_value_seq_lengths: Lengths | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKey | None = None,
    implementation: str | None = None,
    mask_fn: Callable | None = None,
    score_fn: Callable | None = None,
    block_mask: BlockMask | None = None,
    alibi_slopes: Float[Array, "*slopes"] | None = None,
    logit_soft_cap: float | None = None,
) -> Outputs:
    """Reference attention. q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, H_v]``
    (or unbatched without ``B``) -> ``[B, T, N, H_v]`` in q's dtype.

    The arguments are those of :func:`jax_attn.dispatch.dot_product_attention`;
    ``implementation`` must be None or ``"reference"``.

    >>> import jax.numpy as jnp
    >>> q = k = v = jnp.ones((1, 2, 1, 4))                 # [B, T, N, H]
    >>> mask = jnp.array([[True, True], [False, False]])   # query 1 may attend nothing
    >>> dot_product_attention(q, k, v, mask=mask)[0, :, 0, 0].tolist()
    [1.0, 0.0]
    """
    return run_attention(
        _reference_only,
        implementation,
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
        mask_fn=mask_fn,
        score_fn=score_fn,
        block_mask=block_mask,
        alibi_slopes=alibi_slopes,
        logit_soft_cap=logit_soft_cap,
    )
