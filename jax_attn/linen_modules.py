"""The book's attention classes as thin ``flax.linen`` modules.

Inputs are ``[T, d_in]`` or ``[B, T, d_in]``. Parameters are named as in the book
(``W_query``, ``W_key``, ``W_value``, ``out_proj``, ``heads_0``...) so
:mod:`jax_attn.interop` maps them to and from the PyTorch ``state_dict``. Dropout
uses the ``"dropout"`` RNG stream and a ``deterministic`` flag given at construction
or call (the call wins). The attention itself is :func:`jax_attn.dot_product_attention`;
these modules hold parameters and shapes only.

>>> import jax, jax.numpy as jnp
>>> mha = MultiHeadAttention(d_in=3, d_out=4, context_length=6, dropout=0.5, num_heads=2)
>>> x = jnp.ones((2, 6, 3))                                        # [B, T, d_in]
>>> variables = mha.init(jax.random.key(0), x)
>>> mha.apply(variables, x, deterministic=True).shape
(2, 6, 4)
>>> train = mha.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_attn import kv_cache
from jax_attn.dispatch import dot_product_attention
from jax_attn.functional import merge_heads, split_heads
from jax_attn.validation import as_batch, check_dropout_rate, check_positive_int

__all__ = [
    "SelfAttentionV1",
    "SelfAttentionV2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "torch_linear_init",
]


def torch_linear_init(fan_in: int):
    """``nn.Linear``'s default: uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(features: int, fan_in: int, use_bias: bool, name: str) -> nn.Dense:
    init = torch_linear_init(fan_in)
    return nn.Dense(features, use_bias=use_bias, kernel_init=init, bias_init=init, name=name)


def resolve_deterministic(
    owner: str, at_init: bool | None, at_call: bool | None, rate, initializing: bool = False
) -> bool:
    """The call's flag wins over the constructor's. With neither, ``init`` runs without
    dropout and an ``apply`` with dropout > 0 is an error (say which mode you mean)."""
    chosen = at_call if at_call is not None else at_init
    if chosen is None:
        if rate == 0.0 or initializing:
            return True
        raise ValueError(
            f"{owner}: dropout={rate} needs deterministic=True (evaluation) or False "
            "(training, with rngs={'dropout': key}), at construction or call"
        )
    return bool(chosen)


def dropout_rng(module: nn.Module, rate: float):
    """The next key of the ``"dropout"`` stream when ``rate > 0``; a clear error when
    ``apply`` was given no such stream."""
    if rate == 0.0:
        return None
    if not module.has_rng("dropout"):
        raise ValueError(
            f"{type(module).__name__}: dropout={rate} with deterministic=False needs "
            "rngs={'dropout': key} in apply (or deterministic=True), got no 'dropout' rng"
        )
    return module.make_rng("dropout")


class SelfAttentionV1(nn.Module):
    """Section 3.4.1: ``W_query``, ``W_key``, ``W_value`` as ``[d_in, d_out]`` matrices,
    initialised uniform in ``[0, 1)`` like ``torch.rand``. Output ``[..., T, d_out]``."""

    d_in: int
    d_out: int

    def __post_init__(self):
        check_positive_int("SelfAttentionV1", "d_in", self.d_in)
        check_positive_int("SelfAttentionV1", "d_out", self.d_out)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        del deterministic  # no dropout here; accepted so every module takes it
        x, unbatched = as_batch("SelfAttentionV1", x, self.d_in)
        shape = (self.d_in, self.d_out)
        uniform01 = nn.initializers.uniform(scale=1.0)
        # [B, T, 1, d_out]
        queries = (x @ self.param("W_query", uniform01, shape))[:, :, None, :]
        keys = (x @ self.param("W_key", uniform01, shape))[:, :, None, :]
        values = (x @ self.param("W_value", uniform01, shape))[:, :, None, :]
        out = dot_product_attention(queries, keys, values)[:, :, 0, :]
        return out[0] if unbatched else out


class SelfAttentionV2(nn.Module):
    """Section 3.4.2: ``nn.Linear``-style projections (kernel ``[d_in, d_out]``)."""

    d_in: int
    d_out: int
    qkv_bias: bool = False

    def __post_init__(self):
        check_positive_int(type(self).__name__, "d_in", self.d_in)
        check_positive_int(type(self).__name__, "d_out", self.d_out)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        del deterministic
        x, unbatched = as_batch("SelfAttentionV2", x, self.d_in)
        # [B, T, 1, d_out]
        queries = _linear(self.d_out, self.d_in, self.qkv_bias, "W_query")(x)[:, :, None, :]
        keys = _linear(self.d_out, self.d_in, self.qkv_bias, "W_key")(x)[:, :, None, :]
        values = _linear(self.d_out, self.d_in, self.qkv_bias, "W_value")(x)[:, :, None, :]
        out = dot_product_attention(queries, keys, values)[:, :, 0, :]
        return out[0] if unbatched else out


class CausalAttention(nn.Module):
    """Section 3.5.3: single-head causal attention with dropout on the weights."""

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    qkv_bias: bool = False
    deterministic: bool | None = None
    implementation: str | None = None

    def __post_init__(self):
        name = type(self).__name__
        check_positive_int(name, "d_in", self.d_in)
        check_positive_int(name, "d_out", self.d_out)
        check_positive_int(name, "context_length", self.context_length)
        check_dropout_rate(name, self.dropout)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        name = type(self).__name__
        x, unbatched = as_batch(name, x, self.d_in, self.context_length)
        deterministic = resolve_deterministic(
            name, self.deterministic, deterministic, self.dropout, self.is_initializing()
        )
        rate = 0.0 if deterministic else float(self.dropout)
        # [B, T, 1, d_out]
        queries = _linear(self.d_out, self.d_in, self.qkv_bias, "W_query")(x)[:, :, None, :]
        keys = _linear(self.d_out, self.d_in, self.qkv_bias, "W_key")(x)[:, :, None, :]
        values = _linear(self.d_out, self.d_in, self.qkv_bias, "W_value")(x)[:, :, None, :]
        out = dot_product_attention(
            queries,
            keys,
            values,
            is_causal=True,
            dropout_rate=rate,
            dropout_rng=dropout_rng(self, rate),
            implementation=self.implementation,
        )[:, :, 0, :]
        return out[0] if unbatched else out


class MultiHeadAttentionWrapper(nn.Module):
    """Section 3.6.1: ``num_heads`` independent :class:`CausalAttention` heads
    (``heads_0``, ``heads_1``...), outputs concatenated: ``[..., T, num_heads * d_out]``."""

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False
    deterministic: bool | None = None
    implementation: str | None = None

    def __post_init__(self):
        name = type(self).__name__
        for field in ("d_in", "d_out", "context_length", "num_heads"):
            check_positive_int(name, field, getattr(self, field))
        check_dropout_rate(name, self.dropout)
        super().__post_init__()

    def setup(self):
        self.heads = [
            CausalAttention(
                self.d_in,
                self.d_out,
                self.context_length,
                self.dropout,
                self.qkv_bias,
                deterministic=self.deterministic,
                implementation=self.implementation,
            )
            for _ in range(self.num_heads)
        ]

    def __call__(self, x, deterministic: bool | None = None):
        return jnp.concatenate([head(x, deterministic) for head in self.heads], axis=-1)


class MultiHeadAttention(nn.Module):
    """Section 3.6.2: one projection split into ``num_heads`` heads, causal attention
    with dropout, heads merged and mixed by ``out_proj`` (with bias).

    ``d_out`` must be divisible by ``num_heads``; head dim ``H = d_out // num_heads``.
    ``MultiHeadAttention(768, 768, 1024, 0.0, 12)`` has 2,360,064 parameters.

    Keyword-only options:

    * ``num_kv_heads`` (default ``num_heads``): GQA/MQA. ``W_key`` and ``W_value``
      project to ``num_kv_heads * H`` features; query head ``n`` uses key/value head
      ``n // (num_heads // num_kv_heads)``.
    * ``decode=True``: KV-cache decoding (see :mod:`jax_attn.kv_cache`). ``init``
      allocates the cache ``[B, context_length, num_kv_heads, H]`` in the ``"cache"``
      collection (and returns the ordinary causal pass); each
      ``apply(variables, x, mutable=["cache"])`` writes any number of new tokens
      ``x [B, T, d_in]`` and attends causally over everything cached. ``lengths [B]``
      marks how many of the ``T`` tokens are real when prompts of different lengths
      share a padded batch. Overflow past ``context_length`` raises (eagerly, or via
      ``checkify`` under ``jit``: wrap with :func:`jax_attn.kv_cache.checked`).
    """

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False
    deterministic: bool | None = dataclasses.field(default=None, kw_only=True)
    implementation: str | None = dataclasses.field(default=None, kw_only=True)
    decode: bool = dataclasses.field(default=False, kw_only=True)
    num_kv_heads: int | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        name = type(self).__name__
        for field in ("d_in", "d_out", "context_length", "num_heads"):
            check_positive_int(name, field, getattr(self, field))
        check_dropout_rate(name, self.dropout)
        if self.d_out % self.num_heads:
            raise ValueError(
                f"{name}: d_out={self.d_out} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_kv_heads is not None:
            check_positive_int(name, "num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"{name}: num_heads={self.num_heads} must be divisible by "
                    f"num_kv_heads={self.num_kv_heads}"
                )
        if not isinstance(self.decode, bool):
            raise TypeError(f"{name}: decode must be a bool, got {self.decode!r}")
        super().__post_init__()

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None, *, lengths=None):
        name = type(self).__name__
        if lengths is not None and not self.decode:
            raise ValueError(f"{name}: lengths (real new tokens per sequence) needs decode=True")
        x, unbatched = as_batch(name, x, self.d_in, self.context_length)
        deterministic = resolve_deterministic(
            name, self.deterministic, deterministic, self.dropout, self.is_initializing()
        )
        rate = 0.0 if deterministic else float(self.dropout)
        head_dim = self.d_out // self.num_heads
        K = self.kv_heads
        # [B, T, N, H]
        queries = split_heads(
            _linear(self.d_out, self.d_in, self.qkv_bias, "W_query")(x), self.num_heads
        )
        # [B, T, K, H]
        keys = split_heads(_linear(K * head_dim, self.d_in, self.qkv_bias, "W_key")(x), K)
        values = split_heads(_linear(K * head_dim, self.d_in, self.qkv_bias, "W_value")(x), K)
        attention_kwargs = dict(
            dropout_rate=rate,
            dropout_rng=dropout_rng(self, rate),
            implementation=self.implementation,
        )
        if self.decode and self.has_variable("cache", "cached_key"):
            context = self._attend_cached(queries, keys, values, lengths, attention_kwargs)
        else:
            if self.decode:
                self._allocate_cache(x.shape[0], head_dim, keys.dtype)
            context = dot_product_attention(
                queries, keys, values, is_causal=True, **attention_kwargs
            )
        out = _linear(self.d_out, self.d_out, True, "out_proj")(merge_heads(context))
        return out[0] if unbatched else out

    def _allocate_cache(self, batch_size: int, head_dim: int, dtype):
        empty = kv_cache.init_cache(batch_size, self.context_length, self.kv_heads, head_dim, dtype)
        self.variable("cache", "cached_key", lambda: empty.key)
        self.variable("cache", "cached_value", lambda: empty.value)
        self.variable("cache", "cache_index", lambda: empty.index)

    def _attend_cached(self, queries, keys, values, lengths, attention_kwargs):
        cached_key = self.variable("cache", "cached_key")
        cached_value = self.variable("cache", "cached_value")
        cache_index = self.variable("cache", "cache_index")
        cache = kv_cache.KVCache(cached_key.value, cached_value.value, cache_index.value)
        context, cache = kv_cache.decode_attention(
            cache, queries, keys, values, lengths=lengths, **attention_kwargs
        )
        cached_key.value, cached_value.value, cache_index.value = cache
        return context
