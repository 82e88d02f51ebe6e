"""``flax_attention_fn``: jax_attn's kernels behind Flax's own attention modules.

``flax.linen.MultiHeadDotProductAttention(attention_fn=flax_attention_fn)`` and
``flax.nnx.MultiHeadAttention(attention_fn=flax_attention_fn)`` keep their parameters and
outputs but run :func:`jax_attn.dot_product_attention` (on CPU its chunked kernel, O(T)
memory). Flax's conventions are translated here: leading batch dims ``[batch..., T, N, H]``
flattened to ``[B, T, N, H]``, multiplicative float masks (nonzero = may attend) turned
boolean, ``deterministic`` turned into ``dropout_rate=0``, ``is_causal`` top-left aligned as
in Flax, and the attention weights sown through ``module`` when Flax asks for them.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.dispatch import dot_product_attention
from jax_attn.functional import dot_product_attention_weights

__all__ = ["flax_attention_fn"]

_CUSTOM_EINSUMS = ("einsum_dot_general", "qk_attn_weights_einsum", "attn_weights_value_einsum")


def _check_qkv(query, key, value) -> tuple[int, ...]:
    """Flax's ``[batch..., T, N, H]`` inputs; returns the batch dims."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) < 3:
            raise ValueError(
                f"{name} must have shape [batch..., length, heads, head_dim] (3 dims or more), "
                f"got {list(jnp.shape(x))}"
            )
    if not jnp.ndim(query) == jnp.ndim(key) == jnp.ndim(value):
        raise ValueError(
            "query, key and value must have the same rank, got shapes "
            f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
        )
    batch = tuple(query.shape[:-3])
    if not batch == key.shape[:-3] == value.shape[:-3]:
        raise ValueError(
            f"query, key and value batch dims must match, got {list(query.shape[:-3])}, "
            f"{list(key.shape[:-3])}, {list(value.shape[:-3])}"
        )
    return batch


def _flatten_batch(name: str, x, batch: tuple[int, ...]):
    """``x`` broadcastable to ``[batch..., N, T, S]`` as ``[B | 1, N', T', S']``."""
    x = jnp.asarray(x)
    rank = len(batch) + 3
    if x.ndim > rank:
        raise ValueError(
            f"{name} must broadcast to [batch..., heads, q_length, kv_length] ({rank} dims), "
            f"got shape {list(x.shape)}"
        )
    x = x.reshape((1,) * (rank - x.ndim) + x.shape)
    lead, tail = x.shape[: len(batch)], x.shape[len(batch) :]
    if all(d == 1 for d in lead):
        return x.reshape(1, *tail)
    if any(d not in (1, b) for d, b in zip(lead, batch, strict=True)):
        raise ValueError(
            f"{name} batch dims {list(lead)} do not broadcast to the inputs' {list(batch)}"
        )
    return jnp.broadcast_to(x, batch + tail).reshape(math.prod(batch), *tail)


def _as_bool(mask):
    """Flax's masks multiply: any nonzero entry may attend."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != jnp.zeros((), mask.dtype)


def _precision_context(precision):
    """``precision`` as a default-matmul-precision scope for the kernels' products."""
    if precision is None:
        return contextlib.nullcontext()
    if isinstance(precision, tuple | list):
        if len(set(precision)) != 1:
            raise ValueError(
                f"precision: one precision for both operands is supported, got {precision!r}"
            )
        precision = precision[0]
    if isinstance(precision, jax.lax.Precision):
        precision = precision.name.lower()
    if not isinstance(precision, str):
        raise TypeError(
            f"precision must be None, a jax.lax.Precision or its name, got {precision!r}"
        )
    return jax.default_matmul_precision(precision)


def _sow_weights(module, weights) -> None:
    """Sows ``weights`` where Flax's default attention puts them."""
    import flax.linen

    if isinstance(module, flax.linen.Module):
        module.sow("intermediates", "attention_weights", weights)
        return
    from flax import nnx

    module.sow(nnx.Intermediate, "attention_weights", weights)


def flax_attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general=None,
    qk_attn_weights_einsum=None,
    attn_weights_value_einsum=None,
    promote_dtype=None,
    is_causal: bool = False,
    *,
    implementation: str | None = None,
):
    """Flax's ``dot_product_attention`` signature, run by :func:`jax_attn.dot_product_attention`.

    Pass it as ``attention_fn=`` to ``flax.linen.MultiHeadDotProductAttention`` or
    ``flax.nnx.MultiHeadAttention``; ``functools.partial(flax_attention_fn,
    implementation="xla")`` picks a kernel.

    Args:
      query: ``[batch..., T, N, H]``.
      key: ``[batch..., S, K, H]`` with ``N % K == 0``.
      value: ``[batch..., S, K, H_v]``.
      bias: added to the logits, broadcastable to ``[batch..., N, T, S]``.
      mask: broadcastable to ``[batch..., N, T, S]``, bool or float; nonzero = may attend.
        A dense causal mask costs ``T * S`` memory: for the O(T) path pass ``mask=None``
        with ``is_causal=True`` (NNX: at call; linen: with ``functools.partial``).
      broadcast_dropout: ignored, see below.
      dropout_rng, dropout_rate, deterministic: dropout on the weights unless
        ``deterministic``. The keep-mask is jax_attn's hash of the key and each element's
        index, drawn independently per batch element and head (as Flax's
        ``broadcast_dropout=False``), not Flax's ``jax.random.bernoulli`` mask.
      dtype: inputs are cast to it (Flax's ``promote_dtype``); logits and softmax are
        float32 at least whatever it is, so ``force_fp32_for_softmax`` always holds.
      precision: the matmul precision of the kernel (``jax.default_matmul_precision``).
      module: the module sows the attention weights ``[batch..., N, T, S]`` (computed by
        :func:`jax_attn.dot_product_attention_weights`, before dropout) into its
        intermediates, as Flax's default does.
      einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum: must be
        ``None``: custom (quantized) products need Flax's default attention.
      promote_dtype: NNX's dtype promotion function, ``promote_dtype((q, k, v), dtype=)``.
      is_causal: query ``t`` attends keys ``<= t`` (top-left aligned, as in Flax).
      implementation: as in :func:`jax_attn.dot_product_attention`.

    Returns:
      ``[batch..., T, N, H_v]`` in the promoted dtype. A query row with nothing to attend
      gets zeros (Flax's default gives it the mean of the values).
    """
    for name, given in zip(
        _CUSTOM_EINSUMS,
        (einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum),
        strict=True,
    ):
        if given is not None:
            raise ValueError(
                f"flax_attention_fn: {name} must be None, got {given!r}; custom einsums "
                "need Flax's default attention_fn"
            )
    if promote_dtype is None:
        from flax.linen.dtypes import promote_dtype as linen_promote

        query, key, value = linen_promote(query, key, value, dtype=dtype)
    else:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
    batch = _check_qkv(query, key, value)
    *_, T, N, H = query.shape
    S, K, H_v = key.shape[-3], key.shape[-2], value.shape[-1]
    B = math.prod(batch)
    q = query.reshape(B, T, N, H)
    k = key.reshape(B, S, K, H)
    v = value.reshape(B, S, K, H_v)

    if mask is not None:
        mask = _flatten_batch("mask", _as_bool(mask), batch)
    if bias is not None:
        bias = _flatten_batch("bias", bias, batch)
    if not isinstance(is_causal, bool | np.bool_):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and T != S:
        # jax_attn aligns causal masks bottom-right; Flax (jnp.tril) aligns them top-left.
        # [1, 1, T, S]
        top_left = jnp.tril(jnp.ones((T, S), jnp.bool_)).reshape(1, 1, T, S)
        mask = top_left if mask is None else mask & top_left
        is_causal = False

    rate = 0.0 if deterministic else dropout_rate
    if rate > 0.0 and dropout_rng is None:
        raise ValueError(
            f"flax_attention_fn: dropout_rng is required when dropout_rate={dropout_rate} "
            "and deterministic=False"
        )
    with _precision_context(precision):
        out = dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            is_causal=bool(is_causal),
            dropout_rate=rate,
            dropout_rng=dropout_rng if rate > 0.0 else None,
            implementation=implementation,
        )
        if module is not None:
            weights = dot_product_attention_weights(
                q, k, mask=mask, bias=bias, is_causal=bool(is_causal)
            )
            _sow_weights(module, weights.reshape(*batch, N, T, S))
    return out.reshape(*batch, T, N, H_v)
