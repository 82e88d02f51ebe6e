"""What the Linen and NNX attention modules share, written once.

:class:`AttentionSpec` holds the book's hyper-parameters and the Flax options of one of
the five classes and checks them. Each class declares its own fields (Linen) or
constructor arguments (NNX); :func:`spec_of` reads the spec's fields off the module by
those names. Nothing here looks a class up by name, so Flax's lifted transforms
(``nn.remat(cls)`` is a subclass with another name) and user subclasses work. The
per-call logic that is not framework-specific lives here too: checking ``x``, ``x_kv`` and ``mask``
(:func:`call_inputs`), resolving ``deterministic`` (:func:`resolve_deterministic`), and
the glue from projections to attention (:func:`single_head`, :func:`multi_head`). A
module passes its projections in as ``project(name, x)``; the attention is
:func:`jax_attn.dot_product_attention`, the sown weights
:func:`jax_attn.functional.dot_product_attention_weights`.

Partition metadata (tensor parallel over one mesh axis, ``model_axis``) is
:func:`partition_names`: the query/key/value kernels split their output features (the
heads), their biases too; ``out_proj`` splits its input features, its bias is replicated.
The metadata is static (it does not know the mesh), so layouts taken from it need
``num_kv_heads`` divisible by the size of ``model_axis``; otherwise a key/value head is
cut across devices. :func:`jax_attn.sharding.shard_params` (given ``num_heads``) raises
for such metadata; built without ``model_axis`` it replicates what cannot split instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn import kv_cache
from jax_attn.dispatch import dot_product_attention
from jax_attn.functional import dot_product_attention_weights, merge_heads, split_heads
from jax_attn.validation import as_batch, check_dropout_rate, check_positive_int

__all__ = [
    "AttentionSpec",
    "BOOK_CLASSES",
    "PROJECTIONS",
    "CallInputs",
    "attend",
    "call_inputs",
    "check_decode_call",
    "check_float_dtype",
    "check_sow_weights",
    "decode_step",
    "head_spec",
    "multi_head",
    "options",
    "partition_names",
    "projection_options",
    "promote_dtype",
    "promote_dtype_linen",
    "promoted_dtype",
    "resolve_deterministic",
    "single_head",
    "spec_of",
    "torch_linear_init",
]

PROJECTIONS = ("W_query", "W_key", "W_value")

# The book's five classes, in the book's order (each module file defines all five).
BOOK_CLASSES = (
    "SelfAttentionV1",
    "SelfAttentionV2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
)


def check_float_dtype(owner: str, name: str, value, allow_none: bool = False) -> None:
    """``value`` is a floating dtype (or ``None`` where allowed); else a ``TypeError``."""
    if value is None and allow_none:
        return
    try:
        dtype = np.dtype(value)
    except TypeError as error:
        raise TypeError(f"{owner}: {name} must be a floating dtype, got {value!r}") from error
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{owner}: {name} must be a floating dtype, got {dtype}")


def _check_optional_bool(owner: str, name: str, value) -> None:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{owner}: {name} must be a Python bool or None, got a traced value: Flax's "
            f"lifted transforms (nn.remat, nn.jit, nn.vmap) trace a call's keyword "
            f"arguments; give {name} at construction instead"
        )
    if value is not None and not isinstance(value, bool | np.bool_):
        raise TypeError(f"{owner}: {name} must be a bool or None, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """The checked configuration of one of the book's classes, Linen or NNX alike.

    The options every class takes have no default here: the classes declare them (and
    their defaults, such as ``is_causal``'s). The defaults are those of a class that
    lacks the field (``SelfAttentionV1`` has no ``dropout``)."""

    owner: str
    d_in: int
    d_out: int
    context_length: int | None = None
    dropout: float = 0.0
    num_heads: int = 1
    qkv_bias: bool = False
    decode: bool = False
    num_kv_heads: int | None = None
    deterministic: bool | None
    is_causal: bool
    dtype: Any
    param_dtype: Any
    implementation: str | None
    model_axis: str | None

    def __post_init__(self):
        owner = self.owner
        for name in ("d_in", "d_out", "context_length", "num_heads"):
            if name != "context_length" or self.context_length is not None:
                check_positive_int(owner, name, getattr(self, name))
        check_dropout_rate(owner, self.dropout)
        for name in ("qkv_bias", "is_causal", "decode"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise TypeError(f"{owner}: {name} must be a bool, got {getattr(self, name)!r}")
        _check_optional_bool(owner, "deterministic", self.deterministic)
        check_float_dtype(owner, "dtype", self.dtype, allow_none=True)
        check_float_dtype(owner, "param_dtype", self.param_dtype, allow_none=False)
        for name in ("implementation", "model_axis"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{owner}: {name} must be a str or None, got {value!r}")
        if self.d_out % self.num_heads:
            raise ValueError(
                f"{owner}: d_out={self.d_out} must be divisible by num_heads={self.num_heads}"
            )
        if self.decode and not self.is_causal:
            raise ValueError(f"{owner}: decode=True needs is_causal=True, got is_causal=False")
        if self.num_kv_heads is not None:
            check_positive_int(owner, "num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"{owner}: num_heads={self.num_heads} must be divisible by "
                    f"num_kv_heads={self.num_kv_heads}"
                )

    @classmethod
    def of(cls, module, owner: str | None = None) -> AttentionSpec:
        """The spec of a Linen or NNX module of this library: its ``attention_spec()``."""
        spec: AttentionSpec = module.attention_spec(owner)
        return spec

    @property
    def kv_heads(self) -> int:
        """``K``: ``num_kv_heads``, or ``num_heads`` when it is ``None``."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_out // self.num_heads

    def features(self, name: str) -> int:
        """Output features of projection ``name``."""
        if name in ("W_key", "W_value"):
            return self.kv_heads * self.head_dim
        return self.d_out

    def fan_in(self, name: str) -> int:
        return self.d_out if name == "out_proj" else self.d_in

    def use_bias(self, name: str) -> bool:
        return True if name == "out_proj" else bool(self.qkv_bias)


_SPEC_FIELDS = frozenset(field.name for field in dataclasses.fields(AttentionSpec))


def spec_of(module, names: Iterable[str], owner: str | None = None) -> AttentionSpec:
    """The spec of ``module``, configured by ``names`` (a Linen module's fields, an NNX
    module's constructor arguments): those that are :class:`AttentionSpec` fields, read off
    the module. Errors name ``owner`` (default: the module's class)."""
    values = {name: getattr(module, name) for name in names if name in _SPEC_FIELDS}
    return AttentionSpec(owner=owner or type(module).__name__, **values)


def head_spec(module, names: Iterable[str], owner: str | None = None) -> AttentionSpec:
    """A ``MultiHeadAttentionWrapper``'s spec: that of one of its heads (a
    ``CausalAttention`` of width ``d_out``), after checking ``num_heads``."""
    owner = owner or type(module).__name__
    check_positive_int(owner, "num_heads", module.num_heads)
    return spec_of(module, [name for name in names if name != "num_heads"], owner)


def options(spec: AttentionSpec) -> dict[str, Any]:
    """The keyword-only options every class takes, as a constructor takes them (to build a
    wrapper's heads, or the Linen twin of an NNX module)."""
    return {
        "deterministic": spec.deterministic,
        "is_causal": spec.is_causal,
        "dtype": spec.dtype,
        "param_dtype": spec.param_dtype,
        "implementation": spec.implementation,
        "model_axis": spec.model_axis,
    }


def torch_linear_init(fan_in: int):
    """``nn.Linear``'s default: uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def projection_options(spec: AttentionSpec, name: str) -> dict:
    """``use_bias``, ``dtype`` and ``param_dtype`` of projection ``name``, as ``nn.Dense``
    and ``nnx.Linear`` take them."""
    return {"use_bias": spec.use_bias(name), "dtype": spec.dtype, "param_dtype": spec.param_dtype}


def promoted_dtype(*dtypes) -> np.dtype:
    """The dtype a module computes in for inputs and params of ``dtypes`` (Flax's
    ``promote_dtype``; not the attention's logit dtype,
    :func:`jax_attn.kernels.contract.compute_dtype`): the widest floating dtype among
    ``dtypes`` (integers ignored; float32 when there is none, or for bfloat16 with
    float16), chosen explicitly: strict promotion allows no implicit mixing."""
    floats = {np.dtype(d) for d in dtypes if jnp.issubdtype(d, jnp.floating)}
    widest = max((d.itemsize for d in floats), default=0)
    candidates = [d for d in floats if d.itemsize == widest]
    return candidates[0] if len(candidates) == 1 else np.dtype(jnp.float32)


def promote_dtype(args, /, *, dtype=None, inexact=True):
    """Flax's ``promote_dtype`` (NNX form) through :func:`promoted_dtype`: ``args`` cast to
    ``dtype``, else to their promoted dtype, explicitly, so float32 inputs meet bfloat16
    params under ``jax_numpy_dtype_promotion="strict"``."""
    del inexact  # the promoted dtype is always floating
    if dtype is None:
        dtype = promoted_dtype(*(jnp.result_type(x) for x in args if x is not None))
    return tuple(None if x is None else jnp.asarray(x, dtype) for x in args)


def promote_dtype_linen(*args, dtype=None, inexact=True):
    """:func:`promote_dtype` in ``flax.linen``'s variadic form."""
    return promote_dtype(args, dtype=dtype, inexact=inexact)


def partition_names(name: str, leaf: str, model_axis: str | None) -> tuple | None:
    """Mesh axis names of parameter ``name/leaf`` (``kernel``, ``bias`` or a bare matrix
    ``""``), or ``None`` when ``model_axis`` is ``None`` (no metadata)."""
    if model_axis is None:
        return None
    if name == "out_proj":
        return (model_axis, None) if leaf == "kernel" else (None,)
    return (model_axis,) if leaf == "bias" else (None, model_axis)


def resolve_deterministic(
    owner: str, at_init: bool | None, at_call: bool | None, rate: float, initializing: bool = False
) -> bool:
    """The call's flag wins over the constructor's. With neither, ``init`` runs without
    dropout and a call with dropout > 0 is an error (say which mode you mean)."""
    _check_optional_bool(owner, "deterministic", at_call)
    chosen = at_call if at_call is not None else at_init
    if chosen is None:
        if rate == 0.0 or initializing:
            return True
        raise ValueError(
            f"{owner}: dropout={rate} needs deterministic=True (evaluation) or False "
            "(training, with a 'dropout' rng), at construction or call"
        )
    return bool(chosen)


class CallInputs(NamedTuple):
    """``x [B, T, d_in]``, ``x_kv [B, S, d_in]``, ``mask`` (4-d or ``None``), ``unbatched``."""

    x: jax.Array
    x_kv: jax.Array
    mask: jax.Array | None
    unbatched: bool


def _check_x_kv(owner: str, x_kv, x) -> jax.Array:
    try:
        shape, dtype = jnp.shape(x_kv), jnp.result_type(x_kv)
    except TypeError as error:
        raise TypeError(f"{owner}: x_kv must be an array, got {type(x_kv).__name__}") from error
    same_batch = len(shape) == 2 or shape[0] == x.shape[0]
    if len(shape) != x.ndim or shape[-1] != x.shape[-1] or not same_batch:
        raise ValueError(
            f"{owner}: x_kv must have shape [S, d_in] or [B, S, d_in] like x "
            f"{list(x.shape)} (same rank, batch and d_in), got {list(shape)}"
        )
    if dtype != x.dtype:
        raise TypeError(f"{owner}: x_kv must have x's dtype {x.dtype}, got {dtype}")
    return jnp.asarray(x_kv)


def call_inputs(owner: str, spec: AttentionSpec, x, x_kv=None, mask=None) -> CallInputs:
    """Checks the call's arrays and brings them to ``[B, T, d_in]``, ``[B, S, d_in]`` and a
    4-d bool mask broadcastable to ``[B, N, T, S]`` (a ``[T, d_in]`` input takes a mask
    broadcastable to ``[N, T, S]``). ``mask`` is bool (True = may attend) or, as Flax's,
    real float or int (nonzero = may attend). Complex ``x``, ``x_kv`` or ``mask`` is a
    ``TypeError`` naming the argument: the attention here is real."""
    if isinstance(x_kv, bool):
        raise TypeError(
            f"{owner}: x_kv must be an array, got a bool; deterministic is keyword-only "
            "(deterministic=...)"
        )
    x_batched, unbatched = as_batch(owner, x, spec.d_in, spec.context_length)
    if x_kv is None:
        kv_batched = x_batched
    else:
        kv_batched = _check_x_kv(owner, x_kv, jnp.asarray(x))
        kv_batched = kv_batched[None] if unbatched else kv_batched
    if mask is not None:
        B, T = x_batched.shape[:2]
        target = (B, spec.num_heads, T, kv_batched.shape[1])
        mask = _check_mask(owner, mask, target, unbatched)
    return CallInputs(x_batched, kv_batched, mask, unbatched)


def _check_mask(owner: str, mask, target: tuple[int, ...], unbatched: bool):
    try:
        shape, dtype = tuple(jnp.shape(mask)), jnp.result_type(mask)
    except TypeError as error:
        raise TypeError(f"{owner}: mask must be an array, got {type(mask).__name__}") from error
    if not (
        dtype == jnp.bool_
        or jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.floating)
    ):
        raise TypeError(
            f"{owner}: mask must be a bool array (True = may attend) or a real float/int "
            f"array as Flax's (nonzero = may attend), got {dtype}"
        )
    letters = "[N, T, S]" if unbatched else "[B, N, T, S]"
    target = target[1:] if unbatched else target
    padded = (1,) * (len(target) - len(shape)) + shape
    if len(shape) > len(target) or any(
        given not in (1, want) for given, want in zip(padded, target, strict=True)
    ):
        raise ValueError(
            f"{owner}: mask must broadcast to {letters} = {list(target)}, got shape {list(shape)}"
        )
    return jnp.reshape(_as_bool_mask(mask), (1,) * (4 - len(shape)) + shape)


def _as_bool_mask(mask) -> jax.Array:
    """Flax's masks multiply the weights: any nonzero entry may attend."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != jnp.zeros((), mask.dtype)


def attend(
    spec: AttentionSpec,
    queries,
    keys,
    values,
    *,
    mask=None,
    rate: float = 0.0,
    rng=None,
    sow: Callable | None = None,
):
    """``[B, T, N, H]`` attention of the projected heads; ``sow(weights [B, N, T, S])``
    receives the weights (same masking, before dropout) when given."""
    masking = {"mask": mask, "is_causal": spec.is_causal}
    if sow is not None:
        sow(dot_product_attention_weights(queries, keys, **masking))
    return dot_product_attention(
        queries,
        keys,
        values,
        **masking,
        dropout_rate=rate,
        dropout_rng=rng,
        implementation=spec.implementation,
    )


def single_head(
    spec: AttentionSpec, project: Callable, inputs: CallInputs, **attend_kwargs
) -> jax.Array:
    """SelfAttention and CausalAttention: ``[..., T, d_out]`` from the three projections."""
    # [B, T, 1, d_out]
    queries = jnp.expand_dims(project("W_query", inputs.x), 2)
    # [B, S, 1, d_out]
    keys = jnp.expand_dims(project("W_key", inputs.x_kv), 2)
    values = jnp.expand_dims(project("W_value", inputs.x_kv), 2)
    out = attend(spec, queries, keys, values, mask=inputs.mask, **attend_kwargs)[:, :, 0, :]
    return out[0] if inputs.unbatched else out


def multi_head(
    spec: AttentionSpec,
    project: Callable,
    inputs: CallInputs,
    *,
    attend_cached: Callable | None = None,
    **attend_kwargs,
) -> jax.Array:
    """MultiHeadAttention: heads split, attended (over the cache when ``attend_cached`` is
    given), merged and mixed by ``out_proj``. ``[..., T, d_out]``."""
    # [B, T, N, H]
    queries = split_heads(project("W_query", inputs.x), spec.num_heads)
    # [B, S, K, H]
    keys = split_heads(project("W_key", inputs.x_kv), spec.kv_heads)
    values = split_heads(project("W_value", inputs.x_kv), spec.kv_heads)
    if attend_cached is not None:
        context = attend_cached(queries, keys, values)
    else:
        context = attend(spec, queries, keys, values, mask=inputs.mask, **attend_kwargs)
    merged = merge_heads(context)
    out = project("out_proj", merged, out_sharding=_summed_over_features(merged))
    return out[0] if inputs.unbatched else out


def decode_step(spec: AttentionSpec, cache, queries, keys, values, *, lengths, rate, rng):
    """Writes ``keys``/``values [B, T, K, H]`` into ``cache`` (a :class:`kv_cache.KVCache`)
    and attends ``queries`` over it: ``(context [B, T, N, H], new cache)``. Errors name
    ``spec.owner`` (the module's entry point), not :mod:`jax_attn.kv_cache`'s arguments."""
    cache = kv_cache.KVCache(*cache)
    batch, cached_batch = queries.shape[0], cache.key.shape[0]
    if batch != cached_batch:
        raise ValueError(
            f"{spec.owner}: x has batch {batch}, but the cache was initialised with "
            f"batch {cached_batch}"
        )
    try:
        return kv_cache.decode_attention(
            cache,
            queries,
            keys,
            values,
            lengths=lengths,
            dropout_rate=rate,
            dropout_rng=rng,
            implementation=spec.implementation,
        )
    except (ValueError, TypeError) as error:
        if type(error) not in (ValueError, TypeError):  # JAX's own errors pass unchanged
            raise
        raise type(error)(f"{spec.owner}: {error}") from error


def check_sow_weights(owner: str, sow_weights) -> bool:
    """``sow_weights``, checked to be a bool."""
    if not isinstance(sow_weights, bool):
        raise TypeError(f"{owner}: sow_weights must be a bool, got {sow_weights!r}")
    return sow_weights


def _summed_over_features(x):
    """Under Explicit mesh axes with ``x``'s features sharded (heads split over
    ``model_axis``), ``out_proj``'s output sharding: ``x``'s, features replicated (summed
    across the shards); ``None`` otherwise."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or len(spec) != x.ndim or spec[-1] is None:
        return None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:-1], None))


def check_decode_call(owner: str, decode: bool, x_kv, mask, lengths, sow_weights) -> None:
    """``lengths`` needs ``decode``; ``x_kv``, ``mask`` and ``sow_weights`` do not go with it."""
    if lengths is not None and not decode:
        raise ValueError(
            f"{owner}: lengths (real new tokens per sequence) needs decode=True, got lengths"
        )
    if decode and x_kv is not None:
        raise ValueError(f"{owner}: x_kv (cross-attention) cannot be used with decode=True")
    if decode and sow_weights:
        raise ValueError(f"{owner}: sow_weights=True cannot be used with decode=True")
    if decode and mask is not None:
        raise ValueError(
            f"{owner}: mask= cannot be used with decode=True; mark padded tokens with lengths="
        )
