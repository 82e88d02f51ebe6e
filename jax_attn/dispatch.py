"""``dot_product_attention``: one call, several implementations, one semantics.

Each implementation registers what it can serve (``unsupported(call, platform)``
returns the reason it cannot, or ``None``). ``implementation=None`` walks the
platform's preference list and takes the first that supports the call; naming an
implementation that cannot serve the call raises a ``ValueError`` saying why.
All implementations agree with :mod:`jax_attn.reference` (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

from jax_attn import reference
from jax_attn.kernels import (
    chunked,
    cpu_flash,
    cudnn,
    pallas_gpu,
    pallas_gpu_decode,
    pallas_tpu,
    ring,
    xla,
)
from jax_attn.kernels.base import partitioned_axes
from jax_attn.kernels.contract import FUNCTION_ARGUMENTS, AttentionCall, Implementation
from jax_attn.mask_functions import BlockMask
from jax_attn.validation import run_attention

if TYPE_CHECKING:  # shape annotations only; see jax_attn.shapes
    from jax_attn.shapes import Array, Float, Keys, Lengths, Mask, Outputs, PRNGKey, Queries, Values

__all__ = [
    "Implementation",
    "available_implementations",
    "dot_product_attention",
    "preference_order",
    "register_implementation",
    "select_implementation",
    "unsupported_reason",
]


_REGISTRY: dict[str, Implementation] = {}
# Preference order per platform for implementation=None (first supporting one wins);
# :func:`preference_order` moves "xla" ahead of :data:`TILED` for the calls below the
# thresholds that follow.
PREFERENCE: dict[str, list[str]] = {
    "cpu": ["cpu_flash", "chunked", "xla", "reference"],
    "gpu": ["cudnn", "pallas_gpu", "xla", "chunked", "reference"],
    "tpu": ["pallas_tpu", "xla", "chunked", "reference"],
}
# The kernels that loop over query and key blocks in XLA operations, skipping the empty
# ones. They go first only from CHUNKED_MIN_QUERIES queries T on: with fewer (decoding)
# there is no block to skip, and a loop of XLA operations per block costs more than one
# fused "xla" call. Not cpu_flash: one custom call, no per-block dispatch, so it is first
# on CPU whatever T (docs/performance.md has the timings behind both).
TILED = ("chunked",)
CHUNKED_MIN_QUERIES: dict[str, int] = {"cpu": 8, "gpu": 8, "tpu": 8}
# Custom calls that run whole on each device (XLA cannot split a custom call over a mesh;
# under a plain jit of sharded arrays it gathers their inputs first): the default takes
# them only where nothing is partitioned, on a single device or inside jax.shard_map over
# every mesh axis. Named explicitly they still run anywhere their `unsupported` allows.
# None on this list now: cpu_flash splits over batch and heads (kernels/partitioned.py).
CUSTOM_CALLS: tuple[str, ...] = ()
# ... and, where "xla" is listed first (GPU, TPU), only from this many bytes of float32
# logits [B, N, T, S] on, where materialising them costs memory the device may not have:
# a memory bound, not a speed threshold.
CHUNKED_MIN_LOGIT_BYTES: dict[str, int] = {"cpu": 0, "gpu": 2**30, "tpu": 2**30}


def preference_order(call: AttentionCall, platform: str) -> list[str]:
    """The platform's :data:`PREFERENCE` adjusted for the call's size: "xla" right before
    the first :data:`TILED` kernel for short or small calls, right after the last one
    otherwise; without the :data:`CUSTOM_CALLS` where devices may be partitioned."""
    order = list(PREFERENCE.get(platform, ["reference"]))
    if _may_partition(platform):
        order = [name for name in order if name not in CUSTOM_CALLS]
    if "xla" not in order or not any(name in order for name in TILED):
        return order
    logit_bytes = 4 * call.B * call.N * call.T * call.S
    wants_tiled = call.T >= CHUNKED_MIN_QUERIES.get(
        platform, 8
    ) and logit_bytes >= CHUNKED_MIN_LOGIT_BYTES.get(platform, 0)
    order.remove("xla")
    tiled = [i for i, name in enumerate(order) if name in TILED]
    order.insert(tiled[-1] + 1 if wants_tiled else tiled[0], "xla")
    return order


def _may_partition(platform: str) -> bool:
    """Whether a computation traced now may be split over devices: a mesh axis of more than
    one device that is not manual (shard_map's), or, with no mesh set, several devices."""
    if not jax.sharding.get_abstract_mesh().empty:
        return bool(partitioned_axes())
    try:
        return jax.device_count(platform) > 1
    except RuntimeError:  # no such backend here
        return False


def register_implementation(impl: Implementation) -> None:
    """Adds (or replaces) an implementation in the registry."""
    _REGISTRY[impl.name] = impl


def _platform() -> str:
    return jax.default_backend()


def unsupported_reason(name: str, call: AttentionCall, platform: str | None = None) -> str | None:
    """Why implementation ``name`` cannot serve ``call`` on ``platform``, or ``None``."""
    platform = platform or _platform()
    impl = _REGISTRY[name]
    if not impl.runs_on(platform):
        assert impl.platforms is not None  # runs_on is True for every platform otherwise
        return f"runs on {', '.join(impl.platforms)} only, not on {platform}"
    functions = call.functions
    if call.score_options_only and impl.score_options:  # served natively, not as score_fn
        functions = tuple(name for name in functions if name != "score_fn")
    missing = [name for name in functions if name not in impl.functions]
    if missing:
        served = [other.name for other in _REGISTRY.values() if set(missing) <= other.functions]
        return f"takes no {' or '.join(missing)} (implementations that do: {', '.join(served)})"
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
        if impl.runs_on(platform):
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


def _named_or_selected(call: AttentionCall, implementation) -> Callable:
    """The kernel for ``call``: the named implementation if it serves the call, else the
    first supporting one in preference order."""
    platform = _platform()
    if implementation is None:
        return _REGISTRY[select_implementation(call, platform)].fn
    if not isinstance(implementation, str) or implementation not in _REGISTRY:
        raise ValueError(
            f"implementation must be None or one of {sorted(_REGISTRY)}, got {implementation!r}"
        )
    reason = unsupported_reason(implementation, call, platform)
    if reason is not None:
        raise ValueError(f"implementation={implementation!r} cannot serve this call: {reason}")
    return _REGISTRY[implementation].fn


def dot_product_attention(
    query: Queries,
    key: Keys,
    value: Values,
    *,
    mask: Mask | None = None,
    bias: Float[Array, "*bias"] | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    query_seq_lengths: Lengths | None = None,
    key_value_seq_lengths: Lengths | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKey | None = None,
    implementation: str | None = None,
    mask_fn: Callable | None = None,
    score_fn: Callable | None = None,
    block_mask: BlockMask | None = None,
    alibi_slopes: Float[Array, "*slopes"] | None = None,
    logit_soft_cap: float | None = None,
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
      local_window_size: ``w`` or ``(left, right)``: attend keys within the window; a
        side of ``T + S`` or more is no limit on that side.
      dropout_rate, dropout_rng: dropout on the attention weights (kept ones scaled).
      implementation: ``None`` (fastest supporting one), or one of
        :func:`available_implementations`.
      mask_fn: ``mask_fn(b, h, q_idx, kv_idx) -> bool`` on int32 scalars (``h`` the query
        head), ANDed with every other mask; vmapped by the library (docs/masks.md).
      score_fn: ``score_fn(score, b, h, q_idx, kv_idx) -> score`` on each scaled logit
        (float32 for half-precision inputs) before ``bias`` is added and masks apply.
      block_mask: a :func:`jax_attn.make_block_mask` result for ``mask_fn`` (which may
        then be left out): the chunked kernel skips the blocks it marks empty.
      alibi_slopes: ``[N]`` or ``[B, N]`` float: ALiBi, ``-slope[h] * |i + S - T - j|``
        added to the logit of query ``i`` and key ``j`` (FlashAttention's convention).
      logit_soft_cap: ``cap``: each scaled logit becomes ``cap * tanh(logit / cap)``
        (Gemma 2), before ALiBi, ``score_fn``, ``bias`` and the masks.

    Returns:
      ``[B, T, N, H_v]`` in the input dtype. A query with nothing to attend gets zeros.
      NaN or Inf at masked positions changes no output or gradient; at a live position
      it makes exactly the outputs that attend it NaN (docs/reliability.md).

    >>> import jax, jax.numpy as jnp
    >>> from jax_attn import reference
    >>> q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))      # [B, T, N, H]
    >>> k = v = jax.random.normal(jax.random.key(1), (2, 5, 2, 8))  # [B, S, K, H], K=2: GQA
    >>> out = dot_product_attention(q, k, v, is_causal=True)
    >>> out.shape
    (2, 5, 4, 8)
    >>> expected = reference.dot_product_attention(q, k, v, is_causal=True)
    >>> bool(jnp.allclose(out, expected, atol=1e-5))
    True
    """
    return run_attention(
        _named_or_selected,
        implementation,
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
        mask_fn=mask_fn,
        score_fn=score_fn,
        block_mask=block_mask,
        alibi_slopes=alibi_slopes,
        logit_soft_cap=logit_soft_cap,
    )


register_implementation(
    Implementation(
        name="reference",
        fn=reference.reference_attention,
        unsupported=lambda call, platform: None,
        description="einsum -> mask -> softmax -> einsum; materialises [B, N, T, S]",
        functions=frozenset(FUNCTION_ARGUMENTS),
    )
)
for _kernel in (xla, cudnn, chunked, cpu_flash, pallas_gpu, pallas_gpu_decode, pallas_tpu, ring):
    register_implementation(_kernel.IMPLEMENTATION)
