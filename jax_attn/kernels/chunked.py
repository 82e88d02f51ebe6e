"""The chunked implementation: flash attention in pure JAX, O(T) memory.

Query chunks form the outer loop, key chunks the inner one; each block is folded into
the running result by the online softmax of :mod:`jax_attn.kernels.online_softmax`, and
the gradient is its flash-attention backward (a ``custom_vjp`` that recomputes each
block). Key chunks that the causal mask, the window or the key lengths leave empty are
never visited. With a ``mask_fn`` the visited key chunks come from its block mask
(:mod:`jax_attn.mask_functions`): the chunks it leaves empty are skipped, forward and
backward, and ``mask_fn`` is evaluated element-wise only on chunks it leaves partly
masked.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.kernels import layout, online_softmax
from jax_attn.kernels.base import cotangent_like, varying_like
from jax_attn.kernels.contract import AttentionCall, Implementation, KernelInputs
from jax_attn.kernels.flash_autodiff import FlashRules, flash_attention
from jax_attn.mask_functions import (
    block_mask_arrays,
    block_sizes,
    evaluate_mask,
    evaluate_score,
    uses_batch_and_head,
)
from jax_attn.masks import MASKED_LOGIT, before_lengths, make_dropout_mask, visible
from jax_attn.validation import bad_bias

__all__ = [
    "MASKED_LOGIT",
    "CHUNK_BUDGET",
    "IMPLEMENTATION",
    "chunked_attention",
    "default_chunk_sizes",
]


# --- The chunked implementation -----------------------------------------------------------
#
# Layout inside the kernel: q [B, K, G, T, H], k [B, K, S, H], v [B, K, S, H_v], so every
# block is a plain batched matrix product. Query chunks form the outer loop (lax.scan),
# key/value chunks the inner one (lax.fori_loop with traced bounds): only the key chunks
# that the causal mask, the window and the key lengths leave non-empty are visited, and
# the position masks are applied only on the boundary chunks.

# Per platform: (smallest query chunk, largest query chunk, float32 logits per block
# [B, N, Tq, Sk], query chunk / key chunk). On CPU a block's logits should stay in a
# core's L2 cache between the two einsums that read them; a GPU wants blocks as large as
# its registers and shared memory allow (FlashAttention-2 §3.3, "tuning block sizes").
# docs/performance.md ("Where the code's constants come from") has the timings.
CHUNK_BUDGET: dict[str, tuple[int, int, int, int]] = {
    "cpu": (64, 1024, 2**20, 2),
    "gpu": (128, 2048, 2**24, 1),
    "tpu": (128, 2048, 2**24, 1),
}


def default_chunk_sizes(batch_heads: int = 1, platform: str | None = None) -> tuple[int, int]:
    """``(query_chunk_size, key_chunk_size)`` used when the caller names none: the largest
    power-of-two query chunk whose ``[batch_heads, Tq, Sk]`` block fits the platform's
    budget (:data:`CHUNK_BUDGET`)."""
    platform = platform or jax.default_backend()
    smallest, largest, budget, ratio = CHUNK_BUDGET.get(platform, CHUNK_BUDGET["cpu"])
    chunk = smallest
    while chunk * 2 <= largest and batch_heads * (chunk * 2) * (chunk * 2 // ratio) <= budget:
        chunk *= 2
    return chunk, max(1, chunk // ratio)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one chunked call (hashable: a ``custom_vjp`` static arg)."""

    T: int
    S: int
    q_chunk: int
    k_chunk: int
    is_causal: bool
    window: tuple[int, int] | None
    scale: float
    dropout_rate: float
    mask_shape: tuple[int, ...] | None  # [B', K', G', T', S'], padded, each dim 1 or full
    bias_shape: tuple[int, ...] | None
    # mask_fn(b, h, q_idx, kv_idx, *mask_consts), score_fn(score, b, h, q, kv, *score_consts):
    # the caller's functions closure-converted (jax.closure_convert), so the arrays they
    # close over are arguments of the custom_vjp and score_fn's get gradients.
    mask_fn: Callable | None = None
    mask_dims: tuple[bool, bool] = (True, True)  # whether mask_fn reads b, h
    score_fn: Callable | None = None
    # Visit every key chunk, masking each, in loops of static length: what reverse mode
    # can transpose (the pure maps of flash_autodiff, for second order), at the cost of
    # the blocks the dynamic bounds skip.
    static_loops: bool = False

    @property
    def T_padded(self) -> int:
        return -(-self.T // self.q_chunk) * self.q_chunk

    @property
    def S_padded(self) -> int:
        return -(-self.S // self.k_chunk) * self.k_chunk

    @property
    def num_q_chunks(self) -> int:
        return self.T_padded // self.q_chunk


def _key_chunk_ranges(plan: _Plan, q_index, kv_limit):
    """Key chunks that query chunk ``q_index`` must visit, split by whether they need the
    position masks: ``(lo, full_lo, full_hi, hi)`` — chunks ``[full_lo, full_hi)`` lie
    entirely inside the causal/window band and the key range, ``[lo, hi)`` is the rest."""
    T, S, Tq, Sk = plan.T, plan.S, plan.q_chunk, plan.k_chunk
    shift = S - T
    first = q_index * Tq + shift
    last = jnp.minimum(q_index * Tq + Tq - 1, T - 1) + shift
    lo_key, hi_key = jnp.int32(0), jnp.minimum(jnp.int32(S), kv_limit)
    full_lo_key, full_hi_key = jnp.int32(0), jnp.int32(S)
    if plan.is_causal:
        hi_key = jnp.minimum(hi_key, last + 1)
        full_hi_key = jnp.minimum(full_hi_key, first + 1)
    if plan.window is not None:
        left, right = plan.window
        lo_key = jnp.maximum(lo_key, first - left)
        hi_key = jnp.minimum(hi_key, last + right + 1)
        full_lo_key = jnp.maximum(full_lo_key, last - left)
        full_hi_key = jnp.minimum(full_hi_key, first + right + 1)
    lo = jnp.clip(lo_key // Sk, 0, plan.S_padded // Sk)
    hi = jnp.clip(-(-hi_key // Sk), lo, plan.S_padded // Sk)
    full_lo = jnp.clip(-(-full_lo_key // Sk), lo, hi)
    full_hi = jnp.clip(full_hi_key // Sk, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _slice_broadcast(x, q_index, k_index, plan: _Plan):
    """The ``[.., Tq|1, Sk|1]`` block of a padded mask or bias ``[B', K', G', T', S']``."""
    *lead, T_x, S_x = x.shape
    starts = (
        0,
        0,
        0,
        q_index * plan.q_chunk if T_x > 1 else 0,
        k_index * plan.k_chunk if S_x > 1 else 0,
    )
    sizes = (*lead, plan.q_chunk if T_x > 1 else 1, plan.k_chunk if S_x > 1 else 1)
    return jax.lax.dynamic_slice(x, _indices(starts), sizes)


def _block_indices(plan: _Plan, q_index, k_index):
    """int32 query indices ``[Tq]`` and key indices ``[Sk]`` of one block."""
    q_idx = q_index * plan.q_chunk + jnp.arange(plan.q_chunk, dtype=jnp.int32)
    return q_idx, k_index * plan.k_chunk + jnp.arange(plan.k_chunk, dtype=jnp.int32)


def _apply_score(plan: _Plan, scores, q_index, k_index, score_consts):
    """``score_fn`` on one block's scaled logits ``[B, K, G, Tq, Sk]``."""
    B, K, G, Tq, Sk = scores.shape

    def score_fn(score, b, h, q_idx, kv_idx):
        return plan.score_fn(score, b, h, q_idx, kv_idx, *score_consts)

    flat = scores.reshape(B, K * G, Tq, Sk)
    indices = _block_indices(plan, q_index, k_index)
    return evaluate_score(score_fn, flat, *indices).reshape(scores.shape)


class _Operands(NamedTuple):
    """One chunked call's arrays in the kernel layout: q ``[B, K, G, T', H]``, k, v
    ``[B, K, S', H(_v)]`` (padded to the chunks), mask and bias as :func:`_as_blocks`
    lays them out, int32 key lengths ``[B]``, the dropout key, the block table of
    :func:`_block_table` (``None`` for each absent), the arrays ``plan.mask_fn`` and
    ``plan.score_fn`` close over (tuples), and the NaN policy's traced condition
    ``non_finite`` (:func:`_filled`; ``None``: no policy)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    mask: jax.Array | None = None
    bias: jax.Array | None = None
    kv_lengths: jax.Array | None = None
    rng: jax.Array | None = None
    table: tuple | None = None
    mask_consts: tuple = ()
    score_consts: tuple = ()
    non_finite: jax.Array | None = None


def _filled(non_finite, x, bad=None):
    """The NaN policy inside the loops: block ``x`` of q, k or v with its NaN and Inf
    replaced by 0 where the traced bool ``non_finite`` holds (``bad``: another test of
    what to fill, e.g. the bias' NaN and +inf). Filling the blocks as they are read,
    not whole copies of the inputs, keeps the policy's memory to a block, and a ``where``
    differentiates to 0 at the filled entries (the policy's derivative) at any order."""
    return _zero_where(non_finite, x, x, bad)


def _zero_where(non_finite, of, x, bad=None):
    """``x`` with 0 where ``of`` (shaped as ``x``) is NaN or Inf (or ``bad(of)``) and the
    traced bool ``non_finite`` holds; ``x`` as it is where ``non_finite`` is ``None``."""
    if non_finite is None or x is None:
        return x
    fill = ~jnp.isfinite(of) if bad is None else bad(of)
    return jnp.where(non_finite & fill, jnp.zeros((), x.dtype), x)


class _Block(NamedTuple):
    """One (query chunk, key chunk) block: its k, v slices, float32 logits (scored and
    masked), dropout keep-mask (or ``None``) and the ``score_fn``'s vjp (or ``None``)."""

    k: jax.Array
    v: jax.Array
    logits: jax.Array
    keep: jax.Array | None
    score_vjp: Callable | None


def _block(plan: _Plan, ops: _Operands, q_blk, at, with_vjp=False):
    """The :class:`_Block` of query chunk ``q_blk`` at ``at = (q_index, k_index,
    position_masked)``."""
    q_index, k_index, _ = at
    B, K, G = q_blk.shape[:3]
    k_blk, v_blk = (
        _filled(
            ops.non_finite,
            jax.lax.dynamic_slice_in_dim(x, k_index * plan.k_chunk, plan.k_chunk, axis=2),
        )
        for x in (ops.k, ops.v)
    )
    score_consts = ops.score_consts
    scores, score_vjp = online_softmax.block_logits(q_blk, k_blk, plan.scale), None
    if plan.score_fn is not None:

        def score(s, c):
            return _apply_score(plan, s, q_index, k_index, c)

        if with_vjp:
            scores, score_vjp = jax.vjp(score, scores, score_consts)
        else:
            scores = score(scores, score_consts)
    logits = _block_logits(plan, ops, scores, at)
    keep = None
    if plan.dropout_rate > 0.0:
        keep = _block_keep(plan, ops.rng, B, K, G, q_index, k_index)
    return _Block(k_blk, v_blk, logits, keep, score_vjp)


def _block_mask_fn(plan: _Plan, B, K, G, q_index, k_index, mask_consts):
    """bool ``[B|1, K|1, G|1, Tq, Sk]``: ``mask_fn`` on one block."""

    def mask_fn(b, h, q_idx, kv_idx):
        return plan.mask_fn(b, h, q_idx, kv_idx, *mask_consts)

    q_idx, kv_idx = _block_indices(plan, q_index, k_index)
    allowed = evaluate_mask(mask_fn, B, K * G, q_idx, kv_idx, dims=plan.mask_dims)
    heads = (K, G) if allowed.shape[1] == K * G else (1, 1)
    return allowed.reshape(allowed.shape[0], *heads, *allowed.shape[2:])


def _inside(plan: _Plan, scores, q_index, k_index, mask_consts):
    """bool ``[B|1, K|1, G|1, Tq, Sk]``: the causal/window/key-range masks and ``mask_fn``
    of one block."""
    Tq, Sk = plan.q_chunk, plan.k_chunk
    # [1, 1, 1, 1, Sk]
    key_pos = (k_index * Sk + jnp.arange(Sk, dtype=jnp.int32)).reshape(1, 1, 1, 1, Sk)
    # [1, 1, 1, Tq, 1]
    query_pos = (q_index * Tq + jnp.arange(Tq, dtype=jnp.int32) + (plan.S - plan.T)).reshape(
        1, 1, 1, Tq, 1
    )
    # [1, 1, 1, Tq, Sk]: the keys padded past S are never inside
    inside = jnp.broadcast_to(key_pos < plan.S, (1, 1, 1, Tq, Sk))
    by_position = visible(query_pos, key_pos, is_causal=plan.is_causal, window=plan.window)
    if by_position is not None:
        inside = inside & by_position
    if plan.mask_fn is not None:
        B, K, G = scores.shape[:3]
        inside = inside & _block_mask_fn(plan, B, K, G, q_index, k_index, mask_consts)
    return inside


def _block_logits(plan: _Plan, ops: _Operands, scores, at):
    """float32 logits ``[B, K, G, Tq, Sk]`` of the block at ``at = (q_index, k_index,
    position_masked)`` from its ``scores`` (:func:`_block`), masked entries at
    ``MASKED_LOGIT``.

    The causal/window/key-range masks and ``mask_fn`` (:func:`_inside`) matter only when
    the traced bool ``position_masked`` says the block crosses their boundary; ``mask_fn``
    then runs in a ``lax.cond`` branch, so blocks it fills entirely never evaluate it.
    Entries whose bias is ``-inf`` stay ``-inf`` (they count as masked)."""
    q_index, k_index, position_masked = at
    mask, bias, kv_lengths, mask_consts = ops.mask, ops.bias, ops.kv_lengths, ops.mask_consts
    Sk = plan.k_chunk
    logits = scores
    if bias is not None:
        bias_blk = _slice_broadcast(bias, q_index, k_index, plan)
        logits = logits + _filled(ops.non_finite, bias_blk, bad_bias)
    valid = None
    if plan.mask_fn is not None:
        logits = jax.lax.cond(
            position_masked,
            lambda x: jnp.where(
                _inside(plan, scores, q_index, k_index, mask_consts), x, MASKED_LOGIT
            ),
            lambda x: x,
            logits,
        )
    elif plan.is_causal or plan.window is not None or plan.S_padded != plan.S:
        # a select that XLA fuses into the reductions that read the logits
        inside = _inside(plan, scores, q_index, k_index, mask_consts)
        valid = inside | jnp.logical_not(position_masked)
    if mask is not None:
        block_mask = _slice_broadcast(mask, q_index, k_index, plan)
        valid = block_mask if valid is None else valid & block_mask
    if kv_lengths is not None:
        # [B, 1, 1, 1, Sk]
        key_pos = (k_index * Sk + jnp.arange(Sk, dtype=jnp.int32)).reshape(1, 1, 1, 1, Sk)
        key_ok = before_lengths(key_pos, kv_lengths)
        valid = key_ok if valid is None else valid & key_ok
    if valid is not None:
        logits = jnp.where(valid, logits, MASKED_LOGIT)
    return logits


def _block_keep(plan: _Plan, rng, B, K, G, q_index, k_index):
    """This block's slice ``[B, K, G, Tq, Sk]`` of the global dropout mask."""
    keep = make_dropout_mask(
        rng,
        plan.dropout_rate,
        (B, K * G, plan.q_chunk, plan.k_chunk),
        offsets=(0, 0, q_index * plan.q_chunk, k_index * plan.k_chunk),
    )
    return keep.reshape(B, K, G, plan.q_chunk, plan.k_chunk)


def _visit(lo, full_lo, full_hi, hi, step, carry):
    """Runs ``step(k_index, position_masked, carry)`` over key chunks ``[lo, hi)``;
    ``position_masked`` is False inside ``[full_lo, full_hi)``."""
    return jax.lax.fori_loop(
        lo, hi, lambda j, state: step(j, (j < full_lo) | (j >= full_hi), state), carry
    )


def _block_table(plan: _Plan, any_blocks, full_blocks, kv_limit):
    """Which key chunks each query chunk visits, from a block mask ``[B', N', nq, nk]``
    and the position masks: ``(order [nq, nk], counts [nq], full [nq, nk])``, query
    chunk ``i`` visits ``order[i, :counts[i]]``; ``full`` marks chunks needing no mask."""
    nq, nk = plan.num_q_chunks, plan.S_padded // plan.k_chunk
    # [nq, 1] each
    ranges = _key_chunk_ranges(plan, jnp.arange(nq, dtype=jnp.int32), kv_limit)
    lo, full_lo, full_hi, hi = (jnp.broadcast_to(x, (nq,))[:, None] for x in ranges)
    # [1, nk]
    j = jnp.arange(nk, dtype=jnp.int32)[None, :]
    visit = jnp.any(any_blocks, axis=(0, 1)) & (j >= lo) & (j < hi)
    full = jnp.all(full_blocks, axis=(0, 1)) & (j >= full_lo) & (j < full_hi)
    order = jnp.argsort(jnp.logical_not(visit), axis=1, stable=True).astype(jnp.int32)
    return order, jnp.sum(visit, axis=1, dtype=jnp.int32), full


def _visit_chunks(plan: _Plan, table, q_index, kv_limit, step, carry):
    """Runs ``step(k_index, masked, carry)`` over the key chunks query chunk ``q_index``
    visits: those of its ``table`` row (:func:`_block_table`) or of the position band;
    every chunk, each masked, with ``plan.static_loops``."""
    if plan.static_loops:
        masked = jnp.bool_(True)
        num_chunks = plan.S_padded // plan.k_chunk
        return jax.lax.fori_loop(0, num_chunks, lambda j, c: step(j, masked, c), carry)
    if table is None:
        lo, full_lo, full_hi, hi = _key_chunk_ranges(plan, q_index, kv_limit)
        return _visit(lo, full_lo, full_hi, hi, step, carry)
    order, counts, full = table

    def body(j, state):
        k_index = order[q_index, j]
        return step(k_index, jnp.logical_not(full[q_index, k_index]), state)

    return jax.lax.fori_loop(0, counts[q_index], body, carry)


def _zeros_like(ref, *others, shape=None, fill=0.0):
    """float32 zeros (or ``fill``) with ``ref``'s sharding: under Explicit mesh axes the
    loop carries must match the blocks added to them, and inside ``shard_map`` they must
    vary over the manual axes that any of the inputs ``ref, *others`` varies over."""
    x = jnp.full_like(ref, fill, jnp.float32)
    return varying_like(x if shape is None else jnp.broadcast_to(x, shape), ref, *others)


def _forward(plan: _Plan, ops: _Operands):
    """Output ``[B, K, G, T', H_v]`` (float32) and log-sum-exp ``[B, K, G, T']``; rows that
    attend nothing get a zero output and ``lse = -MASKED_LOGIT`` (so their weights are 0)."""
    B, K, G, _, _ = ops.q.shape
    H_v = ops.v.shape[-1]
    Tq = plan.q_chunk
    kv_limit = _kv_limit(plan, ops)
    inputs = (ops.k, ops.v, ops.mask, ops.bias, ops.kv_lengths)

    def one_query_chunk(_, q_index):
        q_blk = _filled(
            ops.non_finite, jax.lax.dynamic_slice_in_dim(ops.q, q_index * Tq, Tq, axis=3)
        )

        def step(k_index, position_masked, partial):
            blk = _block(plan, ops, q_blk, (q_index, k_index, position_masked))
            block = online_softmax.attend_block(
                blk.logits, blk.v, keep=blk.keep, dropout_rate=plan.dropout_rate
            )
            return online_softmax.combine_partials(partial, block)

        # [B, K, G, Tq]
        row = q_blk[..., 0]
        empty = online_softmax.PartialAttention(
            acc=_zeros_like(q_blk[..., :1], *inputs, shape=(B, K, G, Tq, H_v)),
            row_max=_zeros_like(row, *inputs, fill=MASKED_LOGIT),
            row_sum=_zeros_like(row, *inputs),
        )
        partial = _visit_chunks(plan, ops.table, q_index, kv_limit, step, empty)
        return None, online_softmax.finalize(partial)

    q_indices = jnp.arange(plan.num_q_chunks, dtype=jnp.int32)
    _, (out, lse) = jax.lax.scan(one_query_chunk, None, q_indices)
    # [nq, B, K, G, Tq, H_v] -> [B, K, G, T', H_v]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, plan.T_padded, H_v)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, plan.T_padded)
    return out, lse


def _backward(plan: _Plan, ops: _Operands, out, lse, d_out, d_lse):
    """Flash-attention backward (FlashAttention-2, Algorithm 2): recomputes each block's
    weights from ``lse``; ``d_lse`` is the cotangent of ``lse`` (each weight's logit
    gradient gains ``p * d_lse``). ``(dq, dk, dv, d_bias, d_score_consts)``."""
    q, k, v, bias = ops.q, ops.k, ops.v, ops.bias
    Tq, Sk = plan.q_chunk, plan.k_chunk
    kv_limit = _kv_limit(plan, ops)
    inputs = (q, k, v, ops.mask, bias, ops.kv_lengths, d_out)
    # [B, K, G, T']
    delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)
    if d_lse is not None:
        delta = delta - d_lse

    def one_query_chunk(carry, q_index):
        q_blk = _filled(ops.non_finite, jax.lax.dynamic_slice_in_dim(q, q_index * Tq, Tq, axis=3))
        do_blk = jax.lax.dynamic_slice_in_dim(d_out, q_index * Tq, Tq, axis=3)
        lse_blk = jax.lax.dynamic_slice_in_dim(lse, q_index * Tq, Tq, axis=3)
        delta_blk = jax.lax.dynamic_slice_in_dim(delta, q_index * Tq, Tq, axis=3)

        def step(k_index, position_masked, state):
            dq, dk, dv, dbias, d_consts = state
            at = (q_index, k_index, position_masked)
            blk = _block(plan, ops, q_blk, at, with_vjp=True)
            grads = online_softmax.block_gradients(
                blk.logits,
                lse_blk,
                delta_blk,
                q_blk,
                blk.k,
                blk.v,
                do_blk,
                keep=blk.keep,
                dropout_rate=plan.dropout_rate,
                score_vjp=blk.score_vjp,
            )
            d_consts = tuple(a + b for a, b in zip(d_consts, grads.d_closure, strict=True))
            dk = _add_block(dk, grads.dk, (0, 0, k_index * Sk, 0))
            dv = _add_block(dv, grads.dv, (0, 0, k_index * Sk, 0))
            if dbias is not None:
                dbias = _add_bias_block(dbias, grads.d_logits, q_index, k_index, plan)
            return dq + grads.dq, dk, dv, dbias, d_consts

        dk, dv, dbias, d_consts = carry
        state = (_zeros_like(q_blk, *inputs), dk, dv, dbias, d_consts)
        dq, dk, dv, dbias, d_consts = _visit_chunks(plan, ops.table, q_index, kv_limit, step, state)
        return (dk, dv, dbias, d_consts), dq

    dbias0 = None if bias is None else _zeros_like(bias, *inputs)
    d_consts0 = tuple(jnp.zeros_like(c) for c in ops.score_consts)
    carry = (_zeros_like(k, *inputs), _zeros_like(v, *inputs), dbias0, d_consts0)
    q_indices = jnp.arange(plan.num_q_chunks, dtype=jnp.int32)
    (dk, dv, dbias, d_consts), dq = jax.lax.scan(one_query_chunk, carry, q_indices)
    dq = jnp.moveaxis(dq, 0, 3).reshape(q.shape)
    if plan.scale != 1.0:
        dq, dk = dq * plan.scale, dk * plan.scale
    # the derivative of the NaN policy's fill: 0 at the entries it filled
    dq, dk, dv = (_zero_where(ops.non_finite, x, g) for x, g in ((q, dq), (k, dk), (v, dv)))
    dbias = _zero_where(ops.non_finite, bias, dbias, bad_bias)
    return dq, dk, dv, dbias, d_consts


def _indices(starts):
    """int32 start indices (Python ints would be int64 under ``jax_enable_x64``)."""
    return tuple(jnp.asarray(start, jnp.int32) for start in starts)


def _add_block(x, block, starts):
    starts = _indices(starts)
    current = jax.lax.dynamic_slice(x, starts, block.shape)
    return jax.lax.dynamic_update_slice(x, current + block, starts)


def _add_bias_block(dbias, d_logits, q_index, k_index, plan: _Plan):
    """Adds a block's logit gradient into ``dbias``, summed over the bias' broadcast dims."""
    axes = tuple(axis for axis in range(5) if dbias.shape[axis] == 1 and d_logits.shape[axis] > 1)
    block = jnp.sum(d_logits, axis=axes, keepdims=True)
    starts = (
        0,
        0,
        0,
        q_index * plan.q_chunk if dbias.shape[3] > 1 else 0,
        k_index * plan.k_chunk if dbias.shape[4] > 1 else 0,
    )
    return _add_block(dbias, block, starts)


def _tangent(plan: _Plan, ops: _Operands, out, lse, d_diff):
    """Forward-mode derivative ``(d_out, d_lse)`` of :func:`_forward`'s ``(out, lse)`` in
    the direction ``d_diff = (dq, dk, dv, d_bias, d_score_consts)``, one pass over the same
    blocks (:func:`jax_attn.kernels.online_softmax.block_tangent`)."""
    dq, dk, dv, d_bias, d_score_consts = d_diff
    B, K, G, _, _ = ops.q.shape
    H_v = ops.v.shape[-1]
    Tq = plan.q_chunk
    kv_limit = _kv_limit(plan, ops)
    inputs = (ops.q, ops.k, ops.v, ops.mask, ops.bias, ops.kv_lengths, dq, dk, dv)

    def one_query_chunk(_, q_index):
        q_blk, dq_blk, lse_blk = (
            jax.lax.dynamic_slice_in_dim(x, q_index * Tq, Tq, axis=3) for x in (ops.q, dq, lse)
        )

        def step(k_index, position_masked, state):
            at = (q_index, k_index, position_masked)

            def logits_of(q_blk, k, bias, score_consts):
                differentiated = ops._replace(k=k, bias=bias, score_consts=score_consts)
                blk = _block(plan, differentiated, _filled(ops.non_finite, q_blk), at)
                return blk.logits, (blk.v, blk.keep)

            primals = (q_blk, ops.k, ops.bias, ops.score_consts)
            tangents = (dq_blk, dk, d_bias, d_score_consts)
            logits, d_logits, (v_blk, keep) = jax.jvp(logits_of, primals, tangents, has_aux=True)
            v_raw, dv_blk = (
                jax.lax.dynamic_slice_in_dim(x, k_index * plan.k_chunk, plan.k_chunk, 2)
                for x in (ops.v, dv)
            )
            dv_blk = _zero_where(ops.non_finite, v_raw, dv_blk)
            block = online_softmax.block_tangent(
                logits, lse_blk, d_logits, v_blk, dv_blk, keep=keep, dropout_rate=plan.dropout_rate
            )
            return online_softmax.BlockTangent(state.acc + block.acc, state.mu + block.mu)

        zero = online_softmax.BlockTangent(
            acc=_zeros_like(q_blk[..., :1], *inputs, shape=(B, K, G, Tq, H_v)),
            mu=_zeros_like(q_blk[..., 0], *inputs),
        )
        return None, _visit_chunks(plan, ops.table, q_index, kv_limit, step, zero)

    q_indices = jnp.arange(plan.num_q_chunks, dtype=jnp.int32)
    _, (acc, mu) = jax.lax.scan(one_query_chunk, None, q_indices)
    # [nq, B, K, G, Tq, H_v] -> [B, K, G, T', H_v]
    acc = jnp.moveaxis(acc, 0, 3).reshape(out.shape)
    mu = jnp.moveaxis(mu, 0, 3).reshape(lse.shape)
    return acc - mu[..., None] * out, mu


@functools.cache
def _rules(plan: _Plan) -> FlashRules:
    """The chunked kernel's maps for :mod:`jax_attn.kernels.flash_autodiff`, on
    ``diff = (q, k, v, bias, score_consts)`` and ``nondiff = (mask, kv_lengths, rng,
    table, mask_consts, non_finite)`` in the kernel layout; ``non_finite``: the NaN
    policy's traced condition, or ``None``, under which every map reads the blocks of
    q, k, v and the bias zero-filled (:func:`_filled`)."""

    def maps(plan: _Plan):
        def unpack(diff, nondiff) -> _Operands:
            q, k, v, bias, score_consts = diff
            mask, kv_lengths, rng, table, mask_consts, non_finite = nondiff
            return _Operands(
                q, k, v, mask, bias, kv_lengths, rng, table, mask_consts, score_consts, non_finite
            )

        def forward(diff, nondiff):
            return _forward(plan, unpack(diff, nondiff))

        def tangent(diff, nondiff, out, lse, d_diff):
            return _tangent(plan, unpack(diff, nondiff), out, lse, d_diff)

        def backward(diff, nondiff, out, lse, d_out, d_lse):
            grads = _backward(plan, unpack(diff, nondiff), out, lse, d_out, d_lse)
            return jax.tree.map(_like_primal, grads, diff)

        return forward, tangent, backward

    forward, tangent, backward = maps(plan)
    _, tangent_pure, backward_pure = maps(dataclasses.replace(plan, static_loops=True))
    return FlashRules(forward, tangent, backward, tangent_pure, backward_pure)


def _chunked_core(plan: _Plan, ops: _Operands, non_finite=None):
    """``(out, lse)`` in the kernel layout, differentiable in q, k, v, the bias and the
    arrays ``score_fn`` closes over; under the NaN policy where ``non_finite`` holds."""
    diff = (ops.q, ops.k, ops.v, ops.bias, ops.score_consts)
    nondiff = (ops.mask, ops.kv_lengths, ops.rng, ops.table, ops.mask_consts, non_finite)
    return flash_attention(_rules(plan), diff, nondiff)


def _kv_limit(plan: _Plan, ops: _Operands):
    """The key chunks past every sequence's key length are never visited."""
    return jnp.int32(plan.S) if ops.kv_lengths is None else jnp.max(ops.kv_lengths)


def _like_primal(cotangent, primal):
    """``cotangent`` in ``primal``'s dtype and manual-axis type (shared keys/values or
    learned queries inside ``shard_map``)."""
    return cotangent_like(cotangent.astype(primal.dtype), primal)


def _pad_rows(x, length: int):
    """``x [B, L, ...]`` zero-padded along axis 1 to ``length``."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _check_chunk(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)


def _as_blocks(x, B, N, K, T_pad, S_pad, pad_value):
    """A mask or bias broadcastable to ``[B, N, T, S]`` as ``[B', K', G', T', S']`` with the
    full T and S dims padded to the chunk multiples (dims of size 1 stay 1)."""
    x = jnp.asarray(x)
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    B_x, N_x, T_x, S_x = x.shape
    pads = [(0, 0), (0, 0), (0, T_pad - T_x if T_x > 1 else 0), (0, S_pad - S_x if S_x > 1 else 0)]
    x = jnp.pad(x, pads, constant_values=pad_value)
    heads = (K, N // K) if N_x > 1 else (1, 1)
    return x.reshape(B_x, *heads, x.shape[2], x.shape[3])


def _closure_converted(mask_fn, score_fn, score_dtype):
    """``(mask_fn, mask_consts, score_fn, score_consts)``: the functions with the arrays
    they close over hoisted into arguments (``jax.closure_convert``; cached per function)."""
    index = jnp.zeros((), jnp.int32)
    mask_consts, score_consts = (), ()
    if mask_fn is not None:
        mask_fn, mask_consts = jax.closure_convert(mask_fn, index, index, index, index)
    if score_fn is not None:
        score = jnp.zeros((), score_dtype)
        score_fn, score_consts = jax.closure_convert(score_fn, score, index, index, index, index)
    return mask_fn, tuple(mask_consts), score_fn, tuple(score_consts)


def _chunk_sizes(call: AttentionCall, query_chunk_size, key_chunk_size, block_mask):
    """``(query chunk, key chunk)``: the block mask's blocks, else those asked for, else the
    defaults (:data:`jax_attn.mask_functions.MASK_FN_BLOCK_SIZE` with a ``mask_fn``)."""
    if block_mask is not None:
        asked = (query_chunk_size, key_chunk_size)
        pairs = zip(asked, block_mask.block_size, strict=True)
        if any(size not in (None, own) for size, own in pairs):
            raise ValueError(
                f"query_chunk_size, key_chunk_size must be None or block_mask's block_size "
                f"{block_mask.block_size}, got {asked}"
            )
        return block_mask.block_size
    if call.has_mask_fn:
        default_q, default_k = block_sizes(call.T, call.S)
    else:
        default_q, default_k = default_chunk_sizes(call.B * call.N)
    q_chunk = _check_chunk(
        "query_chunk_size", default_q if query_chunk_size is None else query_chunk_size
    )
    k_chunk = _check_chunk(
        "key_chunk_size", default_k if key_chunk_size is None else key_chunk_size
    )
    return min(q_chunk, call.T), min(k_chunk, call.S)


def chunked_attention(
    q,
    k,
    v,
    *,
    call: AttentionCall,
    inputs: KernelInputs | None = None,
    query_chunk_size=None,
    key_chunk_size=None,
    return_lse: bool = False,
    non_finite=None,
):
    """The kernel on validated, batched inputs (the registry's ``"chunked"`` entry); called
    directly, it takes chunk sizes, and ``inputs`` may be left out when there are none.
    ``return_lse``: also the log-sum-exp ``[B, N, T]`` of each row's logits (float32; a
    row with nothing to attend, or past its query length, holds ``-MASKED_LOGIT``),
    differentiable like the output. ``non_finite``: the NaN policy's traced condition
    (``validation.nan_policy_attention``), under which the kernel and its derivatives run
    on the inputs with their NaN and Inf zero-filled, or ``None``."""
    inputs = KernelInputs() if inputs is None else inputs
    mask, bias, block_mask = inputs.mask, inputs.bias, inputs.block_mask
    q_chunk, k_chunk = _chunk_sizes(call, query_chunk_size, key_chunk_size, block_mask)
    if call.T == 0 or call.S == 0:
        out = jnp.zeros((call.B, call.T, call.N, call.H_v), call.dtype)
        lse = jnp.full((call.B, call.N, call.T), -MASKED_LOGIT, jnp.float32)
        return (out, lse) if return_lse else out
    # The scale goes into q once (not into every block of logits) where that is exact
    # enough: float32 inputs, or a power-of-two scale.
    prescale = call.dtype == np.float32 or float(np.log2(abs(call.scale) or 1.0)).is_integer()
    mask_dims = (True, True) if inputs.mask_fn is None else uses_batch_and_head(inputs.mask_fn)
    mask_fn, mask_consts, score_fn, score_consts = _closure_converted(
        inputs.mask_fn, inputs.score_fn, call.compute_dtype
    )
    plan = _Plan(
        T=call.T,
        S=call.S,
        q_chunk=q_chunk,
        k_chunk=k_chunk,
        is_causal=call.is_causal,
        window=call.window,
        scale=1.0 if prescale else call.scale,
        dropout_rate=call.dropout_rate,
        mask_shape=None if mask is None else jnp.shape(mask),
        bias_shape=None if bias is None else jnp.shape(bias),
        mask_fn=mask_fn,
        mask_dims=mask_dims,
        score_fn=score_fn,
    )
    rng = inputs.dropout_rng if call.dropout_rate > 0.0 else None
    blocks = None if block_mask is None else (block_mask.any_blocks, block_mask.full_blocks)
    return _chunked_jit(
        plan,
        call.N,
        call.K,
        call.scale if prescale else 1.0,
        return_lse,
        q,
        k,
        v,
        mask,
        bias,
        inputs.query_seq_lengths,
        inputs.key_value_seq_lengths,
        rng,
        (blocks, mask_consts, score_consts),
        non_finite,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _chunked_jit(
    plan: _Plan,
    N,
    K,
    q_scale,
    return_lse,
    q,
    k,
    v,
    mask,
    bias,
    query_seq_lengths,
    kv_seq_lengths,
    rng,
    fns,
    non_finite,
):
    """Pads and lays out the inputs for :func:`_chunked_core` (jitted: eager calls are cached).
    ``fns = (blocks, mask_consts, score_consts)``: a block mask's ``(any_blocks,
    full_blocks)`` or ``None`` (computed here from ``plan.mask_fn``), and the closures."""
    B, T, _, H = q.shape
    if q_scale != 1.0:
        q = (q.astype(jnp.float32) * q_scale).astype(q.dtype)
    S = k.shape[1]
    T_pad, S_pad = plan.T_padded, plan.S_padded
    mask_blocks = None if mask is None else _as_blocks(mask, B, N, K, T_pad, S_pad, False)
    bias_blocks = None
    if bias is not None:
        bias_blocks = _as_blocks(jnp.asarray(bias).astype(jnp.float32), B, N, K, T_pad, S_pad, 0.0)
    # [B, K, G, T', H]
    q_blocks = layout.queries_to_kernel(_pad_rows(q, T_pad), K)
    # [B, K, S', H]
    k_blocks, v_blocks = (layout.keys_to_kernel(_pad_rows(x, S_pad)) for x in (k, v))
    kv_lengths = None if kv_seq_lengths is None else jnp.asarray(kv_seq_lengths, jnp.int32)
    blocks, mask_consts, score_consts = fns
    table = None
    if plan.mask_fn is not None:
        if blocks is None:

            def mask_fn(b, h, q_idx, kv_idx):
                return plan.mask_fn(b, h, q_idx, kv_idx, *mask_consts)

            Tq, Sk = plan.q_chunk, plan.k_chunk
            blocks = block_mask_arrays(mask_fn, B, N, T, S, Tq, Sk, plan.mask_dims)
        kv_limit = jnp.int32(S) if kv_lengths is None else jnp.max(kv_lengths)
        any_blocks, full_blocks = blocks
        table = _block_table(plan, any_blocks, full_blocks, kv_limit)
    operands = _Operands(
        q_blocks,
        k_blocks,
        v_blocks,
        mask_blocks,
        bias_blocks,
        kv_lengths,
        rng,
        table,
        tuple(mask_consts),
        tuple(score_consts),
    )
    out, lse = _chunked_core(plan, operands, non_finite)
    # [B, K, G, T', H_v] -> [B, T, N, H_v]
    out = layout.queries_from_kernel(out)[:, :T]
    if query_seq_lengths is not None:
        # [B, T]
        query_ok = layout.live_rows(query_seq_lengths, T)
        out = layout.zero_rows(out, query_ok)
    if not return_lse:
        return out.astype(q.dtype)
    # [B, K, G, T'] -> [B, N, T]
    lse = lse.reshape(B, N, T_pad)[:, :, :T]
    if query_seq_lengths is not None:
        lse = jnp.where(query_ok[:, None, :], lse, -MASKED_LOGIT)
    return out.astype(q.dtype), lse


def _chunked_unsupported(call: AttentionCall, platform: str) -> str | None:
    if call.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {call.dtype} (float32, bfloat16 and float16 only)"
    return None


# nan_policy_attention passes its traced condition as `non_finite` (see _rules)
chunked_attention.takes_non_finite = True  # type: ignore[attr-defined]

IMPLEMENTATION = Implementation(
    name="chunked",
    fn=chunked_attention,
    unsupported=_chunked_unsupported,
    description="online softmax over query/key chunks, skips empty blocks, O(T) memory",
    functions=frozenset({"mask_fn", "score_fn", "block_mask"}),
)


# --- The position-masked maps in jax.nn's layout (for kernels without maps of their own) ---


@functools.cache
def position_plan(T: int, S: int, is_causal: bool, window, scale: float, static_loops: bool):
    """A :class:`_Plan` for causal/window/length masks only (no mask, bias, dropout or
    functions), the default chunks of one batch-head."""
    q_chunk, k_chunk = default_chunk_sizes(1)
    return _Plan(
        T=T,
        S=S,
        q_chunk=min(q_chunk, T),
        k_chunk=min(k_chunk, S),
        is_causal=is_causal,
        window=window,
        scale=scale,
        dropout_rate=0.0,
        mask_shape=None,
        bias_shape=None,
        static_loops=static_loops,
    )


def _to_kernel(plan: _Plan, K: int, q, k, v, out, lse, live_rows):
    """jax.nn's layout (q ``[B, T, N, H]``, k, v ``[B, S, K, H]``, out ``[B, T, N, H_v]``,
    lse ``[B, N, T]``) -> the kernel's, padded; ``lse`` at ``-MASKED_LOGIT`` (zero weights)
    on rows that attend nothing or lie past ``live_rows`` ``[B, T]``."""
    B, T, N, H = q.shape
    G, T_pad, S_pad = N // K, plan.T_padded, plan.S_padded
    rows = jnp.pad(live_rows, [(0, 0), (0, T_pad - T)])

    def queries(x):
        # [B, K, G, T', H]
        return layout.queries_to_kernel(_pad_rows(x, T_pad), K)

    def keys(x):
        # [B, K, S', H]
        return layout.keys_to_kernel(_pad_rows(x, S_pad))

    # [B, K, G, T']
    lse = jnp.pad(lse, [(0, 0), (0, 0), (0, T_pad - T)]).reshape(B, K, G, T_pad)
    attends = rows[:, None, None, :] & (lse > 0.5 * MASKED_LOGIT)
    lse = jnp.where(attends, lse, -MASKED_LOGIT)
    return queries(q), keys(k), keys(v), queries(out), lse


def _queries_back(x, T: int):
    """Kernel layout ``[B, K, G, T', H]`` -> ``[B, T, N, H]``."""
    return layout.queries_from_kernel(x)[:, :T]


def _dense_blocks(plan: _Plan, x, B: int, N: int, K: int, pad_value):
    """A 4-d mask or bias (or ``None``) as :func:`_as_blocks` lays it out for ``plan``."""
    if x is None:
        return None
    return _as_blocks(x, B, N, K, plan.T_padded, plan.S_padded, pad_value)


def position_tangent(
    plan: _Plan, diff, nondiff, out, lse, d_diff, *, rng=None, score_consts=(), mask_consts=()
):
    """:func:`_tangent` for ``diff = (q, k, v[, bias])``, ``nondiff = (q_lengths,
    kv_lengths[, mask])`` (int32 ``[B]``; bias float32 and mask bool, 4-d, broadcastable to
    ``[B, N, T, S]``) in jax.nn's layout, ``(d_out [B, T, N, H_v], d_lse [B, N, T])``; ``rng``
    the dropout key of a plan with dropout, ``score_consts`` and ``mask_consts`` the constant
    arguments of its ``score_fn`` and ``mask_fn`` (no derivative taken for them)."""
    (q, k, v, *bias), (q_lengths, kv_lengths, *mask), (dq, dk, dv, *d_bias) = (
        diff,
        nondiff,
        d_diff,
    )
    B, T, N, _ = q.shape
    K = k.shape[2]
    live = layout.live_rows(q_lengths, T)
    qk, kk, vk, outk, lsek = _to_kernel(plan, K, q, k, v, out, lse, live)
    dqk, dkk, dvk, _, _ = _to_kernel(plan, K, dq, dk, dv, out, lse, live)
    bias, d_bias = (_dense_blocks(plan, x[0] if x else None, B, N, K, 0.0) for x in (bias, d_bias))
    operands = _Operands(
        qk,
        kk,
        vk,
        mask=_dense_blocks(plan, mask[0] if mask else None, B, N, K, False),
        bias=bias,
        kv_lengths=kv_lengths,
        rng=rng,
        mask_consts=tuple(mask_consts),
        score_consts=tuple(score_consts),
    )
    d_zero_consts = tuple(jnp.zeros_like(c) for c in score_consts)
    d_out, d_lse = _tangent(plan, operands, outk, lsek, (dqk, dkk, dvk, d_bias, d_zero_consts))
    d_out = layout.zero_rows(_queries_back(d_out, T), live)
    d_lse = jnp.where(live[:, None, :], d_lse.reshape(B, N, -1)[..., :T], 0.0)
    return d_out, d_lse


def position_backward(
    plan: _Plan,
    diff,
    nondiff,
    out,
    lse,
    d_out,
    d_lse,
    *,
    rng=None,
    score_consts=(),
    mask_consts=(),
):
    """:func:`_backward` in jax.nn's layout for :func:`position_tangent`'s arguments:
    ``(dq, dk, dv[, dbias])``."""
    (q, k, v, *bias), (q_lengths, kv_lengths, *mask) = diff, nondiff
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    live = layout.live_rows(q_lengths, T)
    d_out = layout.zero_rows(d_out, live)
    if d_lse is None:
        d_lse = jnp.zeros(lse.shape, jnp.float32)
    d_lse = jnp.where(live[:, None, :], d_lse, 0.0)
    qk, kk, vk, outk, lsek = _to_kernel(plan, K, q, k, v, out, lse, live)
    d_outk = _to_kernel(plan, K, d_out, k, v, d_out, lse, live)[0]
    d_lsek = jnp.pad(d_lse, [(0, 0), (0, 0), (0, plan.T_padded - T)]).reshape(lsek.shape)
    operands = _Operands(
        qk,
        kk,
        vk,
        mask=_dense_blocks(plan, mask[0] if mask else None, B, N, K, False),
        bias=_dense_blocks(plan, bias[0] if bias else None, B, N, K, 0.0),
        kv_lengths=kv_lengths,
        rng=rng,
        mask_consts=tuple(mask_consts),
        score_consts=tuple(score_consts),
    )
    dq, dk, dv, dbias, _ = _backward(plan, operands, outk, lsek, d_outk, d_lsek)
    dk, dv = (layout.keys_from_kernel(x)[:, :S] for x in (dk, dv))
    grads = (_queries_back(dq, T).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
    if not bias:
        return grads
    # [B', K', G', T'|1, S'|1] -> the bias' [B', N', T|1, S|1]
    B_x, N_x, T_x, S_x = bias[0].shape
    dbias = dbias.reshape(B_x, N_x, *dbias.shape[3:])[:, :, :T_x, :S_x]
    return (*grads, dbias.astype(bias[0].dtype))
