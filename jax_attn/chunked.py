"""Online-softmax building blocks (and, built on them, the chunked implementation).

Attention over a long key sequence can be computed block by block: each block of
keys gives a *partial* result — an unnormalised accumulator, the running row maximum
and the row sum of exponentials — and partials combine exactly (maxtext's
``normalize_attention``; flash attention). The chunked kernel and ring attention
(:mod:`jax_attn.sharding`) both use :func:`attend_block`, :func:`combine_partials`
and :func:`finalize_partial`; there is one combine in the library.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

__all__ = [
    "PartialAttention",
    "attend_block",
    "combine_partials",
    "empty_partial",
    "finalize_partial",
    "MASKED_LOGIT",
]

# Finite "minus infinity" for float32 logits: exp(MASKED_LOGIT - m) underflows to 0
# and a block with nothing to attend never produces NaN.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


class PartialAttention(NamedTuple):
    """Attention of queries over a subset of keys, not yet normalised.

    acc ``[B, T, N, H_v]``: ``sum_s exp(logit_s - row_max) * v_s`` (float32);
    row_max ``[B, T, N]``: max valid logit (``MASKED_LOGIT`` if none);
    row_sum ``[B, T, N]``: ``sum_s exp(logit_s - row_max)`` over valid keys (0 if none).
    """

    acc: jnp.ndarray
    row_max: jnp.ndarray
    row_sum: jnp.ndarray


def empty_partial(B: int, T: int, N: int, H_v: int, dtype=jnp.float32) -> PartialAttention:
    """The identity of :func:`combine_partials`: attention over no keys."""
    return PartialAttention(
        acc=jnp.zeros((B, T, N, H_v), dtype),
        row_max=jnp.full((B, T, N), MASKED_LOGIT, dtype),
        row_sum=jnp.zeros((B, T, N), dtype),
    )


def attend_block(q, k, v, *, scale: float, mask=None, bias=None, keep=None, dropout_rate=0.0):
    """Partial attention of ``q [B, T, N, H]`` over one block ``k, v [B, S, K, H(_v)]``.

    ``mask`` (bool) and ``bias`` broadcast to ``[B, N, T, S]``; ``-inf`` bias counts as
    masked. ``keep`` (bool ``[B, N, T, S]``) is this block's slice of the dropout mask:
    dropped weights leave the accumulator but still count in the row sum, so the
    result equals dropout applied after the softmax, as in the book.
    """
    B, T, N, H = q.shape
    _, S, K, H_v = v.shape
    G = N // K
    compute = jnp.promote_types(q.dtype, jnp.float32)
    # [B, K, G, T, S]
    logits = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q.reshape(B, T, K, G, H), k, preferred_element_type=compute
    )
    logits = logits.reshape(B, N, T, S) * jnp.asarray(scale, compute)
    valid = None
    if bias is not None:
        bias = jnp.asarray(bias).astype(compute)
        logits = logits + bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        valid = logits > -jnp.inf
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        valid = mask if valid is None else valid & mask
    if valid is not None:
        logits = jnp.where(valid, logits, MASKED_LOGIT)
    # [B, N, T]
    row_max = jnp.max(logits, axis=-1)
    probs = jnp.exp(logits - row_max[..., None])
    if valid is not None:
        probs = jnp.where(valid, probs, 0.0)
    row_sum = jnp.sum(probs, axis=-1)
    if keep is not None:
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    # [B, T, K, G, H_v]
    acc = jnp.einsum(
        "BKGTS,BSKH->BTKGH", probs.reshape(B, K, G, T, S).astype(compute), v.astype(compute)
    )
    return PartialAttention(
        acc=acc.reshape(B, T, N, H_v),
        row_max=jnp.transpose(row_max, (0, 2, 1)),
        row_sum=jnp.transpose(row_sum, (0, 2, 1)),
    )


def combine_partials(a: PartialAttention, b: PartialAttention) -> PartialAttention:
    """Exact merge of two partials over disjoint key sets (associative, commutative)."""
    row_max = jnp.maximum(a.row_max, b.row_max)
    scale_a = jnp.exp(a.row_max - row_max)
    scale_b = jnp.exp(b.row_max - row_max)
    return PartialAttention(
        acc=a.acc * scale_a[..., None] + b.acc * scale_b[..., None],
        row_max=row_max,
        row_sum=a.row_sum * scale_a + b.row_sum * scale_b,
    )


def finalize_partial(partial: PartialAttention, dtype) -> jnp.ndarray:
    """``acc / row_sum`` in ``dtype``; rows that saw no valid key give zeros."""
    has_keys = partial.row_sum > 0
    denominator = jnp.where(has_keys, partial.row_sum, 1.0)
    out = jnp.where(has_keys[..., None], partial.acc / denominator[..., None], 0.0)
    return out.astype(dtype)
