"""The book's attention classes as ``flax.nnx`` modules, on the same spec as the Linen ones.

Constructor arguments are the Linen modules' plus ``rngs=nnx.Rngs(params=..., dropout=...)``,
written out in each class's ``__init__``; the checks and the per-call glue are
:mod:`jax_attn.module_spec`'s functions. Parameters carry the
book's names (``W_query``, ``W_key``, ``W_value``, ``out_proj``; the wrapper's heads live in
``heads[0]``, ``heads[1]``...). The attention is :func:`jax_attn.dot_product_attention`;
these modules hold parameters, the dropout RNG stream and shapes only.

Dropout follows ``nnx.Dropout``'s conventions: ``deterministic`` at construction, at call,
or through ``model.train()`` / ``model.eval()`` (the call wins); the key comes from the
``rngs`` given at call (an ``nnx.Rngs``, an ``nnx.RngStream`` or a plain key), else from
the ``dropout`` stream forked at construction. Given the same key, an NNX and a Linen
module with the same parameters drop the same attention weights; :func:`linen_dropout_rng`
gives the key a Linen module derives from its ``rngs={"dropout": root}``.

The Flax options are the Linen modules' (``is_causal``, ``dtype``, ``param_dtype``,
``implementation``, ``model_axis`` at construction; ``mask=``, ``x_kv=``,
``sow_weights=True`` at call, the weights going to an ``nnx.Intermediate``). With
``model_axis`` the parameters carry NNX sharding metadata (``nnx.get_partition_spec``).

Linen parameters convert both ways with :func:`nnx_from_linen_params` and
:func:`linen_params_from_nnx`, so :mod:`jax_attn.interop`'s PyTorch ``state_dict``
converters serve these modules too:

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> from jax_attn.nnx_modules import MultiHeadAttention
>>> mha = MultiHeadAttention(4, 4, context_length=6, dropout=0.0, num_heads=2, rngs=nnx.Rngs(0))
>>> mha(jnp.ones((2, 6, 4))).shape
(2, 6, 4)
>>> params = linen_params_from_nnx(mha)          # Linen layout, book names
>>> y = mha.linen_module().apply({"params": params}, jnp.ones((6, 4)), deterministic=True)
>>> bool(jnp.allclose(y, mha(jnp.ones((6, 4)))))
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import flax.linen as flax_linen
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.core import meta

from jax_attn import kv_cache
from jax_attn import linen_modules as linen
from jax_attn import module_spec as spec_lib
from jax_attn.module_spec import AttentionSpec, torch_linear_init

if TYPE_CHECKING:
    from jax_attn.shapes import Array, Float, Int

__all__ = [
    *spec_lib.BOOK_CLASSES,
    "nnx_from_linen_params",
    "linen_params_from_nnx",
    "linen_dropout_rng",
]

RngsLike = nnx.Rngs | nnx.RngStream | jax.Array | None


def _check_rngs(owner: str, rngs) -> nnx.Rngs:
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"{owner}: rngs must be an nnx.Rngs (e.g. nnx.Rngs(params=0, dropout=1)), "
            f"got {type(rngs).__name__}"
        )
    return rngs


def _sharding_metadata(owner: str, name: str, leaf: str, model_axis: str | None) -> dict:
    """NNX sharding metadata of parameter ``name/leaf``; placed at creation only when a
    mesh is set (``jax.set_mesh``), else recorded for ``nnx.get_partition_spec``."""
    names = spec_lib.partition_names(name, leaf, model_axis)
    if names is None:
        return {}
    mesh = meta.get_global_mesh()
    if mesh is not None and model_axis not in mesh.axis_names:
        raise ValueError(
            f"{owner}: model_axis={model_axis!r} must be an axis of the current mesh "
            f"{tuple(mesh.axis_names)}"
        )
    return {"out_sharding": names, "eager_sharding": mesh is not None}


def _dropout_stream(rngs: nnx.Rngs, rate: float) -> nnx.RngStream | None:
    """A fork of the ``dropout`` stream (or ``default``), or ``None`` when there is neither."""
    if rate > 0.0 and ("dropout" in rngs or "default" in rngs):
        return rngs["dropout"].fork()
    return None


def _dropout_key(owner: str, at_call: RngsLike, stream: nnx.RngStream | None) -> jax.Array:
    """The dropout key: from the call's ``rngs`` if given, else from the module's stream."""
    source = at_call if at_call is not None else stream
    if isinstance(source, nnx.Rngs):
        return source["dropout"]()
    if isinstance(source, nnx.RngStream):
        return source()
    if isinstance(source, jax.Array):
        return source
    if source is None:
        raise ValueError(
            f"{owner}: dropout needs a key: pass rngs=nnx.Rngs(dropout=...) at construction "
            "or rngs= (an nnx.Rngs, RngStream or jax.random key) at call"
        )
    raise TypeError(
        f"{owner}: rngs must be an nnx.Rngs, nnx.RngStream or jax.random key, "
        f"got {type(source).__name__}"
    )


class _BookAttention(nnx.Module):
    """The NNX plumbing the five classes share. Each class keeps its own constructor
    arguments as attributes; ``_linen_class``, its Linen twin, names them (its fields), so
    ``attention_spec`` and ``linen_module`` read them off the module."""

    _linen_class: ClassVar[type[linen._BookAttention]]
    rngs: nnx.RngStream | None

    def attention_spec(self, owner: str | None = None) -> AttentionSpec:
        """This module's checked configuration; errors name ``owner`` (default: the class)."""
        return spec_lib.spec_of(self, self._linen_class._config_names(), owner)

    def linen_module(self) -> linen._BookAttention:
        """The Linen module with the same configuration: the same-named class of
        :mod:`jax_attn.linen_modules`, given this module's constructor arguments."""
        names = self._linen_class._config_names()
        return self._linen_class(**{name: getattr(self, name) for name in names})

    def _configure(
        self,
        deterministic: bool | None,
        is_causal: bool,
        dtype: Any,
        param_dtype: Any,
        implementation: str | None,
        model_axis: str | None,
        rngs: nnx.Rngs,
        /,
    ) -> AttentionSpec:
        """Keeps the keyword-only options every class takes (given in its signature's
        order) as attributes (``model.eval()`` sets ``deterministic``), checks ``rngs`` and
        returns the spec. Each class keeps its book arguments first, itself."""
        self.deterministic = deterministic
        self.is_causal = is_causal
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.implementation = implementation
        self.model_axis = model_axis
        spec = self.attention_spec()
        _check_rngs(spec.owner, rngs)
        return spec

    def _owner(self) -> str:
        return f"{type(self).__name__}.__call__"

    def _linear(self, spec: AttentionSpec, name: str, rngs: nnx.Rngs) -> nnx.Linear:
        """``nn.Linear``-initialised projection ``name``, kernel ``[fan_in, features]``."""
        init = torch_linear_init(spec.fan_in(name))
        return nnx.Linear(
            spec.fan_in(name),
            spec.features(name),
            promote_dtype=spec_lib.promote_dtype,
            kernel_init=init,
            bias_init=init,
            kernel_metadata=_sharding_metadata(spec.owner, name, "kernel", spec.model_axis),
            bias_metadata=_sharding_metadata(spec.owner, name, "bias", spec.model_axis),
            rngs=rngs,
            **spec_lib.projection_options(spec, name),
        )

    def _dropout(self, spec: AttentionSpec, deterministic: bool | None, rngs) -> dict:
        """``rate`` and ``rng`` for :func:`module_spec.attend`."""
        deterministic = spec_lib.resolve_deterministic(
            spec.owner, spec.deterministic, deterministic, spec.dropout
        )
        if deterministic or spec.dropout == 0.0:
            return {"rate": 0.0, "rng": None}
        return {"rate": spec.dropout, "rng": _dropout_key(spec.owner, rngs, self.rngs)}

    def _sow(self, spec: AttentionSpec, sow_weights: bool):
        if not spec_lib.check_sow_weights(spec.owner, sow_weights):
            return None
        return lambda weights: self.sow(nnx.Intermediate, "attention_weights", weights)


class _SingleHead(_BookAttention):
    """The forward pass of the single-head classes (sections 3.4 and 3.5): the three
    projections of ``_project``, then :func:`module_spec.single_head`."""

    def _project(self, name: str, h: jax.Array) -> jax.Array:
        """Projection ``name`` of ``h``: an ``nnx.Linear``."""
        layer: nnx.Linear = getattr(self, name)
        return layer(h)

    def __call__(
        self,
        x: Float[Array, "*B T d_in"],
        x_kv: Float[Array, "*B S d_in"] | None = None,
        *,
        mask=None,
        deterministic: bool | None = None,
        rngs: RngsLike = None,
        sow_weights: bool = False,
    ) -> Float[Array, "*B T d_out"]:
        spec = self.attention_spec(self._owner())
        inputs = spec_lib.call_inputs(spec.owner, spec, x, x_kv, mask)
        return spec_lib.single_head(
            spec,
            self._project,
            inputs,
            **self._dropout(spec, deterministic, rngs),
            sow=self._sow(spec, sow_weights),
        )


class SelfAttentionV1(_SingleHead):
    """Section 3.4.1: ``W_query``, ``W_key``, ``W_value`` as ``[d_in, d_out]`` matrices,
    initialised uniform in ``[0, 1)`` like ``torch.rand``. ``x [T, d_in]`` or
    ``[B, T, d_in]`` -> ``[..., T, d_out]``.

    >>> m = SelfAttentionV1(3, 2, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((6, 3))).shape
    (6, 2)
    """

    _linen_class = linen.SelfAttentionV1

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        deterministic: bool | None = None,
        is_causal: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        model_axis: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.d_in, self.d_out = d_in, d_out
        spec = self._configure(
            deterministic, is_causal, dtype, param_dtype, implementation, model_axis, rngs
        )
        shape = (spec.d_in, spec.d_out)
        self.W_query = self._matrix(spec, "W_query", shape, rngs)
        self.W_key = self._matrix(spec, "W_key", shape, rngs)
        self.W_value = self._matrix(spec, "W_value", shape, rngs)
        self.rngs = nnx.data(None)  # no dropout

    @staticmethod
    def _matrix(spec: AttentionSpec, name: str, shape, rngs: nnx.Rngs) -> nnx.Param:
        value = jax.random.uniform(rngs.params(), shape, spec.param_dtype)
        return nnx.Param(value, **_sharding_metadata(spec.owner, name, "", spec.model_axis))

    def _project(self, name: str, h: jax.Array) -> jax.Array:
        dtype = self.dtype
        if dtype is None:
            dtype = spec_lib.promoted_dtype(h.dtype, self.param_dtype)
        matrix: nnx.Param = getattr(self, name)
        return h.astype(dtype) @ matrix[...].astype(dtype)


class SelfAttentionV2(_SingleHead):
    """Section 3.4.2: ``nn.Linear``-style projections (kernel ``[d_in, d_out]``)."""

    _linen_class = linen.SelfAttentionV2

    def __init__(
        self,
        d_in: int,
        d_out: int,
        qkv_bias: bool = False,
        *,
        deterministic: bool | None = None,
        is_causal: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        model_axis: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.d_in, self.d_out, self.qkv_bias = d_in, d_out, qkv_bias
        spec = self._configure(
            deterministic, is_causal, dtype, param_dtype, implementation, model_axis, rngs
        )
        self.W_query = self._linear(spec, "W_query", rngs)
        self.W_key = self._linear(spec, "W_key", rngs)
        self.W_value = self._linear(spec, "W_value", rngs)
        self.rngs = nnx.data(None)  # no dropout


class CausalAttention(_SingleHead):
    """Section 3.5.3: single-head causal attention with dropout on the weights.

    >>> m = CausalAttention(3, 2, context_length=6, dropout=0.5, rngs=nnx.Rngs(0))
    >>> y_train = m(jnp.ones((6, 3)), deterministic=False)   # key from the dropout stream
    >>> m.eval()                                              # deterministic from now on
    >>> m(jnp.ones((6, 3))).shape
    (6, 2)
    """

    _linen_class = linen.CausalAttention

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        qkv_bias: bool = False,
        *,
        deterministic: bool | None = None,
        is_causal: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        model_axis: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.d_in, self.d_out, self.qkv_bias = d_in, d_out, qkv_bias
        self.context_length, self.dropout = context_length, dropout
        spec = self._configure(
            deterministic, is_causal, dtype, param_dtype, implementation, model_axis, rngs
        )
        self.W_query = self._linear(spec, "W_query", rngs)
        self.W_key = self._linear(spec, "W_key", rngs)
        self.W_value = self._linear(spec, "W_value", rngs)
        self.rngs = nnx.data(_dropout_stream(rngs, spec.dropout))


class MultiHeadAttentionWrapper(_BookAttention):
    """Section 3.6.1: ``num_heads`` independent :class:`CausalAttention` heads in
    ``heads``, outputs concatenated: ``[..., T, num_heads * d_out]``.

    Each head forks its own dropout stream. At call, ``rngs`` may also be a plain key
    (split into one key per head with ``jax.random.split(key, num_heads)``) or a list of
    ``num_heads`` keys, one per head.
    """

    _linen_class = linen.MultiHeadAttentionWrapper

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        *,
        deterministic: bool | None = None,
        is_causal: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        model_axis: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.d_in, self.d_out, self.qkv_bias = d_in, d_out, qkv_bias
        self.context_length, self.dropout = context_length, dropout
        self.num_heads = num_heads
        spec = self._configure(
            deterministic, is_causal, dtype, param_dtype, implementation, model_axis, rngs
        )
        self.heads = nnx.List(
            CausalAttention(
                d_in,
                d_out,
                context_length,
                dropout,
                qkv_bias,
                **spec_lib.options(spec),
                rngs=rngs,
            )
            for _ in range(num_heads)
        )
        self.rngs = nnx.data(None)  # each head has its own

    def attention_spec(self, owner: str | None = None) -> AttentionSpec:
        """The spec of one head (a :class:`CausalAttention` of width ``d_out``)."""
        return spec_lib.head_spec(self, self._linen_class._config_names(), owner)

    def __call__(
        self,
        x: Float[Array, "*B T d_in"],
        x_kv: Float[Array, "*B S d_in"] | None = None,
        *,
        mask=None,
        deterministic: bool | None = None,
        rngs: RngsLike | list[jax.Array] = None,
        sow_weights: bool = False,
    ) -> Float[Array, "*B T d_out"]:
        if deterministic is None:
            deterministic = self.deterministic
        head_rngs: list = [rngs] * self.num_heads
        if isinstance(rngs, jax.Array):
            head_rngs = list(jax.random.split(rngs, self.num_heads))
        elif isinstance(rngs, list | tuple):
            if len(rngs) != self.num_heads:
                raise ValueError(
                    f"{self._owner()}: rngs as a list needs one key per head, "
                    f"{self.num_heads}, got {len(rngs)}"
                )
            head_rngs = list(rngs)
        outs = [
            head(
                x,
                x_kv,
                mask=mask,
                deterministic=deterministic,
                rngs=head_rng,
                sow_weights=sow_weights,
            )
            for head, head_rng in zip(self.heads, head_rngs, strict=True)
        ]
        return jnp.concatenate(outs, axis=-1)


class MultiHeadAttention(_BookAttention):
    """Section 3.6.2: one projection split into ``num_heads`` heads, causal attention
    with dropout, heads merged and mixed by ``out_proj`` (with bias).

    ``d_out`` must be divisible by ``num_heads``; head dim ``H = d_out // num_heads``.

    Keyword-only options, as in :class:`jax_attn.linen_modules.MultiHeadAttention`:

    * ``num_kv_heads`` (default ``num_heads``): GQA/MQA; ``W_key`` and ``W_value``
      project to ``num_kv_heads * H`` features.
    * ``decode=True`` (or ``decode=`` at call): KV-cache decoding with the pure functions
      of :mod:`jax_attn.kv_cache`. :meth:`init_cache` allocates ``cached_key``,
      ``cached_value`` ``[B, S_max, num_kv_heads, H]`` and ``cache_index [B]``
      as ``nnx.Cache`` variables; each call then writes its ``T`` new tokens and attends
      causally over everything cached. ``lengths [B]`` marks how many of the ``T`` tokens
      are real when prompts of different lengths share a padded batch. Overflow past
      the cache is :mod:`jax_attn.kv_cache`'s to report.

    >>> mha = MultiHeadAttention(4, 4, 8, 0.0, 2, decode=True, rngs=nnx.Rngs(0))
    >>> mha.init_cache(batch_size=1)
    >>> prompt = mha(jnp.ones((1, 3, 4)))           # prefill 3 tokens
    >>> step = mha(jnp.ones((1, 1, 4)))             # then one token at a time
    >>> mha.cache_index[...].tolist()
    [4]
    """

    _linen_class = linen.MultiHeadAttention
    cached_key: nnx.Cache | None
    cached_value: nnx.Cache | None
    cache_index: nnx.Cache | None

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        *,
        deterministic: bool | None = None,
        is_causal: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        model_axis: str | None = None,
        decode: bool = False,
        num_kv_heads: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.d_in, self.d_out, self.qkv_bias = d_in, d_out, qkv_bias
        self.context_length, self.dropout = context_length, dropout
        self.num_heads, self.num_kv_heads, self.decode = num_heads, num_kv_heads, decode
        spec = self._configure(
            deterministic, is_causal, dtype, param_dtype, implementation, model_axis, rngs
        )
        self.head_dim = spec.head_dim
        self.W_query = self._linear(spec, "W_query", rngs)
        self.W_key = self._linear(spec, "W_key", rngs)
        self.W_value = self._linear(spec, "W_value", rngs)
        self.out_proj = self._linear(spec, "out_proj", rngs)
        self.rngs = nnx.data(_dropout_stream(rngs, spec.dropout))
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)

    @property
    def kv_heads(self) -> int:
        """``K``: ``num_kv_heads``, or ``num_heads`` when it is ``None``."""
        return self.attention_spec().kv_heads

    def init_cache(
        self,
        input_shape: int | Sequence[int] | None = None,
        dtype: Any = None,
        *,
        batch_size: int | None = None,
    ) -> None:
        """Allocates an empty KV cache (replacing any old one).

        ``init_cache(batch_size)`` holds ``context_length`` tokens per sequence;
        ``init_cache((B, S_max, d_in), dtype)``, Flax's ``MultiHeadAttention.init_cache``
        form, holds ``S_max <= context_length``. The cache is kept in ``dtype``, by
        default the compute dtype (``dtype`` given at construction, else
        ``param_dtype``); a step in another compute dtype stores its keys and values in
        the cache's dtype and attends in it, and returns the compute dtype.
        """
        owner = f"{type(self).__name__}.init_cache"
        if (input_shape is None) == (batch_size is None):
            raise TypeError(
                f"{owner}: give batch_size or input_shape (B, S_max, d_in), exactly one; "
                f"got batch_size={batch_size!r}, input_shape={input_shape!r}"
            )
        length = self.context_length
        if isinstance(input_shape, Sequence):
            shape = tuple(input_shape)
            if len(shape) != 3 or shape[-1] != self.d_in or not 0 < shape[1] <= length:
                raise ValueError(
                    f"{owner}: input_shape must be (B, S_max, d_in={self.d_in}) with "
                    f"0 < S_max <= context_length={length}, got {shape}"
                )
            batch_size, length = shape[0], shape[1]
        elif input_shape is not None:
            batch_size = input_shape
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        spec_lib.check_float_dtype(owner, "dtype", dtype)
        assert batch_size is not None  # one of the two was given (checked above)
        empty = kv_cache.init_cache(batch_size, length, self.kv_heads, self.head_dim, dtype)
        self.cached_key = nnx.Cache(empty.key)
        self.cached_value = nnx.Cache(empty.value)
        self.cache_index = nnx.Cache(empty.index)

    def _project(self, name: str, h: jax.Array, out_sharding=None) -> jax.Array:
        layer: nnx.Linear = getattr(self, name)
        return layer(h, out_sharding=out_sharding)

    def __call__(
        self,
        x: Float[Array, "*B T d_in"],
        x_kv: Float[Array, "*B S d_in"] | None = None,
        *,
        mask=None,
        deterministic: bool | None = None,
        rngs: RngsLike = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        lengths: Int[Array, " B"] | None = None,
    ) -> Float[Array, "*B T d_out"]:
        spec = self.attention_spec(self._owner())
        decode = self.decode if decode is None else decode
        spec_lib.check_decode_call(spec.owner, decode, x_kv, mask, lengths, sow_weights)
        inputs = spec_lib.call_inputs(spec.owner, spec, x, x_kv, mask)
        dropout = self._dropout(spec, deterministic, rngs)
        attend_cached = None
        if decode:

            def attend_cached(queries, keys, values):
                return self._attend_cached(spec, queries, keys, values, lengths, dropout)

        return spec_lib.multi_head(
            spec,
            self._project,
            inputs,
            attend_cached=attend_cached,
            sow=self._sow(spec, sow_weights),
            **dropout,
        )

    def _attend_cached(self, spec, queries, keys, values, lengths, dropout) -> jax.Array:
        owner = spec.owner
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError(
                f"{owner}: decode=True needs a cache: call init_cache(batch_size) first"
            )
        batch_size = self.cached_key.shape[0]
        if queries.shape[0] != batch_size:
            raise ValueError(
                f"{owner}: x has batch {queries.shape[0]}, but the cache was made by "
                f"init_cache(batch_size={batch_size})"
            )
        cache = (self.cached_key[...], self.cached_value[...], self.cache_index[...])
        # A cache kept in another dtype than this step computes in (init_cache's dtype):
        # the new keys and values are stored in it and attention runs in it.
        compute, stored = queries.dtype, cache[0].dtype
        queries, keys, values = (a.astype(stored) for a in (queries, keys, values))
        context, cache = spec_lib.decode_step(
            spec, cache, queries, keys, values, lengths=lengths, **dropout
        )
        self.cached_key[...], self.cached_value[...], self.cache_index[...] = cache
        return context.astype(compute)


def linen_dropout_rng(rng: jax.Array, *path: str) -> jax.Array:
    """The key Linen's ``make_rng("dropout")`` gives, on its first call, the module at
    ``path`` of a model applied with ``rngs={"dropout": rng}`` (``()`` is the top module;
    ``"heads_0"`` the wrapper's first head). Pass it as ``rngs=`` to the NNX module to get
    the same dropout mask as that Linen module:

    >>> model = CausalAttention(3, 2, 6, 0.5, rngs=nnx.Rngs(0))
    >>> x, root = jnp.ones((6, 3)), jax.random.key(7)
    >>> params = linen_params_from_nnx(model)
    >>> y_linen = model.linen_module().apply(
    ...     {"params": params}, x, deterministic=False, rngs={"dropout": root})
    >>> y_nnx = model(x, deterministic=False, rngs=linen_dropout_rng(root))
    >>> bool(jnp.allclose(y_nnx, y_linen, atol=1e-6))
    True
    """
    for name in path:
        if not isinstance(name, str) or not name:
            raise TypeError(f"linen_dropout_rng: path entries must be module names, got {name!r}")

    class _Probe(flax_linen.Module):
        depth: int = 0

        @flax_linen.compact
        def __call__(self):
            if self.depth == len(path):
                return self.make_rng("dropout")
            return _Probe(self.depth + 1, name=path[self.depth])()

    # apply returns the output alone here (nothing is mutable)
    return cast(jax.Array, _Probe().apply({}, rngs={"dropout": rng}))


# --- Linen <-> NNX parameters -------------------------------------------------------------


def _check_module(owner: str, module) -> None:
    if not isinstance(module, _BookAttention):
        names = ", ".join(spec_lib.BOOK_CLASSES)
        raise TypeError(
            f"{owner}: module must be a jax_attn.nnx_modules module ({names}), "
            f"got {type(module).__name__}"
        )


def _linen_path(path: tuple) -> tuple:
    """``("heads", 0, "W_query", "kernel")`` -> ``("heads_0", "W_query", "kernel")``."""
    if path[0] == "heads":
        return (f"heads_{path[1]}", *path[2:])
    return path


def _nnx_params(module) -> tuple[nnx.State, dict[tuple, jax.Array]]:
    state = nnx.state(module, nnx.Param)
    return state, traverse_util.flatten_dict(nnx.to_pure_dict(state))


def linen_params_from_nnx(module) -> dict:
    """The module's parameters in the Linen layout: ``linen_module().apply({"params": p}, x)``
    gives the same output as ``module(x)``."""
    _check_module("linen_params_from_nnx", module)
    _, flat = _nnx_params(module)
    return traverse_util.unflatten_dict({_linen_path(p): v for p, v in flat.items()})


def nnx_from_linen_params(module, params: dict):
    """Loads Linen ``params`` (as from ``linen_module().init`` or
    :func:`jax_attn.interop.params_from_torch`; partition boxes are unboxed) into the NNX
    ``module``, in place, and returns it. Names and shapes must match exactly; a mismatch
    is a ``ValueError`` naming the parameter."""
    _check_module("nnx_from_linen_params", module)
    if not hasattr(params, "items"):
        kind = type(params).__name__
        raise TypeError(f"nnx_from_linen_params: params must be a dict, got {kind}")
    if set(params) == {"params"}:
        params = params["params"]
    given = traverse_util.flatten_dict(meta.unbox(params))
    state, nnx_flat = _nnx_params(module)
    expected = {_linen_path(p): p for p in nnx_flat}
    missing = sorted("/".join(map(str, p)) for p in expected.keys() - given.keys())
    extra = sorted("/".join(map(str, p)) for p in given.keys() - expected.keys())
    if missing or extra:
        raise ValueError(
            f"nnx_from_linen_params: params for {type(module).__name__} must hold exactly "
            f"{sorted('/'.join(map(str, p)) for p in expected)}; missing {missing}, "
            f"unexpected {extra}"
        )
    for linen_path, nnx_path in expected.items():
        want, got = nnx_flat[nnx_path], given[linen_path]
        if jnp.shape(got) != want.shape:
            raise ValueError(
                f"nnx_from_linen_params: {'/'.join(map(str, linen_path))} must have shape "
                f"{list(want.shape)}, got {list(jnp.shape(got))}"
            )
        nnx_flat[nnx_path] = jnp.asarray(got, want.dtype)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(nnx_flat))
    nnx.update(module, state)
    return module
