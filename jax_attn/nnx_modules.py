"""The book's attention classes as ``flax.nnx`` modules, on the Linen modules' core.

Constructor arguments are the Linen modules' plus ``rngs=nnx.Rngs(params=..., dropout=...)``.
Parameters carry the book's names (``W_query``, ``W_key``, ``W_value``, ``out_proj``; the
wrapper's heads live in ``heads[0]``, ``heads[1]``...). The attention is
:func:`jax_attn.dot_product_attention`; these modules hold parameters, the dropout RNG
stream and shapes only.

Dropout follows ``nnx.Dropout``'s conventions: ``deterministic`` at construction, at call,
or through ``model.train()`` / ``model.eval()`` (the call wins); the key comes from the
``rngs`` given at call (an ``nnx.Rngs``, an ``nnx.RngStream`` or a plain key), else from
the ``dropout`` stream forked at construction. Given the same key, an NNX and a Linen
module with the same parameters drop the same attention weights; :func:`linen_dropout_rng`
gives the key a Linen module derives from its ``rngs={"dropout": root}``.

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

from typing import TYPE_CHECKING, Any

import flax.linen as flax_linen
import jax
import jax.numpy as jnp
from flax import nnx

from jax_attn import kv_cache
from jax_attn import linen_modules as linen
from jax_attn.dispatch import dot_product_attention
from jax_attn.functional import merge_heads, split_heads
from jax_attn.linen_modules import resolve_deterministic, torch_linear_init
from jax_attn.validation import as_batch, check_dropout_rate, check_positive_int

if TYPE_CHECKING:
    from jax_attn.shapes import Array, Float, Int

__all__ = [
    "SelfAttentionV1",
    "SelfAttentionV2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "nnx_from_linen_params",
    "linen_params_from_nnx",
    "linen_dropout_rng",
]

RngsLike = nnx.Rngs | nnx.RngStream | jax.Array | None


def _linear(d_in: int, d_out: int, use_bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    """``nn.Linear``-initialised projection, kernel ``[d_in, d_out]`` (Linen's layout)."""
    init = torch_linear_init(d_in)
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=init, bias_init=init, rngs=rngs)


def _check_rngs(owner: str, rngs) -> nnx.Rngs:
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"{owner}: rngs must be an nnx.Rngs (e.g. nnx.Rngs(params=0, dropout=1)), "
            f"got {type(rngs).__name__}"
        )
    return rngs


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


def _project_heads(module, x: Float[Array, "B T D"]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys, values ``[B, T, 1, d_out]`` (one head) from the three projections."""
    return tuple(proj(x)[:, :, None, :] for proj in (module.W_query, module.W_key, module.W_value))


class SelfAttentionV1(nnx.Module):
    """Section 3.4.1: ``W_query``, ``W_key``, ``W_value`` as ``[d_in, d_out]`` matrices,
    initialised uniform in ``[0, 1)`` like ``torch.rand``. ``x [T, d_in]`` or
    ``[B, T, d_in]`` -> ``[..., T, d_out]``.

    >>> m = SelfAttentionV1(3, 2, rngs=nnx.Rngs(0))
    >>> m(jnp.ones((6, 3))).shape
    (6, 2)
    """

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        check_positive_int("SelfAttentionV1", "d_in", d_in)
        check_positive_int("SelfAttentionV1", "d_out", d_out)
        rngs = _check_rngs("SelfAttentionV1", rngs)
        self.d_in, self.d_out = d_in, d_out
        shape = (d_in, d_out)
        self.W_query = nnx.Param(jax.random.uniform(rngs.params(), shape))
        self.W_key = nnx.Param(jax.random.uniform(rngs.params(), shape))
        self.W_value = nnx.Param(jax.random.uniform(rngs.params(), shape))

    def __call__(
        self, x: Float[Array, "*B T d_in"], *, deterministic: bool | None = None, rngs=None
    ) -> Float[Array, "*B T d_out"]:
        del deterministic, rngs  # no dropout here; accepted so every module takes them
        x, unbatched = as_batch("SelfAttentionV1", x, self.d_in)
        # [B, T, 1, d_out]
        queries, keys, values = (
            (x @ w[...])[:, :, None, :] for w in (self.W_query, self.W_key, self.W_value)
        )
        out = dot_product_attention(queries, keys, values)[:, :, 0, :]
        return out[0] if unbatched else out

    def linen_module(self) -> linen.SelfAttentionV1:
        """The Linen module with the same configuration."""
        return linen.SelfAttentionV1(self.d_in, self.d_out)


class SelfAttentionV2(nnx.Module):
    """Section 3.4.2: ``nn.Linear``-style projections (kernel ``[d_in, d_out]``)."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False, *, rngs: nnx.Rngs):
        check_positive_int("SelfAttentionV2", "d_in", d_in)
        check_positive_int("SelfAttentionV2", "d_out", d_out)
        rngs = _check_rngs("SelfAttentionV2", rngs)
        self.d_in, self.d_out, self.qkv_bias = d_in, d_out, bool(qkv_bias)
        self.W_query = _linear(d_in, d_out, self.qkv_bias, rngs)
        self.W_key = _linear(d_in, d_out, self.qkv_bias, rngs)
        self.W_value = _linear(d_in, d_out, self.qkv_bias, rngs)

    def __call__(
        self, x: Float[Array, "*B T d_in"], *, deterministic: bool | None = None, rngs=None
    ) -> Float[Array, "*B T d_out"]:
        del deterministic, rngs
        x, unbatched = as_batch("SelfAttentionV2", x, self.d_in)
        out = dot_product_attention(*_project_heads(self, x))[:, :, 0, :]
        return out[0] if unbatched else out

    def linen_module(self) -> linen.SelfAttentionV2:
        """The Linen module with the same configuration."""
        return linen.SelfAttentionV2(self.d_in, self.d_out, self.qkv_bias)


class CausalAttention(nnx.Module):
    """Section 3.5.3: single-head causal attention with dropout on the weights.

    >>> m = CausalAttention(3, 2, context_length=6, dropout=0.5, rngs=nnx.Rngs(0))
    >>> y_train = m(jnp.ones((6, 3)), deterministic=False)   # key from the dropout stream
    >>> m.eval()                                              # deterministic from now on
    >>> m(jnp.ones((6, 3))).shape
    (6, 2)
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        qkv_bias: bool = False,
        *,
        deterministic: bool | None = None,
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        name = type(self).__name__
        check_positive_int(name, "d_in", d_in)
        check_positive_int(name, "d_out", d_out)
        check_positive_int(name, "context_length", context_length)
        check_dropout_rate(name, dropout)
        rngs = _check_rngs(name, rngs)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.dropout, self.qkv_bias = float(dropout), bool(qkv_bias)
        self.deterministic, self.implementation = deterministic, implementation
        self.W_query = _linear(d_in, d_out, self.qkv_bias, rngs)
        self.W_key = _linear(d_in, d_out, self.qkv_bias, rngs)
        self.W_value = _linear(d_in, d_out, self.qkv_bias, rngs)
        self.rngs = nnx.data(_dropout_stream(rngs, self.dropout))

    def __call__(
        self,
        x: Float[Array, "*B T d_in"],
        *,
        deterministic: bool | None = None,
        rngs: RngsLike = None,
    ) -> Float[Array, "*B T d_out"]:
        name = type(self).__name__
        x, unbatched = as_batch(name, x, self.d_in, self.context_length)
        deterministic = resolve_deterministic(name, self.deterministic, deterministic, self.dropout)
        rate = 0.0 if deterministic else self.dropout
        out = dot_product_attention(
            *_project_heads(self, x),
            is_causal=True,
            dropout_rate=rate,
            dropout_rng=_dropout_key(name, rngs, self.rngs) if rate > 0.0 else None,
            implementation=self.implementation,
        )[:, :, 0, :]
        return out[0] if unbatched else out

    def linen_module(self) -> linen.CausalAttention:
        """The Linen module with the same configuration."""
        return linen.CausalAttention(
            self.d_in,
            self.d_out,
            self.context_length,
            self.dropout,
            self.qkv_bias,
            deterministic=self.deterministic,
            implementation=self.implementation,
        )


class MultiHeadAttentionWrapper(nnx.Module):
    """Section 3.6.1: ``num_heads`` independent :class:`CausalAttention` heads in
    ``heads``, outputs concatenated: ``[..., T, num_heads * d_out]``.

    Each head forks its own dropout stream. At call, ``rngs`` may also be a plain key
    (split into one key per head with ``jax.random.split(key, num_heads)``) or a list of
    ``num_heads`` keys, one per head.
    """

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
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        check_positive_int("MultiHeadAttentionWrapper", "num_heads", num_heads)
        rngs = _check_rngs("MultiHeadAttentionWrapper", rngs)
        self.heads = nnx.List(
            CausalAttention(
                d_in,
                d_out,
                context_length,
                dropout,
                qkv_bias,
                deterministic=deterministic,
                implementation=implementation,
                rngs=rngs,
            )
            for _ in range(num_heads)
        )
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.dropout, self.num_heads, self.qkv_bias = float(dropout), num_heads, bool(qkv_bias)
        self.deterministic, self.implementation = deterministic, implementation

    def __call__(
        self,
        x: Float[Array, "*B T d_in"],
        *,
        deterministic: bool | None = None,
        rngs: RngsLike | list[jax.Array] = None,
    ) -> Float[Array, "*B T d_out"]:
        if deterministic is None:
            deterministic = self.deterministic
        head_rngs = [rngs] * self.num_heads
        if isinstance(rngs, jax.Array):
            head_rngs = list(jax.random.split(rngs, self.num_heads))
        elif isinstance(rngs, list | tuple):
            if len(rngs) != self.num_heads:
                raise ValueError(
                    f"MultiHeadAttentionWrapper: rngs as a list needs one key per head, "
                    f"{self.num_heads}, got {len(rngs)}"
                )
            head_rngs = list(rngs)
        outs = [
            head(x, deterministic=deterministic, rngs=head_rng)
            for head, head_rng in zip(self.heads, head_rngs, strict=True)
        ]
        return jnp.concatenate(outs, axis=-1)

    def linen_module(self) -> linen.MultiHeadAttentionWrapper:
        """The Linen module with the same configuration."""
        return linen.MultiHeadAttentionWrapper(
            self.d_in,
            self.d_out,
            self.context_length,
            self.dropout,
            self.num_heads,
            self.qkv_bias,
            deterministic=self.deterministic,
            implementation=self.implementation,
        )


class MultiHeadAttention(nnx.Module):
    """Section 3.6.2: one projection split into ``num_heads`` heads, causal attention
    with dropout, heads merged and mixed by ``out_proj`` (with bias).

    ``d_out`` must be divisible by ``num_heads``; head dim ``H = d_out // num_heads``.

    Keyword-only options, as in :class:`jax_attn.linen_modules.MultiHeadAttention`:

    * ``num_kv_heads`` (default ``num_heads``): GQA/MQA; ``W_key`` and ``W_value``
      project to ``num_kv_heads * H`` features.
    * ``decode=True`` (or ``decode=`` at call): KV-cache decoding with the pure functions
      of :mod:`jax_attn.kv_cache`. :meth:`init_cache` allocates ``cached_key``,
      ``cached_value`` ``[B, context_length, num_kv_heads, H]`` and ``cache_index [B]``
      as ``nnx.Cache`` variables; each call then writes its ``T`` new tokens and attends
      causally over everything cached. ``lengths [B]`` marks how many of the ``T`` tokens
      are real when prompts of different lengths share a padded batch. Overflow past
      ``context_length`` is a ``ValueError`` in eager code; under ``nnx.jit`` it is a
      ``checkify`` check: run ``nnx.checkify(nnx.jit(step))`` and ``error.throw()``.

    >>> mha = MultiHeadAttention(4, 4, 8, 0.0, 2, decode=True, rngs=nnx.Rngs(0))
    >>> mha.init_cache(batch_size=1)
    >>> prompt = mha(jnp.ones((1, 3, 4)))           # prefill 3 tokens
    >>> step = mha(jnp.ones((1, 1, 4)))             # then one token at a time
    >>> mha.cache_index[...].tolist()
    [4]
    """

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
        implementation: str | None = None,
        decode: bool = False,
        num_kv_heads: int | None = None,
        rngs: nnx.Rngs,
    ):
        name = type(self).__name__
        for field, value in (
            ("d_in", d_in),
            ("d_out", d_out),
            ("context_length", context_length),
            ("num_heads", num_heads),
        ):
            check_positive_int(name, field, value)
        check_dropout_rate(name, dropout)
        if d_out % num_heads:
            raise ValueError(f"{name}: d_out={d_out} must be divisible by num_heads={num_heads}")
        if num_kv_heads is not None:
            check_positive_int(name, "num_kv_heads", num_kv_heads)
            if num_heads % num_kv_heads:
                raise ValueError(
                    f"{name}: num_heads={num_heads} must be divisible by "
                    f"num_kv_heads={num_kv_heads}"
                )
        if not isinstance(decode, bool):
            raise TypeError(f"{name}: decode must be a bool, got {decode!r}")
        rngs = _check_rngs(name, rngs)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.dropout, self.num_heads, self.qkv_bias = float(dropout), num_heads, bool(qkv_bias)
        self.num_kv_heads, self.decode = num_kv_heads, decode
        self.deterministic, self.implementation = deterministic, implementation
        self.head_dim = d_out // num_heads
        kv_features = self.kv_heads * self.head_dim
        self.W_query = _linear(d_in, d_out, self.qkv_bias, rngs)
        self.W_key = _linear(d_in, kv_features, self.qkv_bias, rngs)
        self.W_value = _linear(d_in, kv_features, self.qkv_bias, rngs)
        self.out_proj = _linear(d_out, d_out, True, rngs)
        self.rngs = nnx.data(_dropout_stream(rngs, self.dropout))
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)

    @property
    def kv_heads(self) -> int:
        """``K``: ``num_kv_heads``, or ``num_heads`` when it is ``None``."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def init_cache(self, batch_size: int, dtype=jnp.float32) -> None:
        """Allocates an empty KV cache for ``batch_size`` sequences (replacing any old one)."""
        empty = kv_cache.init_cache(
            batch_size, self.context_length, self.kv_heads, self.head_dim, dtype
        )
        self.cached_key = nnx.Cache(empty.key)
        self.cached_value = nnx.Cache(empty.value)
        self.cache_index = nnx.Cache(empty.index)

    def __call__(
        self,
        x: Float[Array, "*B T d_in"],
        *,
        deterministic: bool | None = None,
        rngs: RngsLike = None,
        decode: bool | None = None,
        lengths: Int[Array, " B"] | None = None,
    ) -> Float[Array, "*B T d_out"]:
        name = type(self).__name__
        x, unbatched = as_batch(name, x, self.d_in, self.context_length)
        deterministic = resolve_deterministic(name, self.deterministic, deterministic, self.dropout)
        rate = 0.0 if deterministic else self.dropout
        decode = self.decode if decode is None else decode
        # [B, T, N, H]
        queries = split_heads(self.W_query(x), self.num_heads)
        # [B, T, K, H]
        keys = split_heads(self.W_key(x), self.kv_heads)
        values = split_heads(self.W_value(x), self.kv_heads)
        attention_kwargs = dict(
            dropout_rate=rate,
            dropout_rng=_dropout_key(name, rngs, self.rngs) if rate > 0.0 else None,
            implementation=self.implementation,
        )
        if decode:
            context = self._attend_cached(queries, keys, values, lengths, attention_kwargs)
        else:
            if lengths is not None:
                raise ValueError(f"{name}: lengths= is for decoding (decode=True), got lengths")
            context = dot_product_attention(
                queries, keys, values, is_causal=True, **attention_kwargs
            )
        out = self.out_proj(merge_heads(context))
        return out[0] if unbatched else out

    def _attend_cached(self, queries, keys, values, lengths, attention_kwargs):
        name = type(self).__name__
        if self.cached_key is None:
            raise ValueError(
                f"{name}: decode=True needs a cache: call init_cache(batch_size) first"
            )
        batch_size = self.cached_key.shape[0]
        if queries.shape[0] != batch_size:
            raise ValueError(
                f"{name}: x has batch {queries.shape[0]}, but the cache was made by "
                f"init_cache(batch_size={batch_size})"
            )
        cache = kv_cache.KVCache(
            self.cached_key[...], self.cached_value[...], self.cache_index[...]
        )
        context, cache = kv_cache.decode_attention(
            cache, queries, keys, values, lengths=lengths, **attention_kwargs
        )
        self.cached_key[...], self.cached_value[...], self.cache_index[...] = cache
        return context

    def linen_module(self) -> linen.MultiHeadAttention:
        """The Linen module with the same configuration."""
        return linen.MultiHeadAttention(
            self.d_in,
            self.d_out,
            self.context_length,
            self.dropout,
            self.num_heads,
            self.qkv_bias,
            deterministic=self.deterministic,
            implementation=self.implementation,
            decode=self.decode,
            num_kv_heads=self.num_kv_heads,
        )


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

    return _Probe().apply({}, rngs={"dropout": rng})


# --- Linen <-> NNX parameters -------------------------------------------------------------

_MODULES = (
    SelfAttentionV1,
    SelfAttentionV2,
    CausalAttention,
    MultiHeadAttentionWrapper,
    MultiHeadAttention,
)


def _check_module(owner: str, module) -> None:
    if not isinstance(module, _MODULES):
        names = ", ".join(cls.__name__ for cls in _MODULES)
        raise TypeError(
            f"{owner}: module must be a jax_attn.nnx_modules module ({names}), "
            f"got {type(module).__name__}"
        )


def _to_linen_layout(tree: dict) -> dict:
    """``{"heads": {0: p, 1: q}}`` -> ``{"heads_0": p, "heads_1": q}``; the rest as is."""
    out = {}
    for name, value in tree.items():
        if name == "heads":
            out.update({f"heads_{i}": _to_linen_layout(head) for i, head in value.items()})
        elif isinstance(value, dict):
            out[name] = _to_linen_layout(value)
        else:
            out[name] = value
    return out


def _flatten(tree, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(tree, dict):
        flat = {}
        for name, value in tree.items():
            flat.update(_flatten(value, (*prefix, name)))
        return flat
    return {prefix: tree}


def linen_params_from_nnx(module) -> dict:
    """The module's parameters in the Linen layout: ``linen_module().apply({"params": p}, x)``
    gives the same output as ``module(x)``."""
    _check_module("linen_params_from_nnx", module)
    return _to_linen_layout(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def nnx_from_linen_params(module, params: dict):
    """Loads Linen ``params`` (as from ``linen_module().init`` or
    :func:`jax_attn.interop.params_from_torch`) into the NNX ``module``, in place, and
    returns it. Names and shapes must match exactly; a mismatch is a ``ValueError``
    naming the parameter."""
    _check_module("nnx_from_linen_params", module)
    if not hasattr(params, "items"):
        kind = type(params).__name__
        raise TypeError(f"nnx_from_linen_params: params must be a dict, got {kind}")
    if set(params) == {"params"}:
        params = params["params"]
    state = nnx.state(module, nnx.Param)
    expected = _flatten(_to_linen_layout(nnx.to_pure_dict(state)))
    given = _flatten(_plain_dict(params))
    missing = sorted("/".join(map(str, p)) for p in expected.keys() - given.keys())
    extra = sorted("/".join(map(str, p)) for p in given.keys() - expected.keys())
    if missing or extra:
        raise ValueError(
            f"nnx_from_linen_params: params for {type(module).__name__} must hold exactly "
            f"{sorted('/'.join(map(str, p)) for p in expected)}; missing {missing}, "
            f"unexpected {extra}"
        )
    for path, want in expected.items():
        got = given[path]
        if jnp.shape(got) != want.shape:
            raise ValueError(
                f"nnx_from_linen_params: {'/'.join(map(str, path))} must have shape "
                f"{list(want.shape)}, got {list(jnp.shape(got))}"
            )
    nnx_tree = nnx.to_pure_dict(state)
    nnx_flat = _flatten(nnx_tree)
    linen_paths = _flatten(_to_linen_layout(_paths_tree(nnx_tree)))
    for linen_path, nnx_path in linen_paths.items():
        nnx_flat[nnx_path] = jnp.asarray(given[linen_path], nnx_flat[nnx_path].dtype)
    nnx.replace_by_pure_dict(state, _unflatten(nnx_flat))
    nnx.update(module, state)
    return module


def _plain_dict(tree):
    """Nested mappings (dict, FrozenDict) as plain dicts."""
    if hasattr(tree, "items"):
        return {name: _plain_dict(value) for name, value in tree.items()}
    return tree


def _paths_tree(tree, prefix: tuple = ()):
    """The same nested dict with each leaf replaced by its own path."""
    if isinstance(tree, dict):
        return {name: _paths_tree(value, (*prefix, name)) for name, value in tree.items()}
    return prefix


def _unflatten(flat: dict[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree
