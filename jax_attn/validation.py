"""Argument checks for the public entry points, run in Python before tracing.

Each check raises ``ValueError`` or ``TypeError`` naming the argument, what was
expected and what was given, so a user mistake never surfaces as a raw XLA error.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.kernels.contract import (
    FUNCTION_ARGUMENTS,
    AttentionCall,
    KernelInputs,
    compute_dtype,
)
from jax_attn.mask_functions import BlockMask, evaluate_mask, score_options
from jax_attn.masks import as_4d, normalize_window

# AttentionCall, KernelInputs and compute_dtype are the kernel contract's
# (jax_attn.kernels.contract), re-exported: validation builds them.
__all__ = [
    "FUNCTION_ARGUMENTS",
    "batched_inputs",
    "AttentionCall",
    "KernelInputs",
    "nan_policy_attention",
    "bad_bias",
    "finite_bias_or_zero",
    "finite_or_zero",
    "holds_non_finite",
    "window_for",
    "nan_rows",
    "nan_rows_by_kernel",
    "run_attention",
    "attention_call_and_inputs",
    "compute_dtype",
    "as_batch",
    "check_array",
    "check_attention_args",
    "check_block_mask",
    "check_broadcast",
    "check_dropout",
    "check_dropout_rate",
    "check_function",
    "check_lengths",
    "check_positive_int",
    "check_rng",
    "check_scale",
]

_NO_VALUE = object()  # check_attention_args(q, k) checks attention weights: no value at all


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic) or hasattr(x, "__jax_array__")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_array(name: str, x) -> tuple[tuple[int, ...], np.dtype]:
    """``x``'s shape and (jax-canonical) dtype; ``TypeError`` unless ``x`` is an array.

    Python lists and scalars are refused: convert with ``jnp.asarray`` first, so the
    dtype is the one you chose.
    """
    if not _is_array(x):
        got = "None" if x is None else type(x).__name__
        raise TypeError(f"{name} must be a jax or numpy array, got {got}")
    return tuple(jnp.shape(x)), np.dtype(jnp.result_type(x))


def _shape(name: str, x) -> tuple[int, ...]:
    return check_array(name, x)[0]


def _dtype(name: str, x):
    dtype = check_array(name, x)[1]
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {dtype}")
    return dtype


def _python_number(name: str, x, kind: str):
    """``x`` as a Python float/bool if it is a Python, numpy or concrete 0-d jax scalar."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python {kind}, got a traced value; "
            "pass it as a Python constant (e.g. a static argument of jax.jit)"
        )
    if _is_array(x) and jnp.ndim(x) == 0 and not isinstance(x, np.generic):
        return np.asarray(x).item()
    return x


def check_scale(scale, H: int) -> float:
    """The logit scale as a float: ``1/sqrt(H)`` for ``None``; must be a finite real."""
    if scale is None:
        return 1.0 / float(np.sqrt(H)) if H else 1.0
    scale = _python_number("scale", scale, "float")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    value = float(scale)
    if not np.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def check_broadcast(name: str, x, target: tuple[int, ...], letters: str = "BNTS") -> None:
    shape = _shape(name, x)
    if len(shape) > len(target):
        raise ValueError(
            f"{name} must broadcast to [{', '.join(letters)}] = {list(target)}, "
            f"got shape {list(shape)} with {len(shape)} dims"
        )
    padded = (1,) * (len(target) - len(shape)) + shape
    for given, want in zip(padded, target, strict=True):
        if given not in (1, want):
            raise ValueError(
                f"{name} must broadcast to [{', '.join(letters)}] = {list(target)}, "
                f"got shape {list(shape)}"
            )


def check_dropout(dropout_rate, dropout_rng) -> float:
    """``dropout_rate`` as a float in ``[0, 1)``; a rate > 0 needs a single ``dropout_rng`` key."""
    dropout_rate = _python_number("dropout_rate", dropout_rate, "float")
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, numbers.Real):
        raise TypeError(
            f"dropout_rate must be a Python float in [0, 1), got {type(dropout_rate).__name__}"
        )
    rate = float(dropout_rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
    if rate > 0.0 and dropout_rng is None:
        raise ValueError(f"dropout_rate={rate} needs dropout_rng (a jax.random key), got None")
    if rate > 0.0:
        check_rng("dropout_rng", dropout_rng)
    return rate


def check_rng(name: str, rng) -> None:
    """``rng`` must be one key: ``jax.random.key(...)`` (shape ``()``) or ``PRNGKey(...)``."""
    dtype = getattr(rng, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be a jax.random key, got {type(rng).__name__}")
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if jnp.shape(rng) != ():
            raise ValueError(f"{name} must be a single key of shape (), got {jnp.shape(rng)}")
        return
    if dtype != jnp.uint32 or jnp.shape(rng) != (2,):
        raise TypeError(
            f"{name} must be a jax.random key (jax.random.key or PRNGKey), "
            f"got dtype {dtype} shape {jnp.shape(rng)}"
        )


def check_lengths(name: str, lengths, B: int, limit: int, limit_name: str) -> None:
    """Integer ``[B]`` lengths; when concrete (not traced) each in ``[0, limit]``."""
    shape, dtype = check_array(name, lengths)
    if shape != (B,):
        raise ValueError(f"{name} must have shape [B] = [{B}], got {list(shape)}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got dtype {dtype}")
    if _is_concrete(lengths):
        values = np.asarray(lengths)
        if values.size and (values.min() < 0 or values.max() > limit):
            raise ValueError(
                f"{name} must lie in [0, {limit_name}={limit}], got values {values.tolist()}"
            )


_MASK_FN = "mask_fn(b, h, q_idx, kv_idx) -> bool"
_SCORE_FN = "score_fn(score, b, h, q_idx, kv_idx) -> score"


def check_function(name: str, fn, score_dtype=None) -> None:
    """``mask_fn`` (``score_dtype`` None) or ``score_fn`` must be a function of int32 scalar
    indices (and a ``score_dtype`` scalar score) returning one bool / floating scalar."""
    signature = _MASK_FN if score_dtype is None else _SCORE_FN
    if not callable(fn):
        raise TypeError(f"{name} must be a function {signature}, got {type(fn).__name__}")
    index = jax.ShapeDtypeStruct((), jnp.int32)
    args: tuple[jax.ShapeDtypeStruct, ...] = (index,) * 4
    if score_dtype is not None:
        args = (jax.ShapeDtypeStruct((), score_dtype), *args)
    try:
        out = jax.eval_shape(fn, *args)
    except Exception as error:
        score = "" if score_dtype is None else f" and a {np.dtype(score_dtype)} score"
        raise TypeError(
            f"{name} must be a function {signature} of int32 scalar indices{score}; "
            f"calling it so raised {type(error).__name__}: {error}"
        ) from error
    dtype = getattr(out, "dtype", None)
    if score_dtype is None:
        ok, want = dtype == jnp.bool_, "one bool"
    else:
        ok, want = dtype is not None and jnp.issubdtype(dtype, jnp.floating), "one float"
    if not ok or getattr(out, "shape", None) != ():
        got = f"{dtype}{list(getattr(out, 'shape', ()))}" if dtype is not None else repr(out)
        raise TypeError(f"{name} must return {want} (shape []), got {got}")


def check_block_mask(block_mask, mask_fn, shape: tuple[int, int, int, int]) -> None:
    """``block_mask`` must come from ``make_block_mask`` for this call's ``(B, N, T, S)``
    (``B`` and ``N`` may be 1) and from ``mask_fn`` when that is passed too."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask must be a BlockMask from jax_attn.make_block_mask, "
            f"got {type(block_mask).__name__}"
        )
    B, N, T, S = shape
    B_m, N_m, T_m, S_m = block_mask.shape
    if (T_m, S_m) != (T, S) or B_m not in (1, B) or N_m not in (1, N):
        raise ValueError(
            f"block_mask must be made for (B, N, T, S) = {shape} (B and N may be 1), "
            f"got one made for {block_mask.shape}"
        )
    if mask_fn is not None and mask_fn is not block_mask.mask_fn:
        raise ValueError(
            "mask_fn must be the function block_mask was made from (or None to use it), "
            f"got a different function {getattr(mask_fn, '__qualname__', type(mask_fn).__name__)}"
        )


def window_for(local_window_size, T: int, S: int) -> tuple[int, int] | None:
    """``local_window_size`` as ``(left, right)`` with each side clamped to ``T + S``: no
    key lies further than that from a query, so a larger side (``sys.maxsize`` included)
    means no limit on that side, in every implementation (a kernel's ``position + side``
    cannot overflow). ``None`` when neither side limits anything."""
    left, right = normalize_window(local_window_size)
    reach = T + S
    if left >= reach and right >= reach:
        return None
    return min(left, reach), min(right, reach)


def check_attention_args(
    query,
    key,
    value=_NO_VALUE,
    *,
    mask=None,
    bias=None,
    is_causal=False,
    scale=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    dropout_rate=0.0,
    dropout_rng=None,
    mask_fn=None,
    score_fn=None,
    block_mask=None,
) -> AttentionCall:
    """Checks an attention call and returns its :class:`AttentionCall` summary.

    query ``[B, T, N, H]`` (or ``[T, N, H]``), key ``[B, S, K, H]``, value ``[B, S, K, H_v]``.
    Leave ``value`` out to check an attention-weights call (no value); an explicit
    ``None`` is an error.
    """
    operands = _check_operands(query, key, value)
    B, T, S, N, H = operands.B, operands.T, operands.S, operands.N, operands.H
    batched = operands.batched

    target, letters = ((B, N, T, S), "BNTS") if batched else ((N, T, S), "NTS")
    if mask is not None:
        m_dtype = check_array("mask", mask)[1]
        if m_dtype != jnp.bool_:
            raise TypeError(
                f"mask must be boolean (True = may attend), got dtype {m_dtype}; "
                "pass additive masks as bias"
            )
        check_broadcast("mask", mask, target, letters)
    if bias is not None:
        _dtype("bias", bias)
        check_broadcast("bias", bias, target, letters)
    is_causal = _python_number("is_causal", is_causal, "bool")
    if not isinstance(is_causal, bool | np.bool_):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    scale_value = check_scale(scale, H)
    if query_seq_lengths is not None:
        if not batched:
            raise ValueError("query_seq_lengths needs batched inputs [B, T, N, H]")
        check_lengths("query_seq_lengths", query_seq_lengths, B, T, "T")
    if key_value_seq_lengths is not None:
        if not batched:
            raise ValueError("key_value_seq_lengths needs batched inputs [B, S, K, H]")
        check_lengths("key_value_seq_lengths", key_value_seq_lengths, B, S, "S")
    window = None if local_window_size is None else window_for(local_window_size, T, S)
    rate = check_dropout(dropout_rate, dropout_rng)
    if block_mask is not None:
        check_block_mask(block_mask, mask_fn, (B, N, T, S))
        mask_fn = block_mask.mask_fn
    if mask_fn is not None:
        check_function("mask_fn", mask_fn)
    if score_fn is not None:
        check_function("score_fn", score_fn, compute_dtype(operands.dtype))
    return AttentionCall(
        **operands._asdict(),
        has_mask=mask is not None,
        has_bias=bias is not None,
        is_causal=bool(is_causal),
        has_query_lengths=query_seq_lengths is not None,
        has_kv_lengths=key_value_seq_lengths is not None,
        window=window,
        dropout_rate=rate,
        scale=scale_value,
        has_mask_fn=mask_fn is not None,
        has_score_fn=score_fn is not None,
        has_block_mask=block_mask is not None,
    )


# The AttentionCall fields that query, key and value fix (see _check_operands).
_Operands = collections.namedtuple("_Operands", "B T S N K H H_v dtype batched")


def _check_operands(query, key, value) -> _Operands:
    """Checks ``query``, ``key`` and ``value`` against each other (``value`` may be
    ``_NO_VALUE``: no value, an attention-weights call) and reads their shape letters,
    dtype and batching; unbatched ``[T, N, H]`` operands count as ``B = 1``."""
    q_shape = _shape("query", query)
    k_shape = _shape("key", key)
    if len(q_shape) not in (3, 4):
        raise ValueError(
            f"query must have shape [B, T, N, H] or [T, N, H], got {list(q_shape)} "
            f"({len(q_shape)} dims)"
        )
    batched = len(q_shape) == 4
    if len(k_shape) != len(q_shape):
        want = "[B, S, K, H]" if batched else "[S, K, H]"
        raise ValueError(
            f"key must have shape {want} (same rank as query {list(q_shape)}), got {list(k_shape)}"
        )
    if not batched:
        q_shape, k_shape = (1, *q_shape), (1, *k_shape)
    B, T, N, H = q_shape
    B_k, S, K, H_k = k_shape
    if N == 0:
        raise ValueError(f"query must have at least one head, got N=0 in shape {list(q_shape)}")
    if H == 0:
        raise ValueError(f"query must have head dim H >= 1, got H=0 in shape {list(q_shape)}")
    if B_k != B:
        raise ValueError(f"key batch B must equal query's {B}, got key shape {list(k_shape)}")
    if H_k != H:
        raise ValueError(f"key head dim H must equal query's H={H}, got key shape {list(k_shape)}")
    if K == 0:
        raise ValueError(f"key must have at least one head, got K=0 in shape {list(k_shape)}")
    if N % K != 0:
        raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K} (GQA/MQA)")
    q_dtype = _dtype("query", query)
    k_dtype = _dtype("key", key)
    H_v = H
    if value is not _NO_VALUE:
        v_shape = _shape("value", value)
        v_shape = v_shape if batched else (1, *v_shape)
        if len(v_shape) != 4 or v_shape[:3] != (B, S, K):
            raise ValueError(
                f"value must have shape [B, S, K, H_v] = [{B}, {S}, {K}, H_v] like key, "
                f"got {list(v_shape)}"
            )
        H_v = v_shape[3]
        if H_v == 0:
            raise ValueError(
                f"value must have head dim H_v >= 1, got H_v=0 in shape {list(v_shape)}"
            )
        v_dtype = _dtype("value", value)
        if not q_dtype == k_dtype == v_dtype:
            raise TypeError(
                f"query, key and value must share one dtype, got {q_dtype}, {k_dtype}, {v_dtype}"
            )
    elif q_dtype != k_dtype:
        raise TypeError(f"query and key must share one dtype, got {q_dtype}, {k_dtype}")
    return _Operands(B, T, S, N, K, H, H_v, np.dtype(q_dtype), batched)


def batched_inputs(call: AttentionCall, query, key, value):
    """q, k, v as arrays with a leading batch axis (added when ``call`` is unbatched)."""
    q, k, v = (jnp.asarray(x) for x in (query, key, value))
    if not call.batched:
        q, k, v = q[None], k[None], v[None]
    return q, k, v


# --- the public attention entry: one argument handling, one NaN policy ------------------

# Which kernel serves a call: ``select(call, implementation) -> fn``, ``fn`` with the
# kernel protocol ``fn(q, k, v, *, call, inputs)`` (jax_attn.kernels.base).
Select = Callable[[AttentionCall, "str | None"], Callable]

_KERNEL_INPUTS = tuple(field.name for field in dataclasses.fields(KernelInputs))


def run_attention(select: Select, implementation, query, key, value, **arguments):
    """The work of every public ``dot_product_attention`` (the dispatcher's and the
    reference's): check the arguments (:func:`check_attention_args`, ``arguments`` its
    keywords), ask ``select`` for the kernel, run it on batched inputs under the NaN
    policy (:func:`nan_policy_attention`) and return the output unbatched when the
    inputs were."""
    call, inputs = attention_call_and_inputs(query, key, value, **arguments)
    q, k, v = batched_inputs(call, query, key, value)
    out = nan_policy_attention(select, implementation, q, k, v, call=call, inputs=inputs)
    return out if call.batched else out[0]


def attention_call_and_inputs(query, key, value, **arguments):
    """``(AttentionCall, KernelInputs)`` of a ``dot_product_attention`` call (``arguments``
    its keywords but ``implementation``): :func:`check_attention_args` with ``alibi_slopes``
    and ``logit_soft_cap`` folded into ``score_fn`` and also carried apart, for the kernels
    that serve them natively."""
    own_score_fn = arguments.get("score_fn")
    slopes, cap = arguments.get("alibi_slopes"), arguments.get("logit_soft_cap")
    arguments["score_fn"] = _with_score_options(query, key, arguments)
    call = check_attention_args(query, key, value, **arguments)
    if slopes is not None or cap is not None:
        call = dataclasses.replace(
            call,
            logit_soft_cap=None if cap is None else float(cap),
            has_alibi_slopes=slopes is not None,
            # traced slopes may be learned: only a score_fn kernel gives their gradient
            score_options_only=own_score_fn is None and (slopes is None or _is_concrete(slopes)),
        )
        arguments["alibi_slopes"] = None if slopes is None else jnp.asarray(slopes)
    inputs = KernelInputs(**{name: arguments.get(name) for name in _KERNEL_INPUTS})
    return call, inputs


def _with_score_options(query, key, arguments: dict):
    """``arguments``' ``score_fn`` with its ``alibi_slopes`` and ``logit_soft_cap`` (taken
    out of ``arguments``) folded in (:func:`jax_attn.mask_functions.score_options`)."""
    slopes, cap = arguments.pop("alibi_slopes", None), arguments.pop("logit_soft_cap", None)
    if slopes is None and cap is None:
        return arguments.get("score_fn")
    q_shape, k_shape = jnp.shape(query), jnp.shape(key)
    if len(q_shape) not in (3, 4) or len(k_shape) != len(q_shape):
        return arguments.get("score_fn")  # check_attention_args names the shape error
    return score_options(
        slopes,
        cap,
        T=q_shape[-3],
        S=k_shape[-3],
        N=q_shape[-2],
        B=q_shape[0] if len(q_shape) == 4 else None,
        score_fn=arguments.get("score_fn"),
    )


def bad_bias(bias):
    """Where ``bias`` holds NaN or +inf (-inf masks: no fault)."""
    return jnp.isnan(bias) | (bias == jnp.inf)


def _where_bias(masked, dtype):
    """A bias of ``dtype``: -inf where ``masked``, 0 elsewhere."""
    return jnp.where(masked, jnp.asarray(-jnp.inf, dtype), jnp.zeros((), dtype))


def finite_or_zero(x):
    """``x`` with its NaN and Inf entries replaced by 0 (the NaN policy's zero-fill)."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def finite_bias_or_zero(bias):
    """``bias`` with its NaN and +inf entries replaced by 0 (-inf masks: kept)."""
    return jnp.where(bad_bias(bias), jnp.zeros((), bias.dtype), bias)


def holds_non_finite(q, k, v, bias=None, dtype=jnp.float32):
    """bool ``[]``: whether q, k, v or ``bias`` holds a NaN or Inf (-inf in ``bias`` masks).

    One sum per array (in ``dtype``): NaN and Inf survive a sum, so none is missed; a sum
    of finite values that overflows only sends the call down the (still correct) guarded
    path.
    """
    found = ~jnp.isfinite(sum(jnp.sum(x, dtype=dtype) for x in (q, k, v)))
    if bias is not None:
        found = found | jnp.any(bad_bias(bias))
    return found


def _any_non_finite(call, q, k, v, bias, kernel=None, inputs=None):
    """:func:`holds_non_finite` for the call, or, for a ``kernel`` with a
    ``finds_non_finite(call, q, k, v, kv_lengths)`` of its own (cpu_flash: one compiled
    pass over what it may read), that check of q, k and v where it can (it returns
    ``None`` where it cannot)."""
    own = getattr(kernel, "finds_non_finite", None)
    found = None if own is None else own(call, q, k, v, inputs.key_value_seq_lengths)
    if found is None:
        return holds_non_finite(q, k, v, bias, call.compute_dtype)
    return found if bias is None else found | jnp.any(bad_bias(bias))


def nan_policy_attention(select: Select, implementation, q, k, v, *, call, inputs):
    """The selected kernel on batched ``q [B, T, N, H]``, ``k``, ``v [B, S, K, H(_v)]``
    under the library's one NaN policy (docs/reliability.md, "NaN policy").

    Inputs with no NaN or Inf go to the kernel as they are. Otherwise (``lax.cond``) the
    kernel sees q, k, v and ``bias`` with their non-finite entries replaced by 0, so no
    ``0 * NaN`` can leak from a masked position into an output or gradient (``where``'s
    gradient is 0 there), and the rows that attend a non-finite value at a live
    position (:func:`nan_rows`) become NaN. Under differentiation ``lax.cond`` keeps the
    residuals of both branches, so a clean call also carries the other branch's (zeros
    of its inputs' and outputs' sizes) to the backward pass. Rematerialising that branch
    instead (``jax.checkpoint``) is not done: it holds more temporary memory than it
    saves (docs/performance.md) and would break the dense-mask memory bound of
    ``flax_attention_fn``.
    """
    kernel = select(call, implementation)
    bias = None if inputs.bias is None else jnp.asarray(inputs.bias)

    def clean(q, k, v, bias):
        return kernel(q, k, v, call=call, inputs=inputs)

    def nan_rows_hit(out, q, k, v, bias):
        """bool ``[B, T, N]``, laid out as ``out``'s rows: the rows that attend a
        non-finite value (at a live position)."""
        # [B, T, N], [B, S, K]: query rows, and keys (k or v row), holding a non-finite
        bad_q = ~jnp.all(jnp.isfinite(q), axis=-1)
        bad_kv = ~(jnp.all(jnp.isfinite(k), axis=-1) & jnp.all(jnp.isfinite(v), axis=-1))
        if jax.sharding.get_abstract_mesh().empty:
            hit = nan_rows(bad_q, bad_kv, bias, call=call, inputs=inputs)
        else:  # sharded: the kernel's own communication (a ring's collective-permute)
            hit = nan_rows_by_kernel(
                select, implementation, q, k, bad_q, bad_kv, bias, call, inputs
            )
        return _sharded_like_rows(jax.lax.stop_gradient(hit), out)

    def nan_rows_marked(out, q, k, v, bias):
        """``out`` with the rows that attend a non-finite value (at a live position) NaN."""
        hit = nan_rows_hit(out, q, k, v, bias)
        return jnp.where(hit[..., None], jnp.asarray(jnp.nan, out.dtype), out)

    def guarded(q, k, v, bias):
        safe = inputs
        if bias is not None:
            safe = dataclasses.replace(inputs, bias=finite_bias_or_zero(bias))
        # A kernel marked ``zero_fills_non_finite`` does this itself, where its data is
        # laid out (ring attention: on each device's share, inside its shard_map).
        own = getattr(kernel, "zero_fills_non_finite", False)
        operands = (q, k, v) if own else tuple(finite_or_zero(x) for x in (q, k, v))
        return nan_rows_marked(kernel(*operands, call=call, inputs=safe), q, k, v, bias)

    bad = _any_non_finite(call, q, k, v, bias, kernel, inputs)
    if not isinstance(bad, jax.core.Tracer):
        # Called eagerly: the inputs are known, so only the branch they need is compiled
        # (an eager lax.cond compiles both; one such compile crashed XLA in the slow
        # property search).
        if bool(bad):
            return guarded(q, k, v, bias)
        if getattr(kernel, "finds_non_finite", None) is not None:
            # its check skipped what its compiled maps never read: the pure maps of a
            # second order, which read it, check again (flash_autodiff.zero_filling)
            return kernel(q, k, v, call=call, inputs=inputs, non_finite=bad)
        return clean(q, k, v, bias)
    if getattr(kernel, "takes_non_finite", False):
        # The kernel takes the condition and zero-fills inside its own derivative rules,
        # so no lax.cond around it is differentiated: a cond's linearisation keeps the
        # residuals of both branches, copies of q, k, v and out and zeros of the other
        # branch's, on every clean call. Only the NaN rows are a cond here, and the
        # marking a select after it: a cond that returned the output would copy it, and
        # its cotangent, once each.
        out = kernel(q, k, v, call=call, inputs=inputs, non_finite=bad)

        def no_rows(out, *_):
            return jnp.zeros_like(out[..., 0], dtype=bool)

        hit = jax.lax.cond(bad, nan_rows_hit, no_rows, out, q, k, v, bias)
        return jnp.where(hit[..., None], jnp.asarray(jnp.nan, out.dtype), out)
    return jax.lax.cond(bad, guarded, clean, q, k, v, bias)


def _sharded_like_rows(hit, out):
    """``hit [B, T, N]`` laid out as ``out [B, T, N, H_v]``'s rows under Explicit mesh axes
    (else a mixed layout makes XLA gather ``out``, e.g. a ring's sequence axis)."""
    sharding = jax.typeof(out).sharding
    spec = getattr(sharding, "spec", None)
    if spec is None or jax.sharding.get_abstract_mesh().empty or not any(spec):
        return hit
    rows = jax.sharding.PartitionSpec(*(tuple(spec) + (None,) * 4)[:3])
    return jax.sharding.reshard(hit, jax.sharding.NamedSharding(sharding.mesh, rows))


def nan_rows_by_kernel(select: Select, implementation, q, k, bad_q, bad_kv, bias, call, inputs):
    """:func:`nan_rows` computed by the kernel itself, for calls under a mesh: it runs
    once more on indicator inputs made from q, k, v (so sharded as they are): q = k = 0
    (uniform weights over the live keys) and v = [bad key, 1], with the call's masks,
    no ``score_fn``, no dropout, ``bias`` only where -inf. Output channel 0 is > 0
    exactly where a bad key is live, channel 1 where any key is. A ``bias`` with NaN or
    +inf takes one more run, live only at those entries."""
    dtype = call.dtype
    indicator_call = dataclasses.replace(
        call, H=2, H_v=2, scale=1.0, dropout_rate=0.0, has_score_fn=False
    )
    try:  # the kernel asked for when it serves the indicator call, else the default
        kernel = select(indicator_call, implementation)
    except ValueError:
        kernel = select(indicator_call, None)
    q0, k0 = (jnp.zeros_like(x[..., :1], dtype=dtype) for x in (q, k))
    q0, k0 = (jnp.concatenate([x, x], axis=-1) for x in (q0, k0))
    # [B, S, K, 2]: channel 0 marks the bad keys, channel 1 is 1 for every key
    bad = bad_kv[..., None].astype(dtype)
    v0 = jnp.concatenate([bad, jnp.ones_like(bad)], axis=-1)

    def live(bias0):
        plain = dataclasses.replace(inputs, bias=bias0, score_fn=None, dropout_rng=None)
        return kernel(q0, k0, v0, call=indicator_call, inputs=plain)

    out0 = live(None if bias is None else _where_bias(bias == -jnp.inf, bias.dtype))
    bad_q = _sharded_like_rows(bad_q, out0)
    hit = (out0[..., 0] > 0) | (bad_q & (out0[..., 1] > 0))
    if bias is not None:
        hit = hit | (live(_where_bias(~bad_bias(bias), bias.dtype))[..., 1] > 0)
    return hit


# nan_rows looks at this many (b, n, t, s) positions at a time (1 MiB of int8).
NAN_ROWS_BLOCK_ELEMENTS = 2**20


def nan_rows(bad_q, bad_kv, bias, *, call: AttentionCall, inputs: KernelInputs):
    """bool ``[B, T, N]``: the query rows whose output the NaN policy makes NaN.

    A row is hit if its q row holds a non-finite value and it attends some key, if it
    attends a key whose k or v row does (``bad_q [B, T, N]``, ``bad_kv [B, S, K]``), or
    if its ``bias`` holds NaN or +inf at a key it attends. "Attends" means under every
    mask of the call, as the reference masks: causal, window, lengths, ``mask``,
    ``mask_fn`` (``block_mask``'s) and ``bias`` of -inf; ``score_fn`` and dropout do
    not mask here. Query rows go in blocks (``lax.map``), so memory stays
    O(:data:`NAN_ROWS_BLOCK_ELEMENTS`), never ``[B, N, T, S]``.
    """
    B, T, S, N, K = call.B, call.T, call.S, call.N, call.K
    if T == 0 or S == 0:
        return jnp.zeros((B, T, N), bool)
    block = max(1, min(T, NAN_ROWS_BLOCK_ELEMENTS // (B * N * S)))
    blocks = -(-T // block)
    kv_idx = jnp.arange(S, dtype=jnp.int32)
    # [B, S, K] -> [B, N, 1, S]: the keys each query head reads (GQA: K heads to N)
    bad_keys = jnp.repeat(jnp.transpose(bad_kv, (0, 2, 1)), N // K, axis=1)[:, :, None, :]
    mask = None if inputs.mask is None else as_4d(jnp.asarray(inputs.mask))
    bias = None if bias is None else as_4d(bias)

    def rows(x, q_idx):
        """``x [b, n, T|1, s]`` at query rows ``q_idx``."""
        return x if x.shape[2] == 1 else jnp.take(x, q_idx, axis=2)

    def seen_in_block(i):
        """int8 ``[B, N, block]``: 0 no key attended, 1 finite ones only, 2 a bad one."""
        q_idx = jnp.minimum(i * block + jnp.arange(block, dtype=jnp.int32), T - 1)
        # [block, 1], [1, S]: bottom-right aligned positions, as masks.make_causal_mask
        position = (q_idx + (S - T))[:, None]
        allowed = jnp.ones((1, 1, block, S), bool)
        if call.is_causal:
            allowed = allowed & (kv_idx[None, :] <= position)[None, None]
        if call.window is not None:
            left, right = call.window
            near = (position - kv_idx[None, :] <= left) & (kv_idx[None, :] - position <= right)
            allowed = allowed & near[None, None]
        if inputs.query_seq_lengths is not None:
            lengths = jnp.asarray(inputs.query_seq_lengths).astype(jnp.int32)
            allowed = allowed & (q_idx[None, :] < lengths[:, None])[:, None, :, None]
        if inputs.key_value_seq_lengths is not None:
            lengths = jnp.asarray(inputs.key_value_seq_lengths).astype(jnp.int32)
            allowed = allowed & (kv_idx[None, :] < lengths[:, None])[:, None, None, :]
        if mask is not None:
            allowed = allowed & rows(mask, q_idx)
        if inputs.mask_fn is not None:
            allowed = allowed & evaluate_mask(inputs.mask_fn, B, N, q_idx, kv_idx)
        bad = bad_keys
        if bias is not None:
            block_bias = rows(bias, q_idx)
            allowed = allowed & (block_bias != -jnp.inf)  # NaN > -inf is False
            bad = bad | bad_bias(block_bias)
        one, two, zero = (jnp.asarray(i, jnp.int8) for i in (1, 2, 0))
        state = jnp.where(allowed, jnp.where(bad, two, one), zero)
        return jnp.broadcast_to(jnp.max(state, axis=-1), (B, N, block))

    # [blocks, B, N, block] -> [B, T, N]
    seen = jax.lax.map(seen_in_block, jnp.arange(blocks, dtype=jnp.int32))
    seen = jnp.transpose(seen, (1, 0, 3, 2)).reshape(B, blocks * block, N)[:, :T]
    return (seen == 2) | (bad_q & (seen == 1))


# --- module hyper-parameters and inputs (flax modules) ----------------------------------


def check_positive_int(owner: str, name: str, value) -> None:
    """``value`` must be a Python (or numpy) int > 0; ``owner`` is the module's name."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value}")


def check_dropout_rate(owner: str, value) -> None:
    """A module's ``dropout`` must be a real number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: dropout must be a float in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {value}")


def as_batch(owner: str, x, d_in: int, context_length: int | None = None):
    """``x`` as ``[B, T, d_in]`` and whether it was unbatched; checks width and length."""
    try:
        shape = jnp.shape(x)
        dtype = jnp.result_type(x)
    except TypeError as error:
        raise TypeError(f"{owner}: x must be an array, got {type(x).__name__}") from error
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{owner}: x must hold real numbers, got dtype {dtype}")
    if len(shape) not in (2, 3):
        raise ValueError(f"{owner}: x must have shape [T, d_in] or [B, T, d_in], got {list(shape)}")
    if shape[-1] != d_in:
        raise ValueError(f"{owner}: x's last dim must be d_in={d_in}, got shape {list(shape)}")
    if context_length is not None and shape[-2] > context_length:
        raise ValueError(
            f"{owner}: x has {shape[-2]} tokens, more than context_length={context_length}"
        )
    if len(shape) == 2:
        return jnp.asarray(x)[None], True
    return jnp.asarray(x), False
