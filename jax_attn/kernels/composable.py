"""Kernels JAX differentiates in reverse mode only, made to compose with every transformation.

cuDNN through ``jax.nn`` and JAX's Pallas kernels hold a ``jax.custom_vjp``: ``jax.grad``
works through them, ``jax.jvp`` and ``jax.hessian`` raise. :func:`composable` wraps such a
kernel in :mod:`jax_attn.kernels.flash_autodiff`'s rules so that it keeps its own forward
and backward for what it serves (the output; first-order reverse mode), and the
``chunked`` kernel's maps answer the rest: the forward-mode tangent, the log-sum-exp and
its cotangent, and every derivative of those (second order). The kernel's output stays
what the caller gets; ``chunked`` agrees with it (both are checked against the reference).

Costs, where the kernel is wrapped: ``jax.grad`` runs the kernel's forward twice (once for
the output, once inside its own VJP) and its backward once; forward mode costs a
``chunked`` pass with its tangent; without differentiation, nothing (the log-sum-exp that
only derivatives read is dead code under ``jax.jit``).

The NaN policy (``validation.nan_policy_attention``) comes in as ``non_finite``, a traced
condition under which every map, the kernel's own included, runs on the inputs with
their NaN and Inf zero-filled: a ``lax.cond`` inside each map
(:func:`jax_attn.kernels.flash_autodiff.zero_filling`), none around the differentiated
kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_attn.kernels import chunked
from jax_attn.kernels.contract import AttentionCall, KernelInputs
from jax_attn.kernels.flash_autodiff import FlashRules, flash_attention, zero_filling

__all__ = ["composable"]


def composable(kernel: Callable, own_backward: bool = True) -> Callable:
    """``kernel(q, k, v, *, call, inputs)`` (serving position masks, ``mask`` and ``bias``;
    no dropout or functions) -> the same kernel under every transformation, which also
    takes the NaN policy's traced condition as ``non_finite`` (or ``None``).
    ``own_backward=False``: a kernel JAX cannot differentiate at all (a bare
    ``pallas_call``) gets its reverse mode from ``chunked`` too."""

    @functools.wraps(kernel)
    def composed(q, k, v, *, call: AttentionCall, inputs: KernelInputs, non_finite=None):
        given = (inputs.query_seq_lengths, inputs.key_value_seq_lengths)
        lengths = tuple(None if x is None else jnp.asarray(x, jnp.int32) for x in given)
        mask = None if inputs.mask is None else jnp.asarray(inputs.mask)
        bias = None if inputs.bias is None else jnp.asarray(inputs.bias)
        nondiff = (mask, *lengths, non_finite)
        rules = _rules(kernel, call, own_backward)
        out, _ = flash_attention(rules, (q, k, v, bias), nondiff)
        return out

    # nan_policy_attention passes its traced condition as `non_finite`
    composed.takes_non_finite = True  # type: ignore[attr-defined]
    return composed


def _inputs(diff, nondiff) -> tuple:
    (q, k, v, bias), (mask, q_lengths, kv_lengths, _) = diff, nondiff
    inputs = KernelInputs(
        mask=mask, bias=bias, query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths
    )
    return q, k, v, inputs


@functools.cache
def _rules(kernel: Callable, call: AttentionCall, own_backward: bool) -> FlashRules:
    def fast(diff, nondiff):
        q, k, v, inputs = _inputs(diff, nondiff)
        return kernel(q, k, v, call=call, inputs=inputs)

    def with_lse(diff, nondiff):
        q, k, v, inputs = _inputs(diff, nondiff)
        return chunked.chunked_attention(q, k, v, call=call, inputs=inputs, return_lse=True)

    def forward(diff, nondiff):
        return fast(diff, nondiff), with_lse(diff, nondiff)[1]

    def tangent(diff, nondiff, out, lse, d_diff):
        return jax.jvp(lambda d: with_lse(d, nondiff), (diff,), (d_diff,))[1]

    def backward_pure(diff, nondiff, out, lse, d_out, d_lse):
        d_lse = jnp.zeros(lse.shape, lse.dtype) if d_lse is None else d_lse
        _, vjp = jax.vjp(lambda d: with_lse(d, nondiff), diff)
        return vjp((d_out, d_lse))[0]

    def backward(diff, nondiff, out, lse, d_out, d_lse):
        _, vjp = jax.vjp(lambda d: fast(d, nondiff), diff)
        grads = vjp(d_out)[0]
        if d_lse is None:
            return grads
        zero_out = jnp.zeros(out.shape, out.dtype)
        return jax.tree.map(jnp.add, grads, backward_pure(diff, nondiff, out, lse, zero_out, d_lse))

    reverse = backward if own_backward else backward_pure
    rules = FlashRules(forward, tangent, reverse, tangent, backward_pure)
    # nondiff = (mask, q_lengths, kv_lengths, non_finite)
    return zero_filling(rules, non_finite_at=3)
