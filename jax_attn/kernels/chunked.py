"""Online-softmax building blocks (and, built on them, the chunked implementation).

Attention over a long key sequence can be computed block by block: each block of
keys gives a *partial* result — an unnormalised accumulator, the running row maximum
and the row sum of exponentials — and partials combine exactly (maxtext's
``normalize_attention``; flash attention). The chunked kernel and ring attention
(:mod:`jax_attn.sharding`) both use :func:`attend_block`, :func:`combine_partials`
and :func:`finalize_partial`; there is one combine in the library.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.kernels.base import Implementation
from jax_attn.masks import make_dropout_mask
from jax_attn.validation import AttentionCall, batched_inputs, check_attention_args

__all__ = [
    "PartialAttention",
    "attend_block",
    "combine_partials",
    "empty_partial",
    "finalize_partial",
    "MASKED_LOGIT",
    "CHUNK_BUDGET",
    "chunked_attention",
    "default_chunk_sizes",
    "dot_product_attention",
]

# Finite "minus infinity" for float32 logits: exp(MASKED_LOGIT - m) underflows to 0
# and a block with nothing to attend never produces NaN.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


class PartialAttention(NamedTuple):
    """Attention of queries over a subset of keys, not yet normalised.

    acc ``[B, T, N, H_v]``: ``sum_s exp(logit_s - row_max) * v_s`` (float32);
    row_max ``[B, T, N]``: max valid logit (``MASKED_LOGIT`` if none);
    row_sum ``[B, T, N]``: ``sum_s exp(logit_s - row_max)`` over valid keys (0 if none).
    """

    acc: jnp.ndarray
    row_max: jnp.ndarray
    row_sum: jnp.ndarray


def empty_partial(B: int, T: int, N: int, H_v: int, dtype=jnp.float32) -> PartialAttention:
    """The identity of :func:`combine_partials`: attention over no keys."""
    return PartialAttention(
        acc=jnp.zeros((B, T, N, H_v), dtype),
        row_max=jnp.full((B, T, N), MASKED_LOGIT, dtype),
        row_sum=jnp.zeros((B, T, N), dtype),
    )


def attend_block(q, k, v, *, scale: float, mask=None, bias=None, keep=None, dropout_rate=0.0):
    """Partial attention of ``q [B, T, N, H]`` over one block ``k, v [B, S, K, H(_v)]``.

    ``mask`` (bool) and ``bias`` broadcast to ``[B, N, T, S]``; ``-inf`` bias counts as
    masked. ``keep`` (bool ``[B, N, T, S]``) is this block's slice of the dropout mask:
    dropped weights leave the accumulator but still count in the row sum, so the
    result equals dropout applied after the softmax, as in the book.
    """
    B, T, N, H = q.shape
    _, S, K, H_v = v.shape
    G = N // K
    compute = jnp.promote_types(q.dtype, jnp.float32)
    # [B, K, G, T, S]
    logits = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q.reshape(B, T, K, G, H), k, preferred_element_type=compute
    )
    logits = logits.reshape(B, N, T, S) * jnp.asarray(scale, compute)
    valid = None
    if bias is not None:
        bias = jnp.asarray(bias).astype(compute)
        logits = logits + bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        valid = logits > -jnp.inf
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        valid = mask if valid is None else valid & mask
    if valid is not None:
        logits = jnp.where(valid, logits, MASKED_LOGIT)
    # [B, N, T]
    row_max = jnp.max(logits, axis=-1)
    probs = jnp.exp(logits - row_max[..., None])
    if valid is not None:
        probs = jnp.where(valid, probs, 0.0)
    row_sum = jnp.sum(probs, axis=-1)
    if keep is not None:
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    # [B, T, K, G, H_v]
    acc = jnp.einsum(
        "BKGTS,BSKH->BTKGH", probs.reshape(B, K, G, T, S).astype(compute), v.astype(compute)
    )
    return PartialAttention(
        acc=acc.reshape(B, T, N, H_v),
        row_max=jnp.transpose(row_max, (0, 2, 1)),
        row_sum=jnp.transpose(row_sum, (0, 2, 1)),
    )


def combine_partials(a: PartialAttention, b: PartialAttention) -> PartialAttention:
    """Exact merge of two partials over disjoint key sets (associative, commutative)."""
    row_max = jnp.maximum(a.row_max, b.row_max)
    scale_a = jnp.exp(a.row_max - row_max)
    scale_b = jnp.exp(b.row_max - row_max)
    return PartialAttention(
        acc=a.acc * scale_a[..., None] + b.acc * scale_b[..., None],
        row_max=row_max,
        row_sum=a.row_sum * scale_a + b.row_sum * scale_b,
    )


def finalize_partial(partial: PartialAttention, dtype) -> jnp.ndarray:
    """``acc / row_sum`` in ``dtype``; rows that saw no valid key give zeros."""
    has_keys = partial.row_sum > 0
    denominator = jnp.where(has_keys, partial.row_sum, 1.0)
    out = jnp.where(has_keys[..., None], partial.acc / denominator[..., None], 0.0)
    return out.astype(dtype)


# --- The chunked implementation -----------------------------------------------------------
#
# Layout inside the kernel: q [B, K, G, T, H], k [B, K, S, H], v [B, K, S, H_v], so every
# block is a plain batched matrix product. Query chunks form the outer loop (lax.scan),
# key/value chunks the inner one (lax.fori_loop with traced bounds): only the key chunks
# that the causal mask, the window and the key lengths leave non-empty are visited, and
# the position masks are applied only on the boundary chunks.

# Per platform: (smallest query chunk, largest query chunk, float32 logits per block
# [B, N, Tq, Sk], query chunk / key chunk). On CPU a block's scores should stay in cache
# (2 MiB L2 per core here): for GPT-2 small (B*N = 96), 128 x 64 blocks were the fastest of
# 64..256 x 64..128, measured side by side (docs/performance.md). GPUs want large blocks
# (not measured this session).
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
    return jax.lax.dynamic_slice(x, starts, sizes)


def _block_logits(plan: _Plan, q_blk, k, mask, bias, kv_lengths, q_index, k_index, position_masked):
    """float32 logits ``[B, K, G, Tq, Sk]`` of one block, masked entries at ``MASKED_LOGIT``.

    The causal/window/key-range masks matter only when the traced bool
    ``position_masked`` says the block crosses their boundary. Entries whose bias is
    ``-inf`` stay ``-inf`` (they count as masked)."""
    Tq, Sk = plan.q_chunk, plan.k_chunk
    k_blk = jax.lax.dynamic_slice_in_dim(k, k_index * Sk, Sk, axis=2)
    # [B, K, G, Tq, Sk]
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_blk, k_blk, preferred_element_type=jnp.float32)
    if plan.scale != 1.0:
        logits = logits * jnp.float32(plan.scale)
    if bias is not None:
        logits = logits + _slice_broadcast(bias, q_index, k_index, plan)
    key_pos = k_index * Sk + jnp.arange(Sk, dtype=jnp.int32)
    valid = None
    if plan.is_causal or plan.window is not None or plan.S_padded != plan.S:
        query_pos = q_index * Tq + jnp.arange(Tq, dtype=jnp.int32)[:, None] + plan.S - plan.T
        # [Tq, Sk]; a select that XLA fuses into the reductions that read the logits
        inside = jnp.broadcast_to(key_pos < plan.S, (Tq, Sk))
        if plan.is_causal:
            inside = inside & (key_pos <= query_pos)
        if plan.window is not None:
            left, right = plan.window
            inside = inside & (key_pos >= query_pos - left) & (key_pos <= query_pos + right)
        valid = inside | jnp.logical_not(position_masked)
    if mask is not None:
        block_mask = _slice_broadcast(mask, q_index, k_index, plan)
        valid = block_mask if valid is None else valid & block_mask
    if kv_lengths is not None:
        # [B, 1, 1, 1, Sk]
        key_ok = key_pos < kv_lengths[:, None, None, None, None]
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


def _forward(plan: _Plan, q, k, v, mask, bias, kv_lengths, rng):
    """Output ``[B, K, G, T', H_v]`` (float32) and log-sum-exp ``[B, K, G, T']``; rows that
    attend nothing get a zero output and ``lse = -MASKED_LOGIT`` (so their weights are 0)."""
    B, K, G, _, _ = q.shape
    H_v = v.shape[-1]
    Tq, Sk = plan.q_chunk, plan.k_chunk
    kv_limit = jnp.int32(plan.S) if kv_lengths is None else jnp.max(kv_lengths)

    def one_query_chunk(_, q_index):
        q_blk = jax.lax.dynamic_slice_in_dim(q, q_index * Tq, Tq, axis=3)

        def step(k_index, position_masked, state):
            acc, row_max, row_sum = state
            logits = _block_logits(
                plan, q_blk, k, mask, bias, kv_lengths, q_index, k_index, position_masked
            )
            new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
            probs = jnp.exp(logits - new_max[..., None])
            correction = jnp.exp(row_max - new_max)
            row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
            if plan.dropout_rate > 0.0:
                keep = _block_keep(plan, rng, B, K, G, q_index, k_index)
                probs = jnp.where(keep, probs * (1.0 / (1.0 - plan.dropout_rate)), 0.0)
            v_blk = jax.lax.dynamic_slice_in_dim(v, k_index * Sk, Sk, axis=2)
            # [B, K, G, Tq, H_v]
            update = jnp.einsum(
                "BKGTS,BKSH->BKGTH",
                probs.astype(v.dtype),
                v_blk,
                preferred_element_type=jnp.float32,
            )
            return acc * correction[..., None] + update, new_max, row_sum

        state = (
            jnp.zeros((B, K, G, Tq, H_v), jnp.float32),
            jnp.full((B, K, G, Tq), MASKED_LOGIT, jnp.float32),
            jnp.zeros((B, K, G, Tq), jnp.float32),
        )
        acc, row_max, row_sum = _visit(*_key_chunk_ranges(plan, q_index, kv_limit), step, state)
        # A row that met no valid key keeps row_max == MASKED_LOGIT (its masked entries were
        # counted with weight exp(0) = 1 and are discarded here).
        has_keys = row_max > MASKED_LOGIT
        safe_sum = jnp.where(has_keys, row_sum, 1.0)
        out = jnp.where(has_keys[..., None], acc / safe_sum[..., None], 0.0)
        lse = jnp.where(has_keys, row_max + jnp.log(safe_sum), -MASKED_LOGIT)
        return None, (out, lse)

    _, (out, lse) = jax.lax.scan(one_query_chunk, None, jnp.arange(plan.num_q_chunks))
    # [nq, B, K, G, Tq, H_v] -> [B, K, G, T', H_v]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, plan.T_padded, H_v)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, plan.T_padded)
    return out, lse


def _backward(plan: _Plan, q, k, v, mask, bias, kv_lengths, rng, out, lse, d_out):
    """Flash-attention backward: recomputes each block's weights from ``lse``."""
    B, K, G, _, H = q.shape
    Tq, Sk = plan.q_chunk, plan.k_chunk
    kv_limit = jnp.int32(plan.S) if kv_lengths is None else jnp.max(kv_lengths)
    # [B, K, G, T']
    delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)

    def one_query_chunk(carry, q_index):
        q_blk = jax.lax.dynamic_slice_in_dim(q, q_index * Tq, Tq, axis=3)
        do_blk = jax.lax.dynamic_slice_in_dim(d_out, q_index * Tq, Tq, axis=3)
        lse_blk = jax.lax.dynamic_slice_in_dim(lse, q_index * Tq, Tq, axis=3)
        delta_blk = jax.lax.dynamic_slice_in_dim(delta, q_index * Tq, Tq, axis=3)

        def step(k_index, position_masked, state):
            dq, dk, dv, dbias = state
            logits = _block_logits(
                plan, q_blk, k, mask, bias, kv_lengths, q_index, k_index, position_masked
            )
            # [B, K, G, Tq, Sk]
            probs = jnp.exp(logits - lse_blk[..., None])
            v_blk = jax.lax.dynamic_slice_in_dim(v, k_index * Sk, Sk, axis=2)
            k_blk = jax.lax.dynamic_slice_in_dim(k, k_index * Sk, Sk, axis=2)
            # [B, K, G, Tq, Sk]
            d_probs = jnp.einsum(
                "BKGTH,BKSH->BKGTS", do_blk, v_blk, preferred_element_type=jnp.float32
            )
            dropped = probs
            if plan.dropout_rate > 0.0:
                keep = _block_keep(plan, rng, B, K, G, q_index, k_index)
                factor = jnp.where(keep, jnp.float32(1.0 / (1.0 - plan.dropout_rate)), 0.0)
                dropped = probs * factor
                d_probs = d_probs * factor
            d_logits = probs * (d_probs - delta_blk[..., None])
            # [B, K, S, H_v]
            dv_blk = jnp.einsum(
                "BKGTS,BKGTH->BKSH",
                dropped.astype(d_out.dtype),
                do_blk,
                preferred_element_type=jnp.float32,
            )
            # [B, K, S, H]
            dk_blk = jnp.einsum(
                "BKGTS,BKGTH->BKSH",
                d_logits.astype(q.dtype),
                q_blk,
                preferred_element_type=jnp.float32,
            )
            # [B, K, G, Tq, H]
            dq = dq + jnp.einsum(
                "BKGTS,BKSH->BKGTH",
                d_logits.astype(k.dtype),
                k_blk,
                preferred_element_type=jnp.float32,
            )
            dk = _add_block(dk, dk_blk, (0, 0, k_index * Sk, 0))
            dv = _add_block(dv, dv_blk, (0, 0, k_index * Sk, 0))
            if dbias is not None:
                dbias = _add_bias_block(dbias, d_logits, q_index, k_index, plan)
            return dq, dk, dv, dbias

        dk, dv, dbias = carry
        state = (jnp.zeros(q_blk.shape, jnp.float32), dk, dv, dbias)
        dq, dk, dv, dbias = _visit(*_key_chunk_ranges(plan, q_index, kv_limit), step, state)
        return (dk, dv, dbias), dq

    dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), dbias0)
    (dk, dv, dbias), dq = jax.lax.scan(one_query_chunk, carry, jnp.arange(plan.num_q_chunks))
    dq = jnp.moveaxis(dq, 0, 3).reshape(q.shape)
    if plan.scale != 1.0:
        dq, dk = dq * plan.scale, dk * plan.scale
    return dq, dk, dv, dbias


def _add_block(x, block, starts):
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_core(plan: _Plan, q, k, v, mask, bias, kv_lengths, rng):
    out, _ = _forward(plan, q, k, v, mask, bias, kv_lengths, rng)
    return out


def _chunked_core_fwd(plan, q, k, v, mask, bias, kv_lengths, rng):
    out, lse = _forward(plan, q, k, v, mask, bias, kv_lengths, rng)
    return out, (q, k, v, mask, bias, kv_lengths, rng, out, lse)


def _chunked_core_bwd(plan, residuals, d_out):
    q, k, v, mask, bias, kv_lengths, rng, out, lse = residuals
    dq, dk, dv, dbias = _backward(plan, q, k, v, mask, bias, kv_lengths, rng, out, lse, d_out)
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        None,
        None if bias is None else dbias.astype(bias.dtype),
        None,
        None,
    )


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


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


def dot_product_attention(
    query,
    key,
    value,
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
    implementation=None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
):
    """Chunked attention with O(T) memory; same semantics as :mod:`jax_attn.reference`.

    q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, H_v]`` (or unbatched) ->
    ``[B, T, N, H_v]`` in q's dtype. Key chunks that the causal mask or the window leave
    empty are skipped; the gradient recomputes each block (flash-attention backward), so
    neither pass holds a ``[T, S]`` array (a full-size ``mask`` or ``bias`` argument is, of
    course, its own size). ``query_chunk_size``/``key_chunk_size`` default to
    :func:`default_chunk_sizes` for ``B * N``; ``implementation`` must be None or ``"chunked"``.
    """
    if implementation not in (None, "chunked"):
        raise ValueError(
            f"chunked.dot_product_attention: implementation must be None or 'chunked', "
            f"got {implementation!r}"
        )
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
    q, k, v = batched_inputs(call, query, key, value)
    out = chunked_attention(
        q,
        k,
        v,
        call=call,
        mask=mask,
        bias=bias,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        dropout_rng=dropout_rng,
        query_chunk_size=query_chunk_size,
        key_chunk_size=key_chunk_size,
    )
    return out if call.batched else out[0]


def chunked_attention(
    q,
    k,
    v,
    *,
    call: AttentionCall,
    mask=None,
    bias=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    dropout_rng=None,
    query_chunk_size=None,
    key_chunk_size=None,
):
    """The kernel on validated, batched inputs (the registry's ``"chunked"`` entry)."""
    default_q, default_k = default_chunk_sizes(call.B * call.N)
    q_chunk = _check_chunk(
        "query_chunk_size", default_q if query_chunk_size is None else query_chunk_size
    )
    k_chunk = _check_chunk(
        "key_chunk_size", default_k if key_chunk_size is None else key_chunk_size
    )
    if call.T == 0 or call.S == 0:
        return jnp.zeros((call.B, call.T, call.N, call.H_v), call.dtype)
    q_chunk, k_chunk = min(q_chunk, call.T), min(k_chunk, call.S)
    # The scale goes into q once (not into every block of logits) where that is exact
    # enough: float32 inputs, or a power-of-two scale.
    prescale = call.dtype == np.float32 or float(np.log2(abs(call.scale) or 1.0)).is_integer()
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
    )
    rng = dropout_rng if call.dropout_rate > 0.0 else None
    return _chunked_jit(
        plan,
        call.N,
        call.K,
        call.scale if prescale else 1.0,
        q,
        k,
        v,
        mask,
        bias,
        query_seq_lengths,
        key_value_seq_lengths,
        rng,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _chunked_jit(
    plan: _Plan, N, K, q_scale, q, k, v, mask, bias, query_seq_lengths, kv_seq_lengths, rng
):
    """Pads and lays out the inputs for :func:`_chunked_core` (jitted: eager calls are cached)."""
    B, T, _, H = q.shape
    if q_scale != 1.0:
        q = (q.astype(jnp.float32) * q_scale).astype(q.dtype)
    S, H_v, G = k.shape[1], v.shape[-1], N // K
    T_pad, S_pad = plan.T_padded, plan.S_padded
    mask_blocks = None if mask is None else _as_blocks(mask, B, N, K, T_pad, S_pad, False)
    bias_blocks = None
    if bias is not None:
        bias_blocks = _as_blocks(jnp.asarray(bias).astype(jnp.float32), B, N, K, T_pad, S_pad, 0.0)
    # [B, K, G, T', H]
    q_blocks = jnp.pad(q, [(0, 0), (0, T_pad - T), (0, 0), (0, 0)])
    q_blocks = jnp.transpose(q_blocks.reshape(B, T_pad, K, G, H), (0, 2, 3, 1, 4))
    # [B, K, S', H]
    k_blocks = jnp.transpose(jnp.pad(k, [(0, 0), (0, S_pad - S), (0, 0), (0, 0)]), (0, 2, 1, 3))
    v_blocks = jnp.transpose(jnp.pad(v, [(0, 0), (0, S_pad - S), (0, 0), (0, 0)]), (0, 2, 1, 3))
    kv_lengths = None if kv_seq_lengths is None else jnp.asarray(kv_seq_lengths, jnp.int32)
    out = _chunked_core(
        plan, q_blocks, k_blocks, v_blocks, mask_blocks, bias_blocks, kv_lengths, rng
    )
    # [B, K, G, T', H_v] -> [B, T, N, H_v]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T_pad, N, H_v)[:, :T]
    if query_seq_lengths is not None:
        query_ok = jnp.arange(T)[None, :] < jnp.asarray(query_seq_lengths)[:, None]
        out = jnp.where(query_ok[:, :, None, None], out, 0.0)
    return out.astype(q.dtype)


def _chunked_unsupported(call: AttentionCall, platform: str) -> str | None:
    if call.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {call.dtype} (float32, bfloat16 and float16 only)"
    return None


IMPLEMENTATION = Implementation(
    name="chunked",
    fn=chunked_attention,
    unsupported=_chunked_unsupported,
    description="online softmax over query/key chunks, skips empty blocks, O(T) memory",
)
