"""What every kernel declares: its function, what it cannot serve, where it runs; and the
typing rule custom-VJP kernels follow inside ``jax.shard_map``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jax_attn.validation import AttentionCall


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An attention kernel and what it supports.

    ``fn(q, k, v, *, call, inputs) -> [B, T, N, H_v]`` (in ``call.dtype``) is the kernel
    protocol: batched ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, H_v]``,
    ``call`` the validated :class:`~jax_attn.validation.AttentionCall` (shapes, dtype,
    scale, causal, window, dropout rate, which optional inputs came) and ``inputs`` the
    call's :class:`~jax_attn.validation.KernelInputs` (``mask``, ``bias``,
    ``query_seq_lengths``, ``key_value_seq_lengths``, ``dropout_rng``, ``mask_fn``,
    ``score_fn``, ``block_mask``; ``None`` where not passed), built once by
    :func:`~jax_attn.validation.run_attention`. A kernel reads only the inputs it
    serves; ``unsupported`` declines calls with the others. ``unsupported(call, platform)``
    returns a human-readable reason it cannot serve the call, or ``None``;
    ``platforms`` lists the backends it runs on (``None``: all); ``functions`` names
    which of ``mask_fn``, ``score_fn``, ``block_mask`` it takes (the dispatcher declines
    the others for it, see :func:`jax_attn.dispatch.unsupported_reason`).
    ``half_products`` marks a kernel that, for bfloat16/float16 inputs, rounds the
    attention weights and the logit gradients to that dtype before multiplying them by
    ``v`` and ``k`` (FlashAttention-2's tensor-core products, as JAX's Pallas kernels do):
    its gradients can be far from the float32 reference's where keys share a large common
    part. The kernels written here keep both in float32. ``score_options`` marks a kernel
    that serves ``alibi_slopes`` and ``logit_soft_cap`` natively (``call.logit_soft_cap``,
    ``inputs.alibi_slopes``): a call whose ``score_fn`` is only those options
    (``call.score_options_only``) reaches it; every other kernel gets them folded into
    ``score_fn``.
    """

    name: str
    fn: Callable
    unsupported: Callable[[AttentionCall, str], str | None]
    platforms: tuple[str, ...] | None = None
    description: str = ""
    functions: frozenset[str] = frozenset()
    half_products: bool = False
    score_options: bool = False


def manual_axes(x) -> frozenset:
    """The ``shard_map`` manual axes ``x`` varies over (empty outside ``shard_map``)."""
    return jax.typeof(x).mat.varying


def partitioned_axes() -> tuple[str, ...]:
    """The current mesh's axes of more than one device that XLA partitions (not manual,
    i.e. not taken by an enclosing ``jax.shard_map``); empty with no mesh set."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = zip(mesh.axis_names, mesh.axis_sizes, strict=True)
    return tuple(name for name, size in sizes if size > 1 and name not in mesh.manual_axes)


def varying_like(x, *inputs):
    """``x`` typed as varying over every manual axis one of ``inputs`` varies over: inside
    ``jax.shard_map``, what a kernel computes from its inputs varies as they do (a custom
    call's output, or a nested ``shard_map``'s, comes back typed invariant)."""
    axes = frozenset().union(*(manual_axes(i) for i in inputs if i is not None))
    if missing := axes - manual_axes(x):
        x = jax.lax.pcast(x, tuple(sorted(missing)), to="varying")
    return x


def cotangent_like(cotangent, primal, varying: frozenset | None = None):
    """``cotangent`` typed over the manual axes as its ``primal``, as ``custom_vjp``
    requires inside ``shard_map``: summed (``psum``) over the axes it varies over
    (``varying``, default its own type) where the primal is replicated, since every shard
    used that primal; marked varying where the primal varies and it does not."""
    own = manual_axes(cotangent)
    varying = own if varying is None else varying
    if missing := varying - own:
        cotangent = jax.lax.pcast(cotangent, tuple(sorted(missing)), to="varying")
    primal_axes = manual_axes(primal)
    if extra := varying - primal_axes:
        cotangent = jax.lax.psum(cotangent, tuple(sorted(extra)))
    if missing := primal_axes - varying:
        cotangent = jax.lax.pcast(cotangent, tuple(sorted(missing)), to="varying")
    return cotangent
