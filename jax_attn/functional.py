"""Chapter 3 as small pure functions, in the order the book builds them.

Single-sequence functions take ``inputs [T, D]``; the batched, multi-head ones use the
shape letters of ``jax.nn``: q ``[B, T, N, H]``, k/v ``[B, S, K, H]``, weights
``[B, N, T, S]``. Logits and softmax are computed in float32 at least; results come
back in the input dtype. Every function is jit-, vmap- and grad-able.

>>> import jax.numpy as jnp
>>> from jax_attn import functional as F
>>> inputs = jnp.array([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64]])
>>> weights = F.attention_weights(F.attention_scores(inputs, inputs))   # 3.3.2
>>> weights.shape, bool(jnp.allclose(weights.sum(axis=-1), 1.0))
((3, 3), True)
>>> F.context_vectors(weights, inputs).shape
(3, 3)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jax_attn.masks import (
    as_4d,
    build_attention_mask,
    make_causal_mask,
    make_dropout_mask,
    masked_logit,
)
from jax_attn.validation import check_attention_args, compute_dtype

if TYPE_CHECKING:  # shape annotations only; see jax_attn.shapes
    from jax_attn.shapes import Array, Bool, Float, Keys, Mask, PRNGKey, Queries, Weights

__all__ = [
    # 3.3.1
    "attention_scores_for_query",
    "normalize_by_sum",
    "naive_softmax",
    "softmax",
    "context_vector",
    # 3.3.2
    "attention_scores",
    "attention_weights",
    "context_vectors",
    "simplified_self_attention",
    # 3.4
    "dense",
    "scaled_attention_scores",
    "self_attention",
    # 3.5
    "large_negative",
    "causal_weights_by_renormalizing",
    "causal_weights_by_masking",
    "masked_softmax",
    "dropout",
    # 3.6
    "split_heads",
    "merge_heads",
    "single_head_attention",
    "multi_head_attention_stacked",
    "multi_head_attention",
    "dot_product_attention_weights",
]


# --- 3.3.1 one query against every input ---------------------------------------------


def attention_scores_for_query(
    query: Float[Array, " D"], inputs: Float[Array, "T D"]
) -> Float[Array, " T"]:
    """Dot product of one ``query [D]`` with every row of ``inputs [T, D]`` -> ``[T]``."""
    # [T]
    return jnp.einsum("D,TD->T", query, inputs)


def normalize_by_sum(scores: Float[Array, "*R T"]) -> Float[Array, "*R T"]:
    """The book's first normalisation: ``scores / sum(scores)`` (not a softmax)."""
    return scores / jnp.sum(scores, axis=-1, keepdims=True)


def naive_softmax(x: Float[Array, "*R T"]) -> Float[Array, "*R T"]:
    """``exp(x) / sum(exp(x))`` as first written in the book.

    Overflows for large inputs: ``naive_softmax(jnp.array([1000., 0.]))`` is ``[nan, 0]``
    in float32, while :func:`softmax` gives ``[1, 0]``.
    """
    e = jnp.exp(x)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def softmax(x: Float[Array, "*X"], axis: int = -1) -> Float[Array, "*X"]:
    """Numerically stable softmax (subtracts the row maximum first), in float32 at least.

    >>> softmax(jnp.array([1000.0, 0.0])).tolist(), naive_softmax(jnp.array([1000.0, 0.0])).tolist()
    ([1.0, 0.0], [nan, 0.0])
    """
    x = x.astype(compute_dtype(x.dtype))
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    e = jnp.exp(shifted)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def context_vector(weights: Float[Array, " T"], inputs: Float[Array, "T D"]) -> Float[Array, " D"]:
    """Weighted sum of ``inputs [T, D]`` with ``weights [T]`` -> ``[D]``."""
    # [D]
    return jnp.einsum("T,TD->D", weights, inputs)


# --- 3.3.2 all tokens at once ----------------------------------------------------------


def attention_scores(
    queries: Float[Array, "T D"], keys: Float[Array, "S D"]
) -> Float[Array, "T S"]:
    """All pairwise dot products: ``queries [T, D]``, ``keys [S, D]`` -> ``[T, S]``."""
    # [T, S]
    return jnp.einsum("TD,SD->TS", queries, keys)


def attention_weights(scores: Float[Array, "*R T S"]) -> Float[Array, "*R T S"]:
    """Row-wise softmax of ``scores [T, S]``."""
    return softmax(scores, axis=-1)


def context_vectors(
    weights: Float[Array, "T S"], values: Float[Array, "S D"]
) -> Float[Array, "T D"]:
    """``weights [T, S]`` times ``values [S, D]`` -> ``[T, D]``."""
    # [T, D]
    return jnp.einsum("TS,SD->TD", weights.astype(values.dtype), values)


def simplified_self_attention(inputs: Float[Array, "T D"]) -> Float[Array, "T D"]:
    """Section 3.3: attention without trainable weights; ``inputs [T, D]`` -> ``[T, D]``."""
    weights = attention_weights(attention_scores(inputs, inputs))
    return context_vectors(weights, inputs)


# --- 3.4 trainable projections ---------------------------------------------------------


def dense(x: Float[Array, "*R d_in"], params) -> Float[Array, "*R d_out"]:
    """``x @ W (+ b)``: ``params`` is a ``[d_in, d_out]`` matrix or ``{"kernel", "bias"?}``."""
    if isinstance(params, dict):
        y = x @ params["kernel"]
        bias = params.get("bias")
        return y if bias is None else y + jnp.broadcast_to(bias, y.shape)
    return x @ params


def scaled_attention_scores(
    queries: Float[Array, "T H"], keys: Float[Array, "S H"], scale=None
) -> Float[Array, "T S"]:
    """``queries [T, H] @ keys [S, H]^T * scale``; scale defaults to ``1/sqrt(H)``."""
    scale = keys.shape[-1] ** -0.5 if scale is None else scale
    return attention_scores(queries, keys) * scale


def self_attention(
    inputs: Float[Array, "T d_in"], params, *, scale=None
) -> Float[Array, "T d_out"]:
    """Section 3.4 (SelfAttention_v1/v2) on one sequence ``[T, d_in]`` -> ``[T, d_out]``.

    ``params`` holds ``W_query``, ``W_key``, ``W_value`` (see :func:`dense`).
    """
    return single_head_attention(inputs, params, is_causal=False, scale=scale)


# --- 3.5 causal masking and dropout ----------------------------------------------------


def large_negative(dtype):
    """A large finite negative for masked logits: ``exp`` of it underflows to 0, no NaN."""
    return jnp.asarray(masked_logit(dtype), dtype)


def causal_weights_by_renormalizing(scores: Float[Array, "*R T S"]) -> Float[Array, "*R T S"]:
    """3.5.1, first way: softmax, zero the future, divide each row by its new sum."""
    T, S = scores.shape[-2:]
    causal = jnp.broadcast_to(make_causal_mask(T, S), scores.shape)
    weights = jnp.where(causal, softmax(scores), 0.0)
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def causal_weights_by_masking(scores: Float[Array, "*R T S"]) -> Float[Array, "*R T S"]:
    """3.5.1, second way: fill the future with a large negative, then softmax."""
    T, S = scores.shape[-2:]
    return masked_softmax(scores, make_causal_mask(T, S))


def masked_softmax(
    logits: Float[Array, "*R S"], mask: Bool[Array, "*M"] | None = None
) -> Float[Array, "*R S"]:
    """Softmax over the last axis where ``mask`` (bool, broadcastable) is True.

    Computed in float32 at least. Masked entries get exactly 0, and a row with nothing
    to attend gets all zeros (never NaN). ``-inf`` logits count as masked.

    >>> masked_softmax(jnp.zeros((2, 2)), jnp.array([[True, True], [False, False]])).tolist()
    [[0.5, 0.5], [0.0, 0.0]]
    """
    logits = logits.astype(compute_dtype(logits.dtype))
    valid = logits > -jnp.inf
    if mask is not None:
        shape = jnp.broadcast_shapes(valid.shape, jnp.shape(mask))
        valid = jnp.broadcast_to(valid, shape) & jnp.broadcast_to(mask, shape)
        logits = jnp.broadcast_to(logits, shape)
    logits = jnp.where(valid, logits, large_negative(logits.dtype))
    return jnp.where(valid, jax.nn.softmax(logits, axis=-1), 0.0)


def dropout(
    weights: Float[Array, "*W"],
    rate: float,
    rng: PRNGKey | None,
    offsets=(0, 0, 0, 0),
    broadcast_dims=(),
) -> Float[Array, "*W"]:
    """3.5.2: zero each weight with probability ``rate``, scale the kept ones by ``1/(1-rate)``.

    ``weights`` has shape ``[B, N, T, S]`` or a trailing part of it (e.g. ``[T, S]``).
    The same ``rng`` always drops the same positions (see ``masks.make_dropout_mask``);
    every weight is dropped independently unless ``broadcast_dims`` (axes of
    ``[B, N, T, S]``, e.g. ``(1,)`` for one mask shared by all heads) says otherwise.

    >>> weights = jnp.full((4, 4), 0.25)
    >>> dropped = dropout(weights, 0.5, jax.random.key(0))
    >>> sorted(set(dropped.ravel().tolist()))        # dropped, or kept and doubled
    [0.0, 0.5]
    >>> bool((dropout(weights, 0.5, jax.random.key(0)) == dropped).all())   # same key
    True
    """
    if rate == 0.0:
        return weights
    if rng is None:
        raise TypeError(f"dropout with rate={rate} needs rng (a jax.random key), got None")
    keep = make_dropout_mask(rng, rate, weights.shape, offsets, broadcast_dims)
    return jnp.where(keep, weights / (1.0 - rate), 0.0).astype(weights.dtype)


# --- 3.6 multiple heads ----------------------------------------------------------------


def split_heads(x: Float[Array, "*R T D"], num_heads: int) -> Float[Array, "*R T N H"]:
    """``[..., T, D]`` -> ``[..., T, N, H]`` with ``H = D // N``.

    >>> x = jnp.arange(12.0).reshape(1, 2, 6)
    >>> split_heads(x, 3).shape
    (1, 2, 3, 2)
    >>> bool((merge_heads(split_heads(x, 3)) == x).all())
    True
    """
    *lead, D = x.shape
    if D % num_heads:
        raise ValueError(f"split_heads: width D={D} is not divisible by num_heads={num_heads}")
    return x.reshape(*lead, num_heads, D // num_heads)


def merge_heads(x: Float[Array, "*R T N H"]) -> Float[Array, "*R T D"]:
    """``[..., T, N, H]`` -> ``[..., T, N * H]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def single_head_attention(
    inputs: Float[Array, "T d_in"],
    params,
    *,
    is_causal=False,
    dropout_rate=0.0,
    dropout_rng=None,
    scale=None,
) -> Float[Array, "T d_out"]:
    """One head on one sequence: ``inputs [T, d_in]`` -> context ``[T, d_out]``.

    Project to queries, keys, values; scores scaled by ``1/sqrt(d_out)``; optional
    causal mask; softmax; dropout on the weights; weighted sum of the values.
    """
    queries = dense(inputs, params["W_query"])
    keys = dense(inputs, params["W_key"])
    values = dense(inputs, params["W_value"])
    scores = scaled_attention_scores(queries, keys, scale)
    T, S = scores.shape
    weights = masked_softmax(scores, make_causal_mask(T, S) if is_causal else None)
    if dropout_rate:
        weights = dropout(weights, dropout_rate, dropout_rng)
    return context_vectors(weights, values).astype(inputs.dtype)


def multi_head_attention_stacked(
    inputs: Float[Array, "T d_in"],
    head_params,
    *,
    is_causal=True,
    dropout_rate=0.0,
    dropout_rng=None,
) -> Float[Array, "T D"]:
    """3.6.1: run independent single heads and concatenate: ``[T, d_in]`` -> ``[T, N*d_out]``.

    ``head_params`` is the single-head pytree with a leading head axis ``N`` on every
    leaf; the heads are lifted with ``jax.vmap`` (each head gets its own dropout key).
    """
    num_heads = jax.tree_util.tree_leaves(head_params)[0].shape[0]
    rngs = jax.random.split(dropout_rng, num_heads) if dropout_rate else None

    def one_head(params, rng):
        return single_head_attention(
            inputs, params, is_causal=is_causal, dropout_rate=dropout_rate, dropout_rng=rng
        )

    # [N, T, d_out]
    per_head = jax.vmap(one_head, in_axes=(0, 0 if rngs is not None else None))(head_params, rngs)
    # [T, N * d_out]
    return merge_heads(jnp.einsum("NTH->TNH", per_head))


def multi_head_attention(
    inputs: Float[Array, "*B T d_in"],
    params,
    num_heads: int,
    *,
    is_causal=True,
    dropout_rate=0.0,
    dropout_rng=None,
) -> Float[Array, "*B T d_out"]:
    """3.6.2: one projection split into heads: ``[T, d_in]`` or ``[B, T, d_in]`` -> same with d_out.

    ``params`` holds ``W_query``, ``W_key``, ``W_value`` and ``out_proj`` (see :func:`dense`).
    """
    if inputs.ndim == 2:
        return multi_head_attention(
            inputs[None],
            params,
            num_heads,
            is_causal=is_causal,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
        )[0]
    # [B, T, N, H]
    queries = split_heads(dense(inputs, params["W_query"]), num_heads)
    keys = split_heads(dense(inputs, params["W_key"]), num_heads)
    values = split_heads(dense(inputs, params["W_value"]), num_heads)
    weights = dot_product_attention_weights(queries, keys, is_causal=is_causal)
    if dropout_rate:
        weights = dropout(weights, dropout_rate, dropout_rng)
    # [B, T, N, H]
    context = jnp.einsum("BNTS,BSNH->BTNH", weights, values)
    return dense(merge_heads(context), params["out_proj"])


def dot_product_attention_weights(
    q: Queries,
    k: Keys,
    *,
    mask: Mask | None = None,
    bias: Float[Array, "*bias"] | None = None,
    is_causal=False,
    scale=None,
) -> Weights:
    """Attention weights ``[B, N, T, S]`` (or ``[N, T, S]`` unbatched) in q's dtype.

    q ``[B, T, N, H]``, k ``[B, S, K, H]`` with ``N % K == 0``. Rows sum to 1, except
    rows with nothing to attend, which are all zeros.

    >>> q = k = jnp.ones((1, 3, 2, 4))                  # [B, T, N, H]
    >>> import numpy as np
    >>> print(np.asarray(dot_product_attention_weights(q, k, is_causal=True)[0, 0]).round(2))
    [[1.   0.   0.  ]
     [0.5  0.5  0.  ]
     [0.33 0.33 0.33]]
    """
    call = check_attention_args(q, k, mask=mask, bias=bias, is_causal=is_causal, scale=scale)
    if not call.batched:
        q, k = q[None], k[None]
    B, T, N, H = q.shape
    K, S = call.K, call.S
    compute = call.compute_dtype
    q = q.reshape(B, T, K, N // K, H)
    # [B, K, G, T, S]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=compute)
    logits = logits.reshape(B, N, T, S) * call.scale
    if bias is not None:
        logits = logits + as_4d(jnp.asarray(bias).astype(compute))
    full_mask = build_attention_mask(T, S, mask=mask, is_causal=is_causal)
    weights = masked_softmax(logits, full_mask).astype(q.dtype)
    return weights if call.batched else weights[0]
