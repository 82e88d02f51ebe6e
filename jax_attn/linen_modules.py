"""The book's attention classes as thin ``flax.linen`` modules.

Inputs are ``[T, d_in]`` or ``[B, T, d_in]``. Parameters are named as in the book
(``W_query``, ``W_key``, ``W_value``, ``out_proj``, ``heads_0``...) so
:mod:`jax_attn.interop` maps them to and from the PyTorch ``state_dict``. Dropout
uses the ``"dropout"`` RNG stream and a ``deterministic`` flag given at construction
or call (the call wins). The attention itself is :func:`jax_attn.dot_product_attention`;
these modules hold parameters and shapes only. Fields, checks and the per-call glue are
:mod:`jax_attn.module_spec`'s, shared with :mod:`jax_attn.nnx_modules`.

Every class also takes, by keyword: ``is_causal``, ``dtype`` / ``param_dtype`` (as
``nn.Dense``), ``implementation`` (passed to :func:`jax_attn.dot_product_attention`) and
``model_axis`` (partition metadata: heads split over that mesh axis, read with
``nn.get_partition_spec``); at call ``deterministic=``, ``mask=`` (bool, broadcastable to
``[B, N, T, S]``, combined with ``is_causal``), ``x_kv=`` (keys and values from another
sequence) and ``sow_weights=True`` (the weights ``[B, N, T, S]`` in ``"intermediates"``).

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
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from jax_attn import kv_cache
from jax_attn import module_spec as spec_lib
from jax_attn.module_spec import AttentionSpec, torch_linear_init

__all__ = [*spec_lib.CLASS_FIELDS, "torch_linear_init"]


_CACHE = ("cached_key", "cached_value", "cache_index")


def _kw(default):
    return dataclasses.field(default=default, kw_only=True)


def _compute_dtype(module, x):
    """``dtype``, or the promotion of ``x``'s and the params' dtypes (as ``nn.Dense``)."""
    if module.dtype is not None:
        return module.dtype
    return spec_lib.compute_dtype(x.dtype, module.param_dtype)


class _BookAttention(nn.Module):
    """The keyword-only options and the Linen plumbing the five classes share."""

    deterministic: bool | None = _kw(None)
    is_causal: bool = _kw(True)
    dtype: Any = _kw(None)
    param_dtype: Any = _kw(jnp.float32)
    implementation: str | None = _kw(None)
    model_axis: str | None = _kw(None)

    def __post_init__(self):
        AttentionSpec.of(self)
        super().__post_init__()

    @property
    def spec(self) -> AttentionSpec:
        return AttentionSpec.of(self)

    def _owner(self) -> str:
        """``Class.init`` or ``Class.apply``: where an error comes from."""
        return f"{type(self).__name__}.{'init' if self.is_initializing() else 'apply'}"

    def _init(self, name: str, leaf: str, init):
        names = spec_lib.partition_names(name, leaf, self.model_axis)
        return init if names is None else nn.with_partitioning(init, names)

    def _dense(self, spec: AttentionSpec, name: str, out_sharding=None) -> nn.Dense:
        init = torch_linear_init(spec.fan_in(name))
        dot_general = None
        if out_sharding is not None:
            dot_general = functools.partial(lax.dot_general, out_sharding=out_sharding)
        return nn.Dense(
            spec.features(name),
            promote_dtype=spec_lib.promote_dtype_linen,
            dot_general=dot_general,
            kernel_init=self._init(name, "kernel", init),
            bias_init=self._init(name, "bias", init),
            name=name,
            **spec_lib.projection_options(spec, name),
        )

    def _dropout_rate(self, owner: str, spec: AttentionSpec, deterministic: bool | None):
        """The dropout rate this call applies; an error when it needs a missing rng.
        ``init`` given one key draws dropout from ``"params"``, as ``make_rng`` does."""
        initializing = self.is_initializing()
        deterministic = spec_lib.resolve_deterministic(
            owner, self.deterministic, deterministic, spec.dropout, initializing
        )
        if deterministic or spec.dropout == 0.0:
            return 0.0
        if not (self.has_rng("dropout") or (initializing and self.has_rng("params"))):
            raise ValueError(
                f"{owner}: dropout={spec.dropout} with deterministic=False needs "
                "rngs={'dropout': key} (or deterministic=True), got no 'dropout' rng"
            )
        return float(spec.dropout)

    def _dropout(self, owner: str, spec: AttentionSpec, deterministic: bool | None) -> dict:
        """``rate`` and ``rng`` for :func:`module_spec.attend`."""
        rate = self._dropout_rate(owner, spec, deterministic)
        return {"rate": rate, "rng": self.make_rng("dropout") if rate else None}

    def _sow(self, sow_weights: bool):
        if not spec_lib.check_sow_weights(self._owner(), sow_weights):
            return None
        return lambda weights: self.sow("intermediates", "attention_weights", weights)

    def _single_head(self, project, x, x_kv, mask, deterministic, sow_weights):
        owner = self._owner()
        spec = AttentionSpec.of(self, owner)
        inputs = spec_lib.call_inputs(owner, spec, x, x_kv, mask)
        return spec_lib.single_head(
            spec,
            project,
            inputs,
            **self._dropout(owner, spec, deterministic),
            sow=self._sow(sow_weights),
        )


class SelfAttentionV1(_BookAttention):
    """Section 3.4.1: ``W_query``, ``W_key``, ``W_value`` as ``[d_in, d_out]`` matrices,
    initialised uniform in ``[0, 1)`` like ``torch.rand``. Output ``[..., T, d_out]``."""

    d_in: int
    d_out: int
    is_causal: bool = _kw(False)

    @nn.compact
    def __call__(self, x, x_kv=None, *, mask=None, deterministic=None, sow_weights: bool = False):
        uniform01 = nn.initializers.uniform(scale=1.0)
        shape = (self.d_in, self.d_out)
        matrices = {
            name: self.param(name, self._init(name, "", uniform01), shape, self.param_dtype)
            for name in spec_lib.PROJECTIONS
        }

        def project(name, h):
            dtype = _compute_dtype(self, h)
            return h.astype(dtype) @ matrices[name].astype(dtype)

        return self._single_head(project, x, x_kv, mask, deterministic, sow_weights)


class _DenseSingleHead(_BookAttention):
    """One head from three ``nn.Dense`` projections (SelfAttentionV2, CausalAttention)."""

    @nn.compact
    def __call__(self, x, x_kv=None, *, mask=None, deterministic=None, sow_weights: bool = False):
        spec = self.spec
        layers = {name: self._dense(spec, name) for name in spec_lib.PROJECTIONS}
        return self._single_head(
            lambda name, h: layers[name](h), x, x_kv, mask, deterministic, sow_weights
        )


class SelfAttentionV2(_DenseSingleHead):
    """Section 3.4.2: ``nn.Linear``-style projections (kernel ``[d_in, d_out]``)."""

    d_in: int
    d_out: int
    qkv_bias: bool = False
    is_causal: bool = _kw(False)


class CausalAttention(_DenseSingleHead):
    """Section 3.5.3: single-head causal attention with dropout on the weights."""

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    qkv_bias: bool = False


class _MultiHead(_BookAttention):
    """The book's arguments of MultiHeadAttentionWrapper and MultiHeadAttention."""

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False


class MultiHeadAttentionWrapper(_MultiHead):
    """Section 3.6.1: ``num_heads`` independent :class:`CausalAttention` heads
    (``heads_0``, ``heads_1``...), outputs concatenated: ``[..., T, num_heads * d_out]``."""

    def setup(self):
        options = {name: getattr(self, name) for name in spec_lib.OPTIONS}
        self.heads = [
            CausalAttention(
                self.d_in, self.d_out, self.context_length, self.dropout, self.qkv_bias, **options
            )
            for _ in range(self.num_heads)
        ]

    def __call__(self, x, x_kv=None, *, mask=None, deterministic=None, sow_weights: bool = False):
        owner = self._owner()
        self._dropout_rate(owner, AttentionSpec.of(self, owner), deterministic)
        outs = [
            head(x, x_kv, mask=mask, deterministic=deterministic, sow_weights=sow_weights)
            for head in self.heads
        ]
        return jnp.concatenate(outs, axis=-1)


class MultiHeadAttention(_MultiHead):
    """Section 3.6.2: one projection split into ``num_heads`` heads, causal attention
    with dropout, heads merged and mixed by ``out_proj`` (with bias).

    ``d_out`` must be divisible by ``num_heads``; head dim ``H = d_out // num_heads``.
    ``MultiHeadAttention(768, 768, 1024, 0.0, 12)`` has 2,360,064 parameters.

    Keyword-only options, besides those of every class:

    * ``num_kv_heads`` (default ``num_heads``): GQA/MQA. ``W_key`` and ``W_value``
      project to ``num_kv_heads * H`` features; query head ``n`` uses key/value head
      ``n // (num_heads // num_kv_heads)``.
    * ``decode=True``: KV-cache decoding (see :mod:`jax_attn.kv_cache`). ``init``
      allocates the cache ``[B, context_length, num_kv_heads, H]`` in the ``"cache"``
      collection (and returns the ordinary causal pass); each
      ``apply(variables, x, mutable=["cache"])`` writes any number of new tokens
      ``x [B, T, d_in]`` and attends causally over everything cached. ``lengths [B]``
      marks how many of the ``T`` tokens are real when prompts of different lengths
      share a padded batch. Overflow past ``context_length`` is
      :mod:`jax_attn.kv_cache`'s to report.
    """

    decode: bool = _kw(False)
    num_kv_heads: int | None = _kw(None)

    @property
    def kv_heads(self) -> int:
        return self.spec.kv_heads

    @nn.compact
    def __call__(
        self,
        x,
        x_kv=None,
        *,
        mask=None,
        deterministic=None,
        sow_weights: bool = False,
        lengths=None,
    ):
        owner = self._owner()
        spec = AttentionSpec.of(self, owner)
        spec_lib.check_decode_call(owner, self.decode, x_kv, mask, lengths, sow_weights)
        inputs = spec_lib.call_inputs(owner, spec, x, x_kv, mask)
        dropout = self._dropout(owner, spec, deterministic)
        layers = {name: self._dense(spec, name) for name in spec_lib.PROJECTIONS}

        def project(name, h, out_sharding=None):
            if name == "out_proj":
                return self._dense(spec, name, out_sharding)(h)
            return layers[name](h)

        attend_cached = None
        if self.decode and self.has_variable("cache", "cached_key"):

            def attend_cached(queries, keys, values):
                return self._attend_cached(spec, queries, keys, values, lengths, dropout)

        elif self.decode:
            dtype = _compute_dtype(self, inputs.x)
            self._allocate_cache(inputs.x.shape[0], spec, dtype)
        return spec_lib.multi_head(
            spec,
            project,
            inputs,
            attend_cached=attend_cached,
            sow=self._sow(sow_weights),
            **dropout,
        )

    def _allocate_cache(self, batch_size: int, spec: AttentionSpec, dtype):
        empty = kv_cache.init_cache(
            batch_size, self.context_length, spec.kv_heads, spec.head_dim, dtype
        )
        for name, value in zip(_CACHE, empty, strict=True):
            self.variable("cache", name, lambda value=value: value)

    def _attend_cached(self, spec, queries, keys, values, lengths, dropout):
        cache = [self.variable("cache", name) for name in _CACHE]
        context, new = spec_lib.decode_step(
            spec, [v.value for v in cache], queries, keys, values, lengths=lengths, **dropout
        )
        for variable, value in zip(cache, new, strict=True):
            variable.value = value
        return context
