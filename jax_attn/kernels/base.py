"""The typing rule custom-VJP kernels follow inside ``jax.shard_map``: what a kernel
computes varies over the manual axes its inputs vary over, and a cotangent is typed as its
primal. (What every kernel declares, :class:`Implementation`, is in
:mod:`jax_attn.kernels.contract`, re-exported here for kernels written against ``base``.)"""

from __future__ import annotations

import jax

from jax_attn.kernels.contract import Implementation

__all__ = ["Implementation", "cotangent_like", "manual_axes", "partitioned_axes", "varying_like"]


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
