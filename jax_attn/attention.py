"""``dot_product_attention``: one call, several implementations, one semantics.

Each implementation registers what it can serve (``unsupported(call, platform)``
returns the reason it cannot, or ``None``). ``implementation=None`` walks the
platform's preference list and takes the first that supports the call; naming an
implementation that cannot serve the call raises a ``ValueError`` saying why.
All implementations agree with :mod:`jax_attn.reference` (tested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jax_attn import chunked, reference
from jax_attn.masks import build_attention_mask
from jax_attn.validation import AttentionCall, batched_inputs, check_attention_args

if TYPE_CHECKING:  # shape annotations only; see jax_attn.typing
    from jax_attn.typing import Array, Float, Keys, Lengths, Mask, Outputs, PRNGKey, Queries, Values

__all__ = [
    "Implementation",
    "available_implementations",
    "dot_product_attention",
    "preference_order",
    "register_implementation",
    "select_implementation",
    "unsupported_reason",
]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An attention kernel and what it supports.

    ``fn(query, key, value, *, call, **attention_kwargs)`` takes batched inputs and the
    validated :class:`~jax_attn.validation.AttentionCall`; ``unsupported(call, platform)``
    returns a human-readable reason it cannot serve the call, or ``None``;
    ``platforms`` lists the backends it runs on (``None``: all).
    """

    name: str
    fn: Callable
    unsupported: Callable[[AttentionCall, str], str | None]
    platforms: tuple[str, ...] | None = None
    description: str = ""


_REGISTRY: dict[str, Implementation] = {}
# Preference order per platform for implementation=None (first supporting one wins);
# :func:`preference_order` moves "xla" ahead of "chunked" for the calls below the
# thresholds that follow.
PREFERENCE: dict[str, list[str]] = {
    "cpu": ["chunked", "xla", "reference"],
    "gpu": ["cudnn", "xla", "chunked", "reference"],
    "tpu": ["xla", "chunked", "reference"],
}
# "chunked" goes first only from this many queries T on: with fewer (decoding) it has no
# block to skip and its loop costs more than "xla" (measured on CPU: T=1..4 against 64..1024
# keys, chunked 1.3x slower; T >= 8 chunked faster; see docs/performance.md).
CHUNKED_MIN_QUERIES: dict[str, int] = {"cpu": 8, "gpu": 8, "tpu": 8}
# ... and, where "xla" is listed first (GPU, TPU), only from this many bytes of float32
# logits [B, N, T, S] on, where materialising them costs memory the device may not have.
# Not measured on a GPU yet: a memory bound, not a speed threshold.
CHUNKED_MIN_LOGIT_BYTES: dict[str, int] = {"cpu": 0, "gpu": 2**30, "tpu": 2**30}


def preference_order(call: AttentionCall, platform: str) -> list[str]:
    """The platform's :data:`PREFERENCE` adjusted for the call's size."""
    order = list(PREFERENCE.get(platform, ["reference"]))
    if "chunked" not in order or "xla" not in order:
        return order
    logit_bytes = 4 * call.B * call.N * call.T * call.S
    wants_chunked = call.T >= CHUNKED_MIN_QUERIES.get(
        platform, 8
    ) and logit_bytes >= CHUNKED_MIN_LOGIT_BYTES.get(platform, 0)
    first, second = ("chunked", "xla") if wants_chunked else ("xla", "chunked")
    i, j = sorted((order.index("chunked"), order.index("xla")))
    order[i], order[j] = first, second
    return order


def register_implementation(impl: Implementation) -> None:
    """Adds (or replaces) an implementation in the registry."""
    _REGISTRY[impl.name] = impl


def _platform() -> str:
    return jax.default_backend()


def unsupported_reason(name: str, call: AttentionCall, platform: str | None = None) -> str | None:
    """Why implementation ``name`` cannot serve ``call`` on ``platform``, or ``None``."""
    platform = platform or _platform()
    impl = _REGISTRY[name]
    if impl.platforms is not None and platform not in impl.platforms:
        return f"runs on {', '.join(impl.platforms)} only, not on {platform}"
    return impl.unsupported(call, platform)


def available_implementations() -> list[str]:
    """Names of the implementations usable on the default device, in preference order."""
    platform = _platform()
    ordered = PREFERENCE.get(platform, []) + sorted(_REGISTRY)
    names = []
    for name in ordered:
        impl = _REGISTRY.get(name)
        if impl is None or name in names:
            continue
        if impl.platforms is None or platform in impl.platforms:
            names.append(name)
    return names


def select_implementation(call: AttentionCall, platform: str | None = None) -> str:
    """The first implementation in the platform's preference order that supports ``call``."""
    platform = platform or _platform()
    reasons = {}
    for name in preference_order(call, platform):
        if name not in _REGISTRY:
            continue
        reason = unsupported_reason(name, call, platform)
        if reason is None:
            return name
        reasons[name] = reason
    raise ValueError(f"no implementation supports this call on {platform}: {reasons}")


def dot_product_attention(
    query: Queries,
    key: Keys,
    value: Values,
    *,
    mask: Mask | None = None,
    bias: Float[Array, "*bias"] | None = None,
    is_causal=False,
    scale=None,
    query_seq_lengths: Lengths | None = None,
    key_value_seq_lengths: Lengths | None = None,
    local_window_size=None,
    dropout_rate=0.0,
    dropout_rng: PRNGKey | None = None,
    implementation=None,
) -> Outputs:
    """Scaled dot-product attention: ``softmax(q k^T * scale + bias, masked) v``.

    Args:
      query: ``[B, T, N, H]`` (or ``[T, N, H]``).
      key: ``[B, S, K, H]`` with ``N % K == 0`` (GQA/MQA when ``K < N``).
      value: ``[B, S, K, H_v]``.
      mask: bool, True = may attend, broadcastable to ``[B, N, T, S]``.
      bias: added to the logits, broadcastable to ``[B, N, T, S]``; ``-inf`` masks.
      is_causal: query ``t`` attends keys ``<= t + S - T`` (bottom-right aligned).
      scale: logit scale, default ``1 / sqrt(H)``.
      query_seq_lengths, key_value_seq_lengths: int ``[B]``; padded positions are masked.
      local_window_size: ``w`` or ``(left, right)``: attend keys within the window.
      dropout_rate, dropout_rng: dropout on the attention weights (kept ones scaled).
      implementation: ``None`` (fastest supporting one), or one of
        :func:`available_implementations`.

    Returns:
      ``[B, T, N, H_v]`` in the input dtype. A query with nothing to attend gets zeros.

    >>> from jax_attn import chunked, reference
    >>> q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))      # [B, T, N, H]
    >>> k = v = jax.random.normal(jax.random.key(1), (2, 5, 2, 8))  # [B, S, K, H], K=2: GQA
    >>> out = dot_product_attention(q, k, v, is_causal=True)
    >>> out.shape
    (2, 5, 4, 8)
    >>> expected = reference.dot_product_attention(q, k, v, is_causal=True)
    >>> bool(jnp.allclose(out, expected, atol=1e-5))
    True
    """
    call = check_attention_args(
        query,
        key,
        value,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        scale=scale,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    platform = _platform()
    if implementation is None:
        name = select_implementation(call, platform)
    else:
        if not isinstance(implementation, str) or implementation not in _REGISTRY:
            raise ValueError(
                f"implementation must be None or one of {sorted(_REGISTRY)}, got {implementation!r}"
            )
        name = implementation
        reason = unsupported_reason(name, call, platform)
        if reason is not None:
            raise ValueError(f"implementation={name!r} cannot serve this call: {reason}")
    q, k, v = batched_inputs(call, query, key, value)
    out = _REGISTRY[name].fn(
        q,
        k,
        v,
        call=call,
        mask=mask,
        bias=bias,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        dropout_rng=dropout_rng,
    )
    return out if call.batched else out[0]


# --- "reference": the oracle ------------------------------------------------------------


register_implementation(
    Implementation(
        name="reference",
        fn=reference.reference_attention,
        unsupported=lambda call, platform: None,
        description="einsum -> mask -> softmax -> einsum; materialises [B, N, T, S]",
    )
)


# --- "xla": jax.nn.dot_product_attention --------------------------------------------------


def _xla_unsupported(call: AttentionCall, platform: str) -> str | None:
    if call.dropout_rate > 0.0:
        return "no dropout (jax.nn.dot_product_attention has none)"
    if call.H_v != call.H:
        return f"needs value head dim equal to H={call.H}, got {call.H_v}"
    if call.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {call.dtype} (float32, bfloat16 and float16 only)"
    return None


def _jax_nn_fn(
    q,
    k,
    v,
    *,
    call,
    mask,
    bias,
    query_seq_lengths,
    key_value_seq_lengths,
    dropout_rng,
    implementation="xla",
):
    del dropout_rng
    T, S = call.T, call.S
    # jax.nn aligns causal and window masks top-left; ours are bottom-right. They agree
    # when T == S; otherwise the masks go in explicitly. cuDNN takes a left window only,
    # and only with the causal mask (which makes the right side irrelevant).
    native = T == S
    native_window = call.window
    if implementation == "cudnn" and call.window is not None:
        native_window = (call.window[0], 0) if call.is_causal else None
    native_window_ok = call.window is None or native_window is not None
    if bias is not None:
        bias = jnp.asarray(bias)
        finite = bias > -jnp.inf
        # float32 at least: a finite bias such as -1e9 must not round to -inf in float16.
        bias = jnp.where(finite, bias, 0.0).astype(jnp.promote_types(q.dtype, jnp.float32))
        mask = finite if mask is None else jnp.asarray(mask) & finite
    explicit_window = call.window is not None and not (native and native_window_ok)
    if (not native and call.is_causal) or explicit_window:
        mask = build_attention_mask(
            T,
            S,
            mask=mask,
            is_causal=call.is_causal and not native,
            local_window_size=call.window if explicit_window else None,
        )
    if implementation == "cudnn":
        mask, bias = _cudnn_mask_and_bias(mask, bias, T, S, q.dtype)
    lengths = {}
    if query_seq_lengths is not None:
        lengths["query_seq_lengths"] = jnp.asarray(query_seq_lengths, jnp.int32)
    if key_value_seq_lengths is not None:
        lengths["key_value_seq_lengths"] = jnp.asarray(key_value_seq_lengths, jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=None if bias is None else bias.reshape((1,) * (4 - bias.ndim) + bias.shape),
        mask=None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape),
        scale=call.scale,
        is_causal=call.is_causal and native,
        local_window_size=None if explicit_window else native_window,
        implementation=implementation,
        **lengths,
    )
    # jax.nn spreads a fully masked row uniformly; ours is zero.
    can_empty = mask is not None or lengths or T > S
    if can_empty:
        allowed = build_attention_mask(
            T,
            S,
            mask=mask,
            is_causal=call.is_causal,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=call.window,
        )
        if allowed is None:  # T > S, nothing masks: a row is empty only when S == 0
            allowed = jnp.ones((1, 1, T, S), bool)
        # [B, N, T] -> [B, T, N, 1]
        row_has_keys = jnp.any(allowed, axis=-1)
        row_has_keys = jnp.broadcast_to(row_has_keys, (call.B, call.N, T))
        out = jnp.where(jnp.transpose(row_has_keys, (0, 2, 1))[..., None], out, 0)
    return out


def _xla_fn(q, k, v, **kwargs):
    if q.dtype == jnp.float16 and _platform() == "cpu":
        # jax.nn asks dot_general for F16_F16_F32 precision, which XLA:CPU cannot compile
        # under jax.jit; float32 inputs give the same float32 logits.
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        return _jax_nn_fn(q, k, v, implementation="xla", **kwargs).astype(jnp.float16)
    return _jax_nn_fn(q, k, v, implementation="xla", **kwargs)


register_implementation(
    Implementation(
        name="xla",
        fn=_xla_fn,
        unsupported=_xla_unsupported,
        description="jax.nn.dot_product_attention(implementation='xla')",
    )
)


# --- "cudnn": jax.nn.dot_product_attention(implementation="cudnn") on NVIDIA GPUs -----------


def _nvidia_device():
    """The default device if it is an NVIDIA GPU, else ``None``."""
    device = jax.devices()[0]
    return device if "nvidia" in str(getattr(device, "device_kind", "")).lower() else None


def _cudnn_unsupported(call: AttentionCall, platform: str) -> str | None:
    device = _nvidia_device() if platform == "gpu" else None
    if device is None:
        return "needs an NVIDIA GPU"
    if call.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {call.dtype} (bfloat16 and float16 only)"
    if call.dropout_rate > 0.0:
        return "no dropout (jax.nn.dot_product_attention has none)"
    capability = str(getattr(device, "compute_capability", "0"))
    H_max = 256 if float(capability or 0) >= 9.0 else 128
    if call.H % 8 or call.H > H_max:
        return f"head dim H must be a multiple of 8 and <= {H_max}, got {call.H}"
    if call.H_v != call.H:
        return f"needs value head dim equal to H={call.H}, got {call.H_v}"
    if call.T == 0 or call.S == 0:
        return f"empty sequences (T={call.T}, S={call.S})"
    explicit_mask = (
        call.has_mask
        or call.has_bias
        or (call.T != call.S and call.is_causal)
        or (call.window is not None and (call.T != call.S or not call.is_causal))
    )
    if explicit_mask and (call.T % 2 or call.S % 2):
        return f"a mask or bias needs even T and S, got T={call.T}, S={call.S}"
    return None


def _cudnn_mask_and_bias(mask, bias, T, S, dtype):
    """cuDNN takes a mask or bias with full ``T`` and ``S`` dims, in the input dtype."""
    if bias is not None:
        limit = float(jnp.finfo(dtype).max)
        bias = jnp.clip(bias, -limit, limit).astype(dtype)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = jnp.broadcast_to(bias, (*bias.shape[:2], T, S))
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], T, S))
    return mask, bias


def _cudnn_fn(q, k, v, **kwargs):
    return _jax_nn_fn(q, k, v, implementation="cudnn", **kwargs)


register_implementation(
    Implementation(
        name="cudnn",
        fn=_cudnn_fn,
        unsupported=_cudnn_unsupported,
        platforms=("gpu",),
        description="jax.nn.dot_product_attention(implementation='cudnn'): cuDNN flash attention",
    )
)


# --- "chunked": pure-JAX online softmax, O(T) memory ----------------------------------------


def _chunked_unsupported(call: AttentionCall, platform: str) -> str | None:
    if call.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {call.dtype} (float32, bfloat16 and float16 only)"
    return None


register_implementation(
    Implementation(
        name="chunked",
        fn=chunked.chunked_attention,
        unsupported=_chunked_unsupported,
        description="online softmax over query/key chunks, skips empty blocks, O(T) memory",
    )
)
