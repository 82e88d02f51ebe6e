"""The book's attention classes as thin ``flax.linen`` modules.

Inputs are ``[T, d_in]`` or ``[B, T, d_in]``. Parameters are named as in the book
(``W_query``, ``W_key``, ``W_value``, ``out_proj``, ``heads_0``...) so
:mod:`jax_attn.interop` maps them to and from the PyTorch ``state_dict``. Dropout
uses the ``"dropout"`` RNG stream and a ``deterministic`` flag given at construction
or call (the call wins). The attention itself is :func:`jax_attn.dot_product_attention`;
these modules hold parameters and shapes only. Each class declares its own fields (the
book's, then the keyword-only options) and builds its
:class:`~jax_attn.module_spec.AttentionSpec` from them; the checks and the per-call glue
are :mod:`jax_attn.module_spec`'s functions, shared with :mod:`jax_attn.nnx_modules`. So
``nn.remat(cls)``, ``nn.jit``, ``nn.vmap``, ``nn.scan`` and subclasses work as on any
Flax module (a flag that steers Python, such as ``deterministic``, goes to the
constructor under those: they trace a call's keyword arguments).

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
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jax_attn import kv_cache
from jax_attn import module_spec as spec_lib
from jax_attn.module_spec import AttentionSpec, torch_linear_init

__all__ = [*spec_lib.BOOK_CLASSES, "torch_linear_init"]


_CACHE = ("cached_key", "cached_value", "cache_index")


class _BookAttention(nn.Module):
    """The Linen plumbing the five classes share. It declares no fields: each class
    declares its own, and ``attention_spec`` reads them."""

    @classmethod
    def _config_names(cls) -> tuple[str, ...]:
        """The class's fields (the book's arguments, then the keyword-only options), without
        Flax's ``parent`` and ``name``."""
        return tuple(
            field.name
            for field in dataclasses.fields(cls)
            if field.init and field.name not in ("parent", "name")
        )

    def attention_spec(self, owner: str | None = None) -> AttentionSpec:
        """This module's checked configuration, read off its fields; errors name ``owner``
        (default: the class)."""
        return spec_lib.spec_of(self, self._config_names(), owner)

    def __post_init__(self) -> None:
        self.attention_spec()  # argument errors at construction, naming the class
        super().__post_init__()

    def _owner(self) -> str:
        """``Class.init`` or ``Class.apply``: where an error comes from."""
        return f"{type(self).__name__}.{'init' if self.is_initializing() else 'apply'}"

    def _init(self, spec: AttentionSpec, name: str, leaf: str, init: Callable) -> Callable:
        names = spec_lib.partition_names(name, leaf, spec.model_axis)
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
            kernel_init=self._init(spec, name, "kernel", init),
            bias_init=self._init(spec, name, "bias", init),
            name=name,
            **spec_lib.projection_options(spec, name),
        )

    def _dropout_rate(self, spec: AttentionSpec, deterministic: bool | None) -> float:
        """The dropout rate this call applies; an error when it needs a missing rng.
        ``init`` given one key draws dropout from ``"params"``, as ``make_rng`` does."""
        initializing = self.is_initializing()
        deterministic = spec_lib.resolve_deterministic(
            spec.owner, spec.deterministic, deterministic, spec.dropout, initializing
        )
        if deterministic or spec.dropout == 0.0:
            return 0.0
        if not (self.has_rng("dropout") or (initializing and self.has_rng("params"))):
            raise ValueError(
                f"{spec.owner}: dropout={spec.dropout} with deterministic=False needs "
                "rngs={'dropout': key} (or deterministic=True), got no 'dropout' rng"
            )
        return float(spec.dropout)

    def _dropout(self, spec: AttentionSpec, deterministic: bool | None) -> dict[str, Any]:
        """``rate`` and ``rng`` for :func:`module_spec.attend`."""
        rate = self._dropout_rate(spec, deterministic)
        return {"rate": rate, "rng": self.make_rng("dropout") if rate else None}

    def _sow(self, spec: AttentionSpec, sow_weights: bool) -> Callable | None:
        if not spec_lib.check_sow_weights(spec.owner, sow_weights):
            return None
        return lambda weights: self.sow("intermediates", "attention_weights", weights)


class _SingleHead(_BookAttention):
    """The forward pass of the single-head classes (sections 3.4 and 3.5): the three
    projections of ``_projections``, then :func:`module_spec.single_head`."""

    def _projections(self, spec: AttentionSpec) -> Callable[[str, jax.Array], jax.Array]:
        """``project(name, h)``: ``nn.Linear``-style projections (``nn.Dense``)."""
        layers = {name: self._dense(spec, name) for name in spec_lib.PROJECTIONS}
        return lambda name, h: layers[name](h)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        x_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        sow_weights: bool = False,
    ) -> jax.Array:
        spec = self.attention_spec(self._owner())
        inputs = spec_lib.call_inputs(spec.owner, spec, x, x_kv, mask)
        return spec_lib.single_head(
            spec,
            self._projections(spec),
            inputs,
            **self._dropout(spec, deterministic),
            sow=self._sow(spec, sow_weights),
        )


class SelfAttentionV1(_SingleHead):
    """Section 3.4.1: ``W_query``, ``W_key``, ``W_value`` as ``[d_in, d_out]`` matrices,
    initialised uniform in ``[0, 1)`` like ``torch.rand``. Output ``[..., T, d_out]``."""

    d_in: int
    d_out: int
    _: dataclasses.KW_ONLY
    deterministic: bool | None = None
    is_causal: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    model_axis: str | None = None

    def _projections(self, spec: AttentionSpec) -> Callable[[str, jax.Array], jax.Array]:
        uniform01 = nn.initializers.uniform(scale=1.0)
        shape = (self.d_in, self.d_out)
        matrices = {
            name: self.param(name, self._init(spec, name, "", uniform01), shape, self.param_dtype)
            for name in spec_lib.PROJECTIONS
        }

        def project(name: str, h: jax.Array) -> jax.Array:
            dtype = self.dtype
            if dtype is None:
                dtype = spec_lib.promoted_dtype(h.dtype, self.param_dtype)
            return h.astype(dtype) @ matrices[name].astype(dtype)

        return project


class SelfAttentionV2(_SingleHead):
    """Section 3.4.2: ``nn.Linear``-style projections (kernel ``[d_in, d_out]``)."""

    d_in: int
    d_out: int
    qkv_bias: bool = False
    _: dataclasses.KW_ONLY
    deterministic: bool | None = None
    is_causal: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    model_axis: str | None = None


class CausalAttention(_SingleHead):
    """Section 3.5.3: single-head causal attention with dropout on the weights."""

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    qkv_bias: bool = False
    _: dataclasses.KW_ONLY
    deterministic: bool | None = None
    is_causal: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    model_axis: str | None = None


class MultiHeadAttentionWrapper(_BookAttention):
    """Section 3.6.1: ``num_heads`` independent :class:`CausalAttention` heads
    (``heads_0``, ``heads_1``...), outputs concatenated: ``[..., T, num_heads * d_out]``."""

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False
    _: dataclasses.KW_ONLY
    deterministic: bool | None = None
    is_causal: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    model_axis: str | None = None

    def attention_spec(self, owner: str | None = None) -> AttentionSpec:
        """The spec of one head (a :class:`CausalAttention` of width ``d_out``)."""
        return spec_lib.head_spec(self, self._config_names(), owner)

    def setup(self) -> None:
        spec = self.attention_spec()
        self.heads = [
            CausalAttention(
                self.d_in,
                self.d_out,
                self.context_length,
                self.dropout,
                self.qkv_bias,
                **spec_lib.options(spec),
            )
            for _ in range(self.num_heads)
        ]

    def __call__(
        self,
        x: jax.Array,
        x_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        sow_weights: bool = False,
    ) -> jax.Array:
        self._dropout_rate(self.attention_spec(self._owner()), deterministic)
        outs = [
            head(x, x_kv, mask=mask, deterministic=deterministic, sow_weights=sow_weights)
            for head in self.heads
        ]
        return jnp.concatenate(outs, axis=-1)


class MultiHeadAttention(_BookAttention):
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

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False
    _: dataclasses.KW_ONLY
    deterministic: bool | None = None
    is_causal: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    model_axis: str | None = None
    decode: bool = False
    num_kv_heads: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.attention_spec().kv_heads

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        x_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        sow_weights: bool = False,
        lengths: jax.Array | None = None,
    ) -> jax.Array:
        spec = self.attention_spec(self._owner())
        spec_lib.check_decode_call(spec.owner, self.decode, x_kv, mask, lengths, sow_weights)
        inputs = spec_lib.call_inputs(spec.owner, spec, x, x_kv, mask)
        dropout = self._dropout(spec, deterministic)
        layers = {name: self._dense(spec, name) for name in spec_lib.PROJECTIONS}

        def project(name: str, h: jax.Array, out_sharding=None) -> jax.Array:
            if name == "out_proj":
                return self._dense(spec, name, out_sharding)(h)
            return layers[name](h)

        attend_cached = None
        if self.decode and self.has_variable("cache", "cached_key"):

            def attend_cached(queries, keys, values):
                return self._attend_cached(spec, queries, keys, values, lengths, dropout)

        elif self.decode:
            dtype = self.dtype
            if dtype is None:
                dtype = spec_lib.promoted_dtype(inputs.x.dtype, self.param_dtype)
            self._allocate_cache(spec, inputs.x.shape[0], dtype)
        return spec_lib.multi_head(
            spec,
            project,
            inputs,
            attend_cached=attend_cached,
            sow=self._sow(spec, sow_weights),
            **dropout,
        )

    def _allocate_cache(self, spec: AttentionSpec, batch_size: int, dtype) -> None:
        empty = kv_cache.init_cache(
            batch_size, self.context_length, spec.kv_heads, spec.head_dim, dtype
        )
        for name, value in zip(_CACHE, empty, strict=True):
            self.variable("cache", name, lambda value=value: value)

    def _attend_cached(self, spec, queries, keys, values, lengths, dropout) -> jax.Array:
        cache: list[nn.Variable] = [self.variable("cache", name) for name in _CACHE]
        context, new = spec_lib.decode_step(
            spec, [v.value for v in cache], queries, keys, values, lengths=lengths, **dropout
        )
        for variable, value in zip(cache, new, strict=True):
            variable.value = value
        return context
