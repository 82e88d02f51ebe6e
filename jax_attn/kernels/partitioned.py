"""Custom calls that split over batch and heads under a plain ``jax.jit`` of sharded arrays.

XLA cannot look inside a custom call, so by default it gathers the call's operands onto
every device and runs it whole. :func:`partitioned_call` runs a kernel's function through
``jax.experimental.custom_partitioning`` instead, with a rule that keeps the batch axes
and the key/value-head axis ``K`` (query heads ``N = K * G`` following it in groups of
``G``; with ``K = 1`` the query heads alone) split as they come and replicates every
other axis (``T``, ``S``, ``H``): each device then runs the same function on its own
share, and the results stay split.

Every operand and result has a role saying where those axes are, after any number of
leading batch axes (``B`` and, under ``jax.vmap``, the mapped axes before it):

* ``"q"``: ``[..., T, N, H]`` (queries, outputs and their tangents/cotangents),
* ``"kv"``: ``[..., S, K, H]`` (keys, values and theirs),
* ``"lengths"``: ``[...]``,
* ``"lse"``: ``[..., N, T]``,
* ``"heads"``: ``[..., N]`` (per query head: dropout row seeds, ALiBi slopes).
* ``"dense"``: ``[..., N, T, S]`` (a mask or bias and its gradient), every axis of size 1
  (broadcast) unsplit.

The call is a primitive of its own (``jax.vmap`` moves the mapped axes in front and runs
the same function on the wider arrays, as ``jax.ffi.ffi_call(vmap_method="broadcast_all")``
does); ``custom_partitioning`` comes in only where it is lowered, and lowers to the plain
function on one device or inside ``jax.shard_map`` over every mesh axis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_attn.kernels.flash_autodiff import bind_batch_first, flash_linear_p

try:  # the registry has no public name (JAX's own cuDNN kernels use it)
    from jax._src import dispatch as _jax_dispatch
except ImportError:  # pragma: no cover
    _jax_dispatch = None  # type: ignore[assignment]

__all__ = ["ROLES", "partitioned_call"]

# role -> the axes after the leading batch axes: the query or key/value heads (split
# together), or "whole" (never split)
ROLES: dict[str, tuple[str, ...]] = {
    "q": ("whole", "q_heads", "whole"),
    "kv": ("whole", "kv_heads", "whole"),
    "lengths": (),
    "lse": ("q_heads", "whole"),
    "heads": ("q_heads",),
    "dense": ("q_heads", "whole", "whole"),
    # a mask's tile table [..., N, q_tiles, key_tiles] (or [..., 1, ...]) and its
    # bitmasks [..., P, words] (kernels/cpu_flash_tiles.py)
    "tiles": ("q_heads", "whole", "whole"),
    "tiles_shared": ("whole", "whole", "whole"),
    "tile_bits": ("whole", "whole"),
}


def partitioned_call(fn: Callable, static, operands, arg_roles, result_roles):
    """``fn(static, *operands)`` (a tuple of arrays), split over the operands' batch and
    head axes where they are sharded. ``fn`` and ``static`` must be hashable (a module-level
    function and a frozen dataclass); ``arg_roles``/``result_roles`` name each operand's and
    result's role (:data:`ROLES`)."""
    if _jax_dispatch is None:  # a JAX without the registry: run whole (gathered) as before
        return fn(static, *operands)
    return partitioned_p.bind(
        *operands,
        fn=fn,
        static=static,
        arg_roles=tuple(arg_roles),
        result_roles=tuple(result_roles),
    )


partitioned_p = Primitive("jax_attn_partitioned")
partitioned_p.multiple_results = True


def _abstract_eval(*avals, fn, static, arg_roles, result_roles):
    # Traced on the avals, so the results vary over the manual axes (jax.shard_map) as the
    # function makes them; typed split as the rule splits them over Explicit mesh axes.
    outs = jax.make_jaxpr(lambda *xs: fn(static, *xs))(*avals).out_avals
    mesh = avals[arg_roles.index("q")].sharding.mesh
    if mesh.empty or not mesh.explicit_axes:
        return outs
    batch, heads = _batch_and_heads(avals, arg_roles)
    return [
        out.update(sharding=NamedSharding(mesh, _spec(out.shape, role, batch, heads)))
        for out, role in zip(outs, result_roles, strict=True)
    ]


@functools.cache
def _jitted(fn, static, arg_roles, result_roles):
    """The eager call: one jit of the primitive, so sharded arrays are split, not gathered."""
    params = dict(fn=fn, static=static, arg_roles=arg_roles, result_roles=result_roles)
    return jax.jit(lambda *xs: partitioned_p.bind(*xs, **params))


def _impl(*args, fn, static, arg_roles, result_roles):
    return _jitted(fn, static, arg_roles, result_roles)(*args)


def _batch(args, dims, **params):
    # fn runs on any number of leading batch axes, so the params serve the new one as they are
    return bind_batch_first(partitioned_p, args, dims, **params)


def _lowering(ctx, *args, fn, static, arg_roles, result_roles):
    split = _custom_partitioned(fn, arg_roles, result_roles)
    return mlir.lower_fun(lambda *xs: split(static, *xs), multiple_results=True)(ctx, *args)


partitioned_p.def_impl(_impl)
partitioned_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[partitioned_p] = _batch
mlir.register_lowering(partitioned_p, _lowering)
# custom_partitioning lowers to the plain function unless it sees the devices the program
# is lowered for; JAX hands them to a lowering only for the primitives in this registry
# (its own cuDNN kernels are there): this one, and the flash rules' linear primitive that
# lowers the kernel's tangent and backward through it.
if _jax_dispatch is not None:
    _jax_dispatch.prim_requires_devices_during_lowering.update((partitioned_p, flash_linear_p))


# --- the partitioning rule ----------------------------------------------------------------


def _leading(shape, role: str) -> int:
    return len(shape) - len(ROLES[role])


@functools.cache
def _custom_partitioned(fn, arg_roles, result_roles):
    def call(static, *operands):
        return tuple(fn(static, *operands))

    split = custom_partitioning(call, static_argnums=(0,))

    def partition(static, mesh, arg_shapes, result_shape):
        batch, heads = _batch_and_heads(arg_shapes, arg_roles)

        def sharding(shape, role):
            return NamedSharding(mesh, _spec(shape, role, batch, heads))

        arg_shardings = tuple(
            sharding(x.shape, r) for x, r in zip(arg_shapes, arg_roles, strict=True)
        )
        result_shardings = tuple(
            sharding(x.shape, r) for x, r in zip(result_shape, result_roles, strict=True)
        )

        def per_shard(*operands):
            return tuple(fn(static, *operands))

        return mesh, per_shard, result_shardings, arg_shardings

    def infer_sharding_from_operands(static, mesh, arg_shapes, result_shape):
        batch, heads = _batch_and_heads(arg_shapes, arg_roles)
        return tuple(
            NamedSharding(mesh, _spec(x.shape, r, batch, heads))
            for x, r in zip(result_shape, result_roles, strict=True)
        )

    def sharding_rule(static, mesh, value_types, result_types):
        return _shardy_rule(
            [tuple(t.shape) for t in value_types],
            arg_roles,
            [tuple(t.shape) for t in result_types],
            result_roles,
        )

    split.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=sharding_rule,
    )
    return split


def _batch_and_heads(arg_shapes, arg_roles):
    """The mesh axes of the first ``"q"`` operand's batch axes, and of the head axes by
    name (``"q_heads"``, ``"kv_heads"``): the query heads' where the first ``"kv"``
    operand's heads split alike, or where there is one key/value head (MQA: every query
    head attends it, however they are split); ``None`` (whole) otherwise."""
    q, kv = arg_shapes[arg_roles.index("q")], arg_shapes[arg_roles.index("kv")]
    lead = _leading(q.shape, "q")
    spec = _padded_spec(q)
    q_heads = spec[lead + 1]
    if kv.shape[-2] == 1:
        return spec[:lead], {"q_heads": q_heads, "kv_heads": None}
    if _padded_spec(kv)[_leading(kv.shape, "kv") + 1] != q_heads:
        q_heads = None
    return spec[:lead], {"q_heads": q_heads, "kv_heads": q_heads}


def _padded_spec(x) -> tuple:
    """``x``'s partition spec, one entry per axis; all ``None`` where it has none yet
    (GSPMD's propagation asks before every operand has one)."""
    spec = tuple(getattr(getattr(x, "sharding", None), "spec", ()))
    return spec + (None,) * (len(x.shape) - len(spec))


def _spec(shape, role, batch, heads) -> P:
    # every operand has the same leading batch axes (jax.vmap widens them all alike)
    tail = tuple(heads.get(axis) for axis in ROLES[role])
    if role == "dense":  # an axis of size 1 is broadcast, not split
        return P(
            *(None if n == 1 else axis for n, axis in zip(shape, (*batch, *tail), strict=True))
        )
    return P(*batch, *tail)


def _shardy_rule(arg_shapes, arg_roles, result_shapes, result_roles):
    """The Shardy rule: shared batch factors, ``k`` for the key/value heads and ``(k g)`` for
    the query heads (``g`` never split: a device's query heads are whole groups of its key
    heads; with one key/value head the query heads split freely), every other axis its
    own factor that needs replication."""
    n_heads = arg_shapes[arg_roles.index("q")][-2]
    kv_heads = arg_shapes[arg_roles.index("kv")][-2]
    group = n_heads // kv_heads
    # one key/value head (MQA): the query heads split freely, "n" (a size-1 "k" may not
    # be part of a compound factor)
    q_heads = "n" if kv_heads == 1 else "(k g)" if group > 1 else "k"
    whole: list[str] = []

    def factors(shape, role):
        lead = _leading(shape, role)
        names = [f"b{i}" for i in range(lead)]
        if role == "dense":  # an axis of size 1 (broadcast) is a factor of its own
            for i in (i for i in range(lead) if shape[i] == 1):
                whole.append(f"w{len(whole)}")
                names[i] = whole[-1]
        for i, axis in enumerate(ROLES[role], start=lead):
            if role == "dense" and shape[i] == 1:
                axis = "whole"
            if axis == "kv_heads":
                names.append("k")
            elif axis == "q_heads":
                names.append(q_heads)
            else:
                whole.append(f"w{len(whole)}")
                names.append(whole[-1])
        return " ".join(names)

    operands = ", ".join(factors(s, r) for s, r in zip(arg_shapes, arg_roles, strict=True))
    results = ", ".join(factors(s, r) for s, r in zip(result_shapes, result_roles, strict=True))
    compound = q_heads == "(k g)"
    replicated = tuple(whole) + (("g",) if compound else ())
    sizes = {"g": group} if compound else {}
    # Shardy wants the special factors in the order they are numbered: first appearance,
    # which puts "g" (first seen in the first query-role operand) among the w's
    order = f"{operands} {results}".replace("(", " ").replace(")", " ").replace(",", " ").split()
    replicated = tuple(sorted(set(replicated), key=order.index))
    return f"{operands} -> {results}", dict(need_replication_factors=replicated, **sizes)
