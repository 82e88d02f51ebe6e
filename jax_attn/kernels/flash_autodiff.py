"""Flash attention under every JAX transformation: forward mode, reverse mode, and any order.

A flash kernel computes ``(out, lse)`` blockwise without the ``[B, N, T, S]`` weights, and
its derivatives must stay blockwise too. A ``jax.custom_vjp`` gives reverse mode only;
``jax.jvp``, ``jax.hessian`` and ``jax.grad(jax.grad(f))`` need more. The rules here:

* ``(out, lse) = forward(x)`` is a ``jax.custom_jvp`` function whose tangent is
  ``(d_out, d_lse) = tangent(x, out, lse; dx)``, a primitive that is **linear** in ``dx``
  and computed blockwise in one pass (Lu & Song 2024, "Simplifying, Stabilizing and
  Scaling Continuous-Time Consistency Models", appendix F): with ``p = exp(s - lse)``
  and ``ds = d(scale q k^T)``, ``mu = sum_j p ds``, ``d_out = sum_j p (ds v + dv) - mu out``
  and ``d_lse = mu``.
* Reverse mode is that linear map transposed: the primitive's transpose rule is the flash
  backward ``dx = backward(x, out, lse; d_out, d_lse)`` (FlashAttention-2, with ``d_lse``
  entering as ``delta - d_lse``), and the backward's transpose is the tangent again. So
  ``jax.grad`` runs exactly the forward and backward kernels it ran as a ``custom_vjp``.
* Higher orders differentiate the two primitives with respect to their non-linear
  inputs ``(x, out, lse)``: their JVP rules call ``jax.jvp`` of pure-JAX versions of the
  same blockwise maps (``tangent_pure``, ``backward_pure``: loops of static length, so
  also transposable). A Hessian-vector product ``jax.jvp(jax.grad(f))`` is then a
  forward-mode pass over blockwise loops: O(T) memory.
* ``jax.vmap`` folds into the kernels' own ``vmap`` (every map is re-bound vmapped).
* The library's NaN policy goes inside the maps (:func:`zero_filling`): a ``lax.cond``
  around a differentiated kernel would be linearised, and keep the residuals of both its
  branches on every call; one inside each map is only ever evaluated or, at second order,
  pushed forward (``jax.jvp``).

This is JAX's ``custom_jvp`` + custom transposition pattern (``jax.custom_derivatives.
linear_call`` does the same for first order, but its JVP rule refuses tangents of the
residuals, so ``jax.hessian`` = forward-over-reverse fails through it; docs/architecture.md).
The primitive uses JAX's documented extension points for primitives
(``jax.extend.core.Primitive``, ``jax.interpreters.ad``/``batching``/``mlir``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_attn.kernels.contract import compute_dtype
from jax_attn.validation import (
    bad_bias,
    finite_bias_or_zero,
    finite_or_zero,
    holds_non_finite,
)

__all__ = ["FlashRules", "flash_attention", "zero_filling"]


@dataclasses.dataclass(frozen=True, eq=False)
class FlashRules:
    """A flash kernel's maps on ``(x, out, lse)``; ``x = (diff, nondiff)``: pytrees of the
    inputs that have derivatives (float arrays: q, k, v, bias, ...) and those that do not
    (lengths, masks, keys, block tables).

    ``forward(diff, nondiff) -> (out, lse)``;
    ``tangent(diff, nondiff, out, lse, d_diff) -> (d_out, d_lse)``, linear in ``d_diff``;
    ``backward(diff, nondiff, out, lse, d_out, d_lse) -> d_diff``, its transpose;
    ``d_lse`` is ``None`` where it is known to be zero (first-order reverse mode).
    ``tangent_pure`` and ``backward_pure`` compute the same maps in JAX operations that
    every transformation, reverse mode included, can go through (used only where a
    kernel's maps are themselves differentiated: second order and beyond). Instances
    compare by identity: make them once per static configuration (``functools.cache``).
    """

    forward: Callable
    tangent: Callable
    backward: Callable
    tangent_pure: Callable
    backward_pure: Callable

    @functools.cache  # noqa: B019 - identity-hashed and kept for the rules' lifetime
    def vmapped(self) -> FlashRules:
        """The same rules over a leading vmapped axis on every argument and result."""
        return FlashRules(*(jax.vmap(fn) for fn in dataclasses.astuple(self)))


def flash_attention(rules: FlashRules, diff, nondiff):
    """``(out, lse)`` of ``rules.forward(diff, nondiff)``, differentiable to any order in
    ``diff`` by the rules above."""
    return _flash(rules, diff, nondiff)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash(rules: FlashRules, diff, nondiff):
    return rules.forward(diff, nondiff)


@_flash.defjvp
def _flash_jvp(rules: FlashRules, primals, tangents):
    diff, nondiff = primals
    d_diff = jax.tree.map(_instantiate, tangents[0], diff)
    out, lse = _flash(rules, diff, nondiff)
    d_out, d_lse = _bind("tangent", rules, (diff, nondiff, out, lse), d_diff)
    return (out, lse), (d_out, d_lse)


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _instantiate(tangent, primal):
    if isinstance(tangent, ad.Zero) or getattr(tangent, "dtype", None) == jax.dtypes.float0:
        return jnp.zeros_like(primal)
    return tangent


# --- the linear primitive ---------------------------------------------------------------
#
# flash_linear_p(*residuals, *linear; kind, rules, trees): kind "tangent" maps d_diff to
# (d_out, d_lse), kind "backward" maps (d_out, d_lse) to d_diff; each is the other's
# transpose. residuals = flattened (diff, nondiff, out, lse).

_OTHER = {"tangent": "backward", "backward": "tangent"}

flash_linear_p = Primitive("jax_attn_flash_linear")
flash_linear_p.multiple_results = True


def _bind(kind: str, rules: FlashRules, residuals, linear):
    res_flat, res_tree = jax.tree.flatten(residuals)
    lin_flat, lin_tree = jax.tree.flatten(linear)
    out = flash_linear_p.bind(
        *res_flat, *lin_flat, kind=kind, rules=rules, res_tree=res_tree, lin_tree=lin_tree
    )
    return jax.tree.unflatten(_out_tree(kind, res_tree), out)


def _out_tree(kind: str, res_tree):
    diff_tree = res_tree.children()[0]
    return jax.tree.structure((0, 0)) if kind == "tangent" else diff_tree


def _call(kind: str, rules: FlashRules, res_tree, lin_tree, flat, pure=False):
    """Runs the map on flat arguments; returns flat results."""
    n_res = res_tree.num_leaves
    diff, nondiff, out, lse = jax.tree.unflatten(res_tree, flat[:n_res])
    linear = jax.tree.unflatten(lin_tree, flat[n_res:])
    if kind == "tangent":
        fn = rules.tangent_pure if pure else rules.tangent
        result = fn(diff, nondiff, out, lse, linear)
    else:
        fn = rules.backward_pure if pure else rules.backward
        result = fn(diff, nondiff, out, lse, *linear)
    return jax.tree.leaves(result)


def _impl(*flat, kind, rules, res_tree, lin_tree):
    return _call(kind, rules, res_tree, lin_tree, flat)


def _abstract_eval(*avals, kind, rules, res_tree, lin_tree):
    # Traced on the avals themselves, so the results carry the shardings (Explicit mesh
    # axes) and manual-axis types (shard_map) that the map gives them.
    fn = functools.partial(_call, kind, rules, res_tree, lin_tree)
    return jax.make_jaxpr(lambda *xs: fn(xs))(*avals).out_avals


flash_linear_p.def_impl(_impl)
flash_linear_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(flash_linear_p, mlir.lower_fun(_impl, multiple_results=True))


def _jvp(primals, tangents, *, kind, rules, res_tree, lin_tree):
    n_res = res_tree.num_leaves
    params = dict(kind=kind, rules=rules, res_tree=res_tree, lin_tree=lin_tree)
    out = flash_linear_p.bind(*primals, **params)
    res, lin = list(primals[:n_res]), list(primals[n_res:])
    d_res, d_lin = tangents[:n_res], tangents[n_res:]
    parts = []
    if not all(isinstance(t, ad.Zero) for t in d_lin):
        d_lin = [_instantiate(t, p) for t, p in zip(d_lin, lin, strict=True)]
        parts.append(flash_linear_p.bind(*res, *d_lin, **params))
    if not all(isinstance(t, ad.Zero) for t in d_res):
        # the map is not linear in its residuals: differentiate its pure-JAX version
        # only the float residuals have tangents (lengths, masks, keys, tables do not)
        floating = [_is_float(r) for r in res]
        res_f = tuple(r for r, f in zip(res, floating, strict=True) if f)
        d_res_f = tuple(
            _instantiate(t, r) for t, r, f in zip(d_res, res, floating, strict=True) if f
        )

        def of_residuals(*floats):
            it = iter(floats)
            full = [next(it) if f else r for r, f in zip(res, floating, strict=True)]
            return _call(kind, rules, res_tree, lin_tree, (*full, *lin), pure=True)

        parts.append(jax.jvp(of_residuals, res_f, d_res_f)[1])
    if not parts:
        return out, [ad.Zero.from_primal_value(o) for o in out]
    tangent = [sum(ts[1:], ts[0]) for ts in zip(*parts, strict=True)]
    return out, tangent


def _transpose(cts, *args, kind, rules, res_tree, lin_tree):
    n_res = res_tree.num_leaves
    res, lin = args[:n_res], args[n_res:]
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError(f"{flash_linear_p} is not linear in its residuals")
    # a linear input that is known here (a constant tangent) takes no cotangent
    undefined = [ad.is_undefined_primal(x) for x in lin]
    result_tree = _out_tree(kind, res_tree)
    if all(isinstance(ct, ad.Zero) for ct in cts):
        return [None] * n_res + [
            ad.Zero(x.aval) if u else None for x, u in zip(lin, undefined, strict=True)
        ]
    if kind == "tangent":
        # -> the backward; an lse cotangent that is symbolically zero (first-order reverse
        # mode) goes as None, so the backward skips it
        ct_out, ct_lse = cts
        linear = (_zeros_if_symbolic(ct_out), None if isinstance(ct_lse, ad.Zero) else ct_lse)
        grads = _bind("backward", rules, jax.tree.unflatten(res_tree, res), linear)
        grads = jax.tree.leaves(grads)
    else:
        # -> the tangent, whose (d_out, d_lse) are cotangents of this backward's linear
        # inputs (d_out, and d_lse unless it came as None)
        d_diff = jax.tree.unflatten(result_tree, [_zeros_if_symbolic(ct) for ct in cts])
        grads = _bind("tangent", rules, jax.tree.unflatten(res_tree, res), d_diff)
        grads = list(grads[: lin_tree.num_leaves])
    return [None] * n_res + [g if u else None for g, u in zip(grads, undefined, strict=True)]


def _zeros_if_symbolic(ct):
    return jnp.zeros(ct.aval.shape, ct.aval.dtype) if isinstance(ct, ad.Zero) else ct


def bind_batch_first(primitive: Primitive, args, dims, **params):
    """A batching rule's work for a multiple-results ``primitive`` whose ``params`` serve
    a leading batch axis: bind it on ``args`` with their batch axis (``dims``) moved first,
    unbatched ones broadcast, and say every result is batched on axis 0."""
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    args = [
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(args, dims, strict=True)
    ]
    out = primitive.bind(*args, **params)
    return out, [0] * len(out)


def _batch(args, dims, *, rules, **params):
    return bind_batch_first(flash_linear_p, args, dims, rules=rules.vmapped(), **params)


ad.primitive_jvps[flash_linear_p] = _jvp
ad.primitive_transposes[flash_linear_p] = _transpose
batching.primitive_batchers[flash_linear_p] = _batch


# --- the NaN policy inside the maps ------------------------------------------------------


def zero_filling(rules: FlashRules, non_finite_at: int, pure_check_all: bool = False) -> FlashRules:
    """``rules`` under the library's NaN policy (``validation.nan_policy_attention``):
    where ``nondiff[non_finite_at]`` (a traced bool ``[]``; ``None``: no policy) holds, each
    map runs on ``diff`` with its NaN and Inf replaced by 0, and the derivatives it gives
    (tangent inputs, cotangent results) are 0 at those entries: the maps of the call on the
    zero-filled inputs, differentiated through the fill.

    ``diff`` starts ``(q, k, v)``, then the bias (or ``None``; its -inf masks and stays),
    then anything else, which is left as it is. Each map holds its own ``lax.cond``, which
    first-order differentiation never linearises (it runs inside the maps); a second
    order differentiates the pure maps' conds forward (``jax.jvp``), one branch at a time.

    ``pure_check_all``: the condition covers only what the compiled maps read (cpu_flash:
    keys below each sequence's length), while the pure maps (``chunked``'s, second order)
    read every key: they look for a NaN or Inf in all of ``diff`` themselves.
    """

    def condition(diff, nondiff):
        return nondiff[non_finite_at]

    def everything(diff, nondiff):
        given = nondiff[non_finite_at]
        if given is None:
            return None
        bias = diff[3] if len(diff) > 3 else None
        return given | holds_non_finite(*diff[:3], bias, compute_dtype(diff[0].dtype))

    pure_condition = everything if pure_check_all else condition

    def forward(diff, nondiff):
        def zero_filled(diff):
            return rules.forward(_zero_filled(diff), nondiff)

        return _when_finite(
            nondiff[non_finite_at], lambda diff: rules.forward(diff, nondiff), zero_filled, diff
        )

    def tangent_of(fn, non_finite):
        def tangent(diff, nondiff, out, lse, d_diff):
            def run(diff, d_diff):
                return fn(diff, nondiff, out, lse, d_diff)

            def zero_filled(diff, d_diff):
                return run(_zero_filled(diff), _zero_where_non_finite(d_diff, diff))

            return _when_finite(non_finite(diff, nondiff), run, zero_filled, diff, d_diff)

        return tangent

    def backward_of(fn, non_finite):
        def backward(diff, nondiff, *cotangents):
            def run(diff):
                return fn(diff, nondiff, *cotangents)

            def zero_filled(diff):
                return _zero_where_non_finite(run(_zero_filled(diff)), diff)

            return _when_finite(non_finite(diff, nondiff), run, zero_filled, diff)

        return backward

    return FlashRules(
        forward=forward,
        tangent=tangent_of(rules.tangent, condition),
        backward=backward_of(rules.backward, condition),
        tangent_pure=tangent_of(rules.tangent_pure, pure_condition),
        backward_pure=backward_of(rules.backward_pure, pure_condition),
    )


def _when_finite(non_finite, run, zero_filled, *args):
    """``run(*args)``, or ``zero_filled(*args)`` where ``non_finite`` (a traced bool) holds."""
    if non_finite is None:
        return run(*args)
    if not isinstance(non_finite, jax.core.Tracer):  # eager: compile only the branch taken
        return (zero_filled if bool(non_finite) else run)(*args)
    return jax.lax.cond(non_finite, zero_filled, run, *args)


def _zero_filled(diff):
    """``diff = (q, k, v[, bias, ...])`` with the NaN and Inf of q, k, v and the NaN and
    +inf of the bias replaced by 0 (-inf masks)."""
    filled = [finite_or_zero(x) for x in diff[:3]]
    if len(diff) > 3:
        filled.append(None if diff[3] is None else finite_bias_or_zero(diff[3]))
    return (*filled, *diff[4:])


def _zero_where_non_finite(values, diff):
    """``values`` (structured as ``diff``: its derivatives) with 0 where :func:`_zero_filled`
    filled ``diff``, as the derivative of that fill; the entries after the bias as given."""
    bad = [~jnp.isfinite(x) for x in diff[:3]]
    bad += [None if x is None else bad_bias(x) for x in diff[3:4]]

    def zeroed(value, where):
        if value is None or where is None:
            return value
        return jnp.where(where, jnp.zeros((), value.dtype), value)

    zeroed_values = [zeroed(value, where) for value, where in zip(values, bad, strict=False)]
    return (*zeroed_values, *values[len(bad) :])
