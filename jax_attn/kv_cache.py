"""KV-cache decoding as pure functions over a :class:`KVCache` pytree.

A cache holds the keys and values of every token seen so far, ``[B, S_max, K, H]``
with ``S_max = context_length``, and ``index [B]``, the number of filled slots per
sequence. :func:`decode_attention` writes any number ``T`` of new tokens (a prompt in
one go, a chunk of it, or one token) at ``index`` and attends the ``T`` new queries
causally over everything cached: query ``t`` of sequence ``b`` sits at position
``index[b] + t`` and sees slots ``<= index[b] + t``. Unfilled slots are masked, so the
result equals the full causal pass over the whole sequence.

Prompts of different lengths share a batch through ``lengths [B]``: the ``T`` new
tokens are a padded block, only the first ``lengths[b]`` count, ``index[b]`` advances
by ``lengths[b]``, and the attention step gives the padded queries zero rows (a
module's output projection then maps them to its bias).

Everything works eagerly and under a plain ``jax.jit``, ``nnx.jit``, ``lax.scan``,
``nnx.scan``, ``fori_loop`` and ``while_loop``, with no wrapper of ours.

Overflow is never silent and never overwrites. Writing a block of ``T`` tokens
(padding included) needs ``index[b] + T <= S_max``:

* with a concrete ``index`` (eager code) a ``ValueError`` names the sizes;
* traced (under ``jit``/``scan``), a sequence whose block does not fit keeps its
  cached keys, values and ``index`` unchanged and gets NaN outputs; the other
  sequences of the batch decode as usual. Invalid traced ``lengths`` (outside
  ``[0, T]``) are treated the same way;
* :func:`checked` (or ``checkify.checkify`` yourself) turns either into an exception
  (``checkify.JaxRuntimeError``, a ``ValueError``) naming the sizes.

Everything here is module-free: Flax linen (:class:`jax_attn.linen_modules.MultiHeadAttention`
with ``decode=True``) and NNX (:class:`jax_attn.nnx_modules.MultiHeadAttention`) modules
keep the three arrays as variables and call these functions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from jax_attn.dispatch import dot_product_attention

__all__ = [
    "KVCache",
    "init_cache",
    "check_capacity",
    "update_cache",
    "decode_mask",
    "attend_cache",
    "decode_attention",
    "positions",
    "checked",
]


class KVCache(NamedTuple):
    """Keys ``[B, S_max, K, H]``, values ``[B, S_max, K, H_v]``, filled slots ``index [B]``."""

    key: jax.Array
    value: jax.Array
    # shadows tuple.index (a method): the public field name predates the type check
    index: jax.Array  # type: ignore[assignment]

    @property
    def context_length(self) -> int:
        return self.key.shape[1]


def init_cache(
    batch_size: int,
    context_length: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=jnp.float32,
    value_head_dim: int | None = None,
) -> KVCache:
    """An empty cache: zeros ``[B, S_max, K, H]`` and ``index`` zeros ``[B]`` (int32)."""
    for name, value in (
        ("batch_size", batch_size),
        ("context_length", context_length),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"init_cache: {name} must be a positive int, got {value!r}")
    value_head_dim = head_dim if value_head_dim is None else value_head_dim
    return KVCache(
        key=jnp.zeros((batch_size, context_length, num_kv_heads, head_dim), dtype),
        value=jnp.zeros((batch_size, context_length, num_kv_heads, value_head_dim), dtype),
        index=jnp.zeros((batch_size,), jnp.int32),
    )


def _concrete(x):
    """``x`` as a numpy array, or ``None`` when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_capacity(cache: KVCache, num_new: int) -> None:
    """Checks that a block of ``num_new`` tokens fits at ``cache.index`` in every sequence.

    ``ValueError`` for a concrete index or ``num_new > context_length``; when traced, a
    ``checkify`` check that only :func:`checked` (or ``checkify.checkify``) turns into an
    error; plain ``jit`` leaves it to :func:`update_cache` (no write, NaN outputs).
    """
    S_max = cache.context_length
    if num_new > S_max:
        raise ValueError(
            f"KV cache overflow: {num_new} new tokens do not fit in context_length={S_max}"
        )
    index = _concrete(cache.index)
    if index is not None:
        filled = int(index.max()) if index.size else 0
        if filled + num_new > S_max:
            raise ValueError(
                f"KV cache overflow: writing {num_new} new tokens at index {filled} needs "
                f"{filled + num_new} slots, but context_length={S_max}"
            )
        return
    checkify.debug_check(
        jnp.all(_fits(cache.index, num_new, S_max)),
        f"KV cache overflow: writing {num_new} new tokens at index {{filled}} needs more "
        f"than context_length={S_max} slots",
        filled=jnp.max(cache.index),
    )


def _fits(index, T: int, S_max: int):
    """``[B]`` bool: a block of ``T`` tokens fits at ``index [B]``."""
    return (index >= 0) & (index <= S_max - T)


def _check_lengths(lengths, B: int, T: int):
    """``lengths`` as an array (``None`` stays ``None``); raises for bad concrete values."""
    if lengths is None:
        return None
    if jnp.shape(lengths) != (B,):
        raise ValueError(f"lengths must have shape [B] = [{B}], got {list(jnp.shape(lengths))}")
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise TypeError(f"lengths must be integers, got dtype {jnp.result_type(lengths)}")
    values = _concrete(lengths)
    if values is None:
        checkify.debug_check(
            jnp.all(_lengths_ok(lengths, T)),
            f"lengths must lie in [0, T={T}], got a value outside",
        )
    elif values.size and (values.min() < 0 or values.max() > T):
        raise ValueError(f"lengths must lie in [0, T={T}], got {values.tolist()}")
    return jnp.asarray(lengths)


def _lengths_ok(lengths, T: int):
    return (lengths >= 0) & (lengths <= T)


def _valid(start, T: int, S_max: int, lengths):
    """``[B]`` bool: the block fits at ``start`` and ``lengths`` (if any) lie in ``[0, T]``."""
    ok = _fits(start, T, S_max)
    return ok if lengths is None else ok & _lengths_ok(lengths, T)


def update_cache(cache: KVCache, new_key, new_value, lengths=None) -> KVCache:
    """Writes ``new_key [B, T, K, H]`` / ``new_value [B, T, K, H_v]`` at ``cache.index``.

    Each sequence's block goes in with ``lax.dynamic_update_slice`` at its own index;
    ``index`` advances by ``T``, or by ``lengths [B]`` for padded blocks. A sequence whose
    block does not fit (``index[b] + T > context_length``, traced; eagerly it raises) or
    whose traced ``lengths[b]`` lies outside ``[0, T]`` is left unchanged.
    """
    key_shape, value_shape = jnp.shape(new_key), jnp.shape(new_value)
    B, S_max, K, H = cache.key.shape
    H_v = cache.value.shape[-1]
    if len(key_shape) != 4 or key_shape[0] != B or key_shape[2:] != (K, H):
        raise ValueError(
            f"new_key must have shape [B, T, K, H] = [{B}, T, {K}, {H}] like the cache, "
            f"got {list(key_shape)}"
        )
    T = key_shape[1]
    if value_shape != (B, T, K, H_v):
        raise ValueError(
            f"new_value must have shape [B, T, K, H_v] = {[B, T, K, H_v]}, got {list(value_shape)}"
        )
    lengths = _check_lengths(lengths, B, T)
    check_capacity(cache, T)
    return _write(cache, new_key, new_value, lengths)


@jax.jit
def _write(cache: KVCache, new_key, new_value, lengths) -> KVCache:
    """The block written where it is valid; elsewhere the old slots are written back."""
    T = new_key.shape[1]
    last = cache.context_length - T
    valid = _valid(cache.index, T, cache.context_length, lengths)

    def write(buffer, block, start, ok):
        start = jnp.clip(start, 0, last)
        zero = jnp.zeros_like(start)
        old = lax.dynamic_slice(buffer, (start, zero, zero), block.shape)
        block = jnp.where(ok, block.astype(buffer.dtype), old)
        return lax.dynamic_update_slice(buffer, block, (start, zero, zero))

    index = cache.index
    key = jax.vmap(write)(cache.key, new_key, index, valid)
    value = jax.vmap(write)(cache.value, new_value, index, valid)
    advance = T if lengths is None else lengths.astype(index.dtype)
    return KVCache(key, value, jnp.where(valid, index + advance, index))


def decode_mask(start, T: int, S_max: int, lengths=None):
    """May-attend mask ``[B, 1, T, S_max]`` for ``T`` new queries written at ``start [B]``.

    Query ``t`` of sequence ``b`` sees slots ``<= start[b] + t``; with ``lengths``, padded
    queries ``t >= lengths[b]`` see nothing.
    """
    # [B, T]
    query_pos = jnp.expand_dims(jnp.asarray(start).astype(jnp.int32), 1) + jnp.arange(
        T, dtype=jnp.int32
    ).reshape(1, T)
    # [B, T, S]
    allowed = jnp.arange(S_max, dtype=jnp.int32).reshape(1, 1, S_max) <= query_pos[:, :, None]
    if lengths is not None:
        # [B, T]
        query_ok = jnp.arange(T, dtype=jnp.int32).reshape(1, T) < jnp.expand_dims(
            jnp.asarray(lengths).astype(jnp.int32), 1
        )
        allowed = allowed & query_ok[:, :, None]
    return allowed[:, None, :, :]


def attend_cache(
    cache: KVCache,
    query,
    *,
    start,
    lengths=None,
    scale=None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    implementation: str | None = None,
):
    """Attention of ``query [B, T, N, H]`` (written at ``start [B]``) over the cache.

    Returns ``[B, T, N, H_v]``. The queries' own keys must already be in the cache.
    Sequences whose block did not fit (``start[b] + T > context_length``) or whose
    ``lengths[b]`` lies outside ``[0, T]`` get NaN outputs.
    """
    B, T = jnp.shape(query)[:2]
    lengths = _check_lengths(lengths, B, T)
    statics = dict(scale=scale, dropout_rate=dropout_rate, implementation=implementation)
    return _attend(cache, query, jnp.asarray(start), lengths, dropout_rng, **statics)


def _attend(cache, query, start, lengths, dropout_rng, **statics):
    """Jitted for Python-scalar options, so an eager call compiles once per shape."""
    if all(isinstance(option, int | float | str | None) for option in statics.values()):
        return _attend_jit(cache, query, start, lengths, dropout_rng, **statics)
    return _attend_body(cache, query, start, lengths, dropout_rng, **statics)


def _attend_body(cache, query, start, lengths, dropout_rng, *, scale, dropout_rate, implementation):
    T, S_max = query.shape[1], cache.context_length
    # The slots past start + T are empty: as key lengths, every kernel skips them (a step
    # then costs what the filled slots cost). One query needs nothing more: it sees
    # exactly the slots < start + 1, and a padded one (lengths 0) none, which the kernels
    # that decline a dense mask also serve (decoding kernels).
    filled = jnp.clip(start.astype(jnp.int32) + T, 0, S_max)
    one_query = T == 1
    out = dot_product_attention(
        query,
        cache.key,
        cache.value,
        mask=None if one_query else decode_mask(start, T, S_max, lengths),
        query_seq_lengths=lengths if one_query else None,
        key_value_seq_lengths=filled,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        implementation=implementation,
    )
    # [B, 1, 1, 1]
    valid = _valid(start, T, cache.context_length, lengths).reshape(-1, 1, 1, 1)
    return jnp.where(valid, out, jnp.asarray(jnp.nan, out.dtype))


_attend_jit = jax.jit(_attend_body, static_argnames=("scale", "dropout_rate", "implementation"))


def decode_attention(
    cache: KVCache,
    query,
    key,
    value,
    *,
    lengths=None,
    scale=None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    implementation: str | None = None,
):
    """Writes ``key``/``value [B, T, K, H]`` into the cache and attends ``query [B, T, N, H]``
    causally over everything cached. Returns ``(output [B, T, N, H_v], new_cache)``.

    Overflow (``index[b] + T > context_length``) raises eagerly; traced, that sequence's
    cache stays unchanged and its outputs are NaN (:func:`checked` raises instead).
    """
    q_shape = jnp.shape(query)
    if len(q_shape) != 4 or q_shape[:2] != jnp.shape(key)[:2]:
        raise ValueError(
            f"query must have shape [B, T, N, H] with the key's B, T = "
            f"{list(jnp.shape(key)[:2])}, got {list(q_shape)}"
        )
    new_cache = update_cache(cache, key, value, lengths)
    lengths = None if lengths is None else jnp.asarray(lengths)
    statics = dict(scale=scale, dropout_rate=dropout_rate, implementation=implementation)
    out = _attend(new_cache, query, cache.index, lengths, dropout_rng, **statics)
    return out, new_cache


def positions(cache: KVCache, T: int):
    """Positions ``[B, T]`` of ``T`` tokens about to be written (for position embeddings)."""
    return cache.index[:, None] + jnp.arange(T, dtype=cache.index.dtype)[None, :]


def checked(fn=None, *, jit: bool = True, **jit_kwargs):
    """``fn`` with its overflow and ``lengths`` checks functionalised by ``checkify``: where a
    plain ``jit`` gives NaN outputs, a failed check raises ``checkify.JaxRuntimeError`` (a
    ``ValueError``) after the call. Jitted unless ``jit=False``; ``jit_kwargs``
    (e.g. ``static_argnames``) go to ``jax.jit``. Usable as a decorator.
    """
    if fn is None:
        return functools.partial(checked, jit=jit, **jit_kwargs)
    functional = checkify.checkify(fn, errors=checkify.user_checks)
    if jit:
        functional = jax.jit(functional, **jit_kwargs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        error, out = functional(*args, **kwargs)
        error.throw()
        return out

    return wrapper
