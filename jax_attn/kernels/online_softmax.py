"""The online softmax: attention over key blocks as partial results that combine exactly.

Each block of keys gives a *partial* result (maxtext's ``normalize_attention``; flash
attention): the unnormalised output, the row maximum of the logits and the row sum of
their exponentials. Partials over disjoint key sets combine exactly by rescaling both to
the larger maximum (:func:`combine_partials`: the online normaliser of Milakov &
Gimelshein 2018, "Online normalizer calculation for softmax", carried to the output as
in FlashAttention), and :func:`finalize` divides once at the end (FlashAttention-2 §3.1:
no rescaling of the output per block). :func:`block_gradients` is the matching backward
of one block (FlashAttention-2, Algorithm 2), recomputing its weights from the
log-sum-exp; :func:`block_tangent` its forward mode (Lu & Song 2024, appendix F). The
chunked kernel and ring attention both run on these functions.

Layout (the kernels' own, every block a batched matrix product): q ``[B, K, G, T, H]``,
k ``[B, K, S, H]``, v ``[B, K, S, H_v]``, logits ``[B, K, G, T, S]``, row statistics
``[B, K, G, T]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jax_attn.kernels.contract import compute_dtype
from jax_attn.kernels.layout import keys_to_kernel, queries_to_kernel
from jax_attn.masks import MASKED_LOGIT

__all__ = [
    "MASKED_LOGIT",
    "BlockGradients",
    "BlockTangent",
    "PartialAttention",
    "attend_block",
    "block_gradients",
    "block_logits",
    "block_tangent",
    "combine_partials",
    "empty_partial",
    "finalize",
    "to_kernel_layout",
]


class PartialAttention(NamedTuple):
    """Attention of queries over a subset of keys, not yet normalised.

    acc ``[B, K, G, T, H_v]``: ``sum_s exp(logit_s - row_max) * v_s``;
    row_max ``[B, K, G, T]``: max logit, never below ``MASKED_LOGIT`` (a row that met no
    valid key keeps exactly ``MASKED_LOGIT``, and its acc and row_sum are discarded);
    row_sum ``[B, K, G, T]``: ``sum_s exp(logit_s - row_max)``.
    """

    acc: jnp.ndarray
    row_max: jnp.ndarray
    row_sum: jnp.ndarray


class BlockGradients(NamedTuple):
    """Gradients of one block with respect to q ``[B, K, G, T, H]``, k ``[B, K, S, H]``,
    v ``[B, K, S, H_v]`` and the logits ``[B, K, G, T, S]`` (float32 or float64), and
    ``d_closure``: those ``score_vjp`` returns for the arrays a score function closes over."""

    dq: jnp.ndarray
    dk: jnp.ndarray
    dv: jnp.ndarray
    d_logits: jnp.ndarray
    d_closure: tuple = ()


def to_kernel_layout(q, k, v):
    """q ``[B, T, N, H]``, k, v ``[B, S, K, H(_v)]`` -> the kernel layout (see module doc)."""
    return queries_to_kernel(q, k.shape[2]), keys_to_kernel(k), keys_to_kernel(v)


def empty_partial(B: int, K: int, G: int, T: int, H_v: int, dtype=jnp.float32):
    """The identity of :func:`combine_partials`: attention over no keys."""
    return PartialAttention(
        acc=jnp.zeros((B, K, G, T, H_v), dtype),
        row_max=jnp.full((B, K, G, T), MASKED_LOGIT, dtype),
        row_sum=jnp.zeros((B, K, G, T), dtype),
    )


def block_logits(q, k, scale: float = 1.0):
    """Logits ``[B, K, G, T, S]`` of q ``[B, K, G, T, H]`` against k ``[B, K, S, H]``, in
    float32 (float64 for float64 inputs)."""
    dtype = compute_dtype(q.dtype)
    # [B, K, G, T, S]
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, preferred_element_type=dtype)
    if scale != 1.0:
        logits = logits * jnp.asarray(scale, dtype)
    return logits


def attend_block(logits, v, *, keep=None, dropout_rate: float = 0.0) -> PartialAttention:
    """Partial attention of one block: ``logits [B, K, G, T, S]`` (masked entries at
    ``MASKED_LOGIT`` or ``-inf``) over ``v [B, K, S, H_v]``.

    ``keep`` (bool, broadcastable to the logits) is the block's slice of the dropout
    mask: dropped weights leave the output but still count in the row sum, so the
    result equals dropout applied after the softmax, as in the book.
    """
    row_max = jnp.maximum(jnp.max(logits, axis=-1), jnp.asarray(MASKED_LOGIT, logits.dtype))
    probs = jnp.exp(logits - jnp.expand_dims(row_max, -1))
    row_sum = jnp.sum(probs, axis=-1)
    if keep is not None:
        probs = jnp.where(keep, probs * jnp.asarray(1.0 / (1.0 - dropout_rate), probs.dtype), 0.0)
    # Probabilities stay float32 for half-precision values: rounding them to bfloat16
    # before this product costs up to an ulp of the output (1/2 ulp is the reference's).
    # [B, K, G, T, H_v]
    acc = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v.astype(probs.dtype))
    return PartialAttention(acc, row_max, row_sum)


def combine_partials(a: PartialAttention, b: PartialAttention) -> PartialAttention:
    """Exact merge of two partials over disjoint key sets (associative, commutative):
    with ``m = max(m_a, m_b)``, ``acc = acc_a e^(m_a - m) + acc_b e^(m_b - m)`` and the
    same for the row sums (Milakov & Gimelshein 2018)."""
    row_max = jnp.maximum(a.row_max, b.row_max)
    scale_a = jnp.exp(a.row_max - row_max)
    scale_b = jnp.exp(b.row_max - row_max)
    return PartialAttention(
        acc=a.acc * jnp.expand_dims(scale_a, -1) + b.acc * jnp.expand_dims(scale_b, -1),
        row_max=row_max,
        row_sum=a.row_sum * scale_a + b.row_sum * scale_b,
    )


def finalize(partial: PartialAttention):
    """``(out [B, K, G, T, H_v], lse [B, K, G, T])``: ``acc / row_sum`` and the
    log-sum-exp. A row that met no valid key gets a zero output and
    ``lse = -MASKED_LOGIT``, so the backward gives it zero weights."""
    has_keys = partial.row_max > MASKED_LOGIT
    safe_sum = jnp.where(has_keys, partial.row_sum, 1.0)
    out = jnp.where(jnp.expand_dims(has_keys, -1), partial.acc / jnp.expand_dims(safe_sum, -1), 0.0)
    lse = jnp.where(has_keys, partial.row_max + jnp.log(safe_sum), -MASKED_LOGIT)
    return out, lse


def block_gradients(
    logits, lse, delta, q, k, v, d_out, *, keep=None, dropout_rate: float = 0.0, score_vjp=None
) -> BlockGradients:
    """Flash-attention backward of one block (FlashAttention-2, Algorithm 2): its weights
    recomputed as ``p = exp(logits - lse)``, ``d_logits = p * (d_p - delta)``.

    ``logits [B, K, G, T, S]`` as in the forward (scaled, masked); ``lse`` and
    ``delta = sum(d_out * out, -1)`` ``[B, K, G, T]``; q, k, v, d_out in the kernel
    layout. ``dq`` and ``dk`` are with respect to the scaled logits' inputs before the
    scale: multiply them by the logit scale. When a score function made the logits from
    the scores ``q k^T``, ``score_vjp(d_logits) -> (d_scores, d_closure)`` is its VJP.
    """
    dtype = logits.dtype
    # [B, K, G, T, S]
    probs = jnp.exp(logits - jnp.expand_dims(lse, -1))
    # [B, K, G, T, S]
    d_probs = jnp.einsum("BKGTH,BKSH->BKGTS", d_out, v, preferred_element_type=dtype)
    dropped = probs
    if keep is not None:
        factor = jnp.where(keep, jnp.asarray(1.0 / (1.0 - dropout_rate), dtype), 0.0)
        dropped = probs * factor
        d_probs = d_probs * factor
    d_logits = probs * (d_probs - jnp.expand_dims(delta, -1))
    d_scores, d_closure = (d_logits, ()) if score_vjp is None else score_vjp(d_logits)
    # The weights and d_logits stay in float32 (float64) for the dq/dk/dv products:
    # rounding them to a half-precision input dtype first costs about twice the error the
    # reference makes in that dtype. The half-precision operand is widened instead (exact).
    # [B, K, S, H_v]
    dv = jnp.einsum("BKGTS,BKGTH->BKSH", dropped, d_out.astype(dtype), preferred_element_type=dtype)
    # [B, K, S, H]
    dk = jnp.einsum("BKGTS,BKGTH->BKSH", d_scores, q.astype(dtype), preferred_element_type=dtype)
    # [B, K, G, T, H]
    dq = jnp.einsum("BKGTS,BKSH->BKGTH", d_scores, k.astype(dtype), preferred_element_type=dtype)
    return BlockGradients(dq, dk, dv, d_logits, tuple(d_closure))


class BlockTangent(NamedTuple):
    """One block's share of the forward-mode derivative of ``(out, lse)``, summed over
    blocks as plain sums (the weights come from the final ``lse``, so nothing rescales):
    ``acc [B, K, G, T, H_v]``: ``sum_s p~ (d_logit v + dv)`` with ``p~`` the dropped,
    rescaled weights; ``mu [B, K, G, T]``: ``sum_s p d_logit`` (undropped: the softmax
    normalises over every weight). Then ``d_out = acc - mu * out`` and ``d_lse = mu``."""

    acc: jnp.ndarray
    mu: jnp.ndarray


def block_tangent(
    logits, lse, d_logits, v, dv, *, keep=None, dropout_rate: float = 0.0
) -> BlockTangent:
    """Forward-mode derivative of one block (Lu & Song 2024, appendix F): ``logits`` and
    their tangent ``d_logits`` ``[B, K, G, T, S]`` (masked entries anything finite: their
    weight is 0), the row's final ``lse [B, K, G, T]``, v and its tangent dv
    ``[B, K, S, H_v]``."""
    dtype = logits.dtype
    # [B, K, G, T, S]
    probs = jnp.exp(logits - jnp.expand_dims(lse, -1))
    mu = jnp.sum(probs * d_logits, axis=-1)
    if keep is not None:
        probs = jnp.where(keep, probs * jnp.asarray(1.0 / (1.0 - dropout_rate), dtype), 0.0)
    # [B, K, G, T, H_v]
    acc = jnp.einsum(
        "BKGTS,BKSH->BKGTH", probs * d_logits, v.astype(dtype), preferred_element_type=dtype
    ) + jnp.einsum("BKGTS,BKSH->BKGTH", probs, dv.astype(dtype), preferred_element_type=dtype)
    return BlockTangent(acc, mu)
