"""Ring attention: sequence-parallel attention over one mesh axis (``shard_map`` +
``ppermute``), and the ``"ring"`` implementation of the dispatcher.

q, k and v are split along the sequence over the mesh axis; the key/value blocks travel
round the ring with ``jax.lax.ppermute`` (a collective-permute) and each device folds
them into its queries' partial results with the online softmax of
:mod:`jax_attn.kernels.online_softmax`. Causal attention uses the zig-zag layout (device
``i`` holds sequence chunks ``i`` and ``2P - 1 - i`` of ``2P``) so every device does the
same work and blocks entirely in the future are skipped. Gradients come from a custom
VJP that runs a second ring pass (the online softmax's block backward), passing dK/dV
round with the blocks; no device ever holds anything of size ``T`` or ``T x S``.

``implementation="ring"`` (the dispatcher's entry, :func:`ring_kernel`) takes the mesh
set with ``jax.set_mesh(mesh)`` and runs over its ``"seq"`` axis, the batch over
``"data"`` and the heads over ``"model"`` where the mesh has them. :func:`ring_axes`
(re-exported as ``jax_attn.sharding.ring_axes``) names other axes::

    mesh = jax.make_mesh((2, 4), ("batch", "sequence"))
    with jax.set_mesh(mesh), ring_axes(seq="sequence", batch="batch"):
        out = jax.jit(f)(q, k, v)  # f calls dot_product_attention(..., implementation="ring")

It is read when the attention is **traced**, like the mesh, so it must wrap the ``jax.jit``
trace (the call, ``.lower``, or the module ``apply`` inside the jitted function). Like
``jax.set_mesh`` it is part of ``jax.jit``'s cache key (a ``jax.make_user_context``):
calling a jitted function under other axes traces it again.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_attn.kernels import layout
from jax_attn.kernels.base import cotangent_like, manual_axes, varying_like
from jax_attn.kernels.contract import AttentionCall, Implementation, KernelInputs, compute_dtype
from jax_attn.kernels.flash_autodiff import FlashRules, flash_attention
from jax_attn.kernels.online_softmax import (
    BlockTangent,
    PartialAttention,
    attend_block,
    block_gradients,
    block_logits,
    block_tangent,
    combine_partials,
    empty_partial,
    finalize,
)
from jax_attn.masks import MASKED_LOGIT, visible
from jax_attn.validation import finite_or_zero

__all__ = [
    "DEFAULT_MAX_BLOCK_SIZE",
    "IMPLEMENTATION",
    "RING_AXIS",
    "RingAxes",
    "current_ring_axes",
    "default_block_size",
    "ring_attention_core",
    "ring_axes",
    "ring_kernel",
]

# The default mesh axes of the "ring" implementation: the sequence over "seq"; "data" and
# "model" (when the mesh has them and they divide the batch and the heads) split the batch
# and the heads. ring_axes(...) names others.
RING_AXIS = "seq"
BATCH_AXIS = "data"
HEAD_AXIS = "model"
DEFAULT_MAX_BLOCK_SIZE = 512


@dataclasses.dataclass(frozen=True)
class RingAxes:
    """The mesh axes ``implementation="ring"`` uses: ``seq`` splits the sequence (the
    ring); ``batch`` and ``heads`` split the batch and the heads when the mesh has them and
    they divide ``B`` and ``K`` (``None``: never split)."""

    seq: str = RING_AXIS
    batch: str | None = BATCH_AXIS
    heads: str | None = HEAD_AXIS


# A jax.make_user_context: a thread-local, nestable setting that is part of jax.jit's
# cache key, so a function traced under one ring_axes is traced again under another
# (a plain contextvars.ContextVar would silently reuse the first trace).
_RING_AXES = jax.make_user_context(RingAxes())
_UNSET = object()
_HOW_TO_CONFIGURE = "name another with jax_attn.sharding.ring_axes(seq=...)"


def current_ring_axes() -> RingAxes:
    """The :class:`RingAxes` in effect here (the innermost :func:`ring_axes`)."""
    return _RING_AXES.value


def _check_axis_name(argument: str, value, optional: bool):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        allowed = "a non-empty str or None" if optional else "a non-empty str"
        raise TypeError(
            f"ring_axes: {argument} must be {allowed} (a mesh axis name), got {value!r}"
        )
    return value


class ring_axes:  # noqa: N801 - used like a function, as jax.set_mesh and nn.logical_axis_rules
    """Context manager: the mesh axes ``dot_product_attention(..., implementation="ring")``
    (and so ``MultiHeadAttention(implementation="ring")``) runs over.

    ``seq`` names the axis the sequence is split over (the ring, default ``"seq"``);
    ``batch`` (default ``"data"``) and ``heads`` (default ``"model"``) the axes the batch
    and the heads go over when the mesh has them and they divide ``B`` and ``K``; ``None``
    never splits them. An argument left out keeps the enclosing setting, so contexts nest;
    the previous setting comes back on exit. The names are checked here, before anything
    is traced; the mesh itself still comes from ``jax.set_mesh``::

        mesh = jax.make_mesh((2, 4), ("batch", "sequence"))
        with jax.set_mesh(mesh), ring_axes(seq="sequence", batch="batch"):
            out = jax.jit(f)(q, k, v)

    It is read when the attention is traced, so it must wrap the ``jax.jit`` call (or the
    module call inside the jitted function); it is part of ``jax.jit``'s cache key, so
    calling a jitted function under other axes traces it again. The setting is
    thread-local, as ``jax.set_mesh``'s is.
    """

    def __init__(self, seq=_UNSET, batch=_UNSET, heads=_UNSET):
        given = {
            name: _check_axis_name(name, value, optional=name != "seq")
            for name, value in (("seq", seq), ("batch", batch), ("heads", heads))
            if value is not _UNSET
        }
        self._given = given
        self._entered: list = []

    def _axes(self) -> RingAxes:
        axes = dataclasses.replace(current_ring_axes(), **self._given)
        names = [("seq", axes.seq), ("batch", axes.batch), ("heads", axes.heads)]
        for i, (first, a) in enumerate(names):
            for second, b in names[i + 1 :]:
                if a is not None and a == b:
                    raise ValueError(
                        f"ring_axes: {first} and {second} must name different mesh axes, "
                        f"both are {a!r}"
                    )
        return axes

    def __enter__(self) -> RingAxes:
        axes = self._axes()
        context = _RING_AXES(axes)
        context.__enter__()
        self._entered.append(context)
        return axes

    def __exit__(self, *exc_info) -> None:
        self._entered.pop().__exit__(*exc_info)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._given.items())
        return f"ring_axes({args})"


def default_block_size(keys: int, largest: int = DEFAULT_MAX_BLOCK_SIZE) -> int:
    """The largest divisor of ``keys`` up to ``largest``; ``keys`` itself if that divisor
    is below ``largest // 8`` (a prime-ish chunk: one block beats thousands of tiny ones)."""
    if keys <= largest:
        return keys
    best = max(d for d in range(1, largest + 1) if keys % d == 0)
    return best if best >= largest // 8 else keys


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring-attention call (hashable: a custom_vjp nondiff arg)."""

    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
    axis_name: str
    devices: int
    is_causal: bool
    scale: float
    block_size: int
    query_block_size: int
    batch_axis_name: str | None = None
    head_axis_name: str | None = None

    @property
    def zigzag(self) -> bool:
        return self.is_causal and self.devices > 1

    @property
    def spec(self) -> P:
        """``[B, T, N, ...]`` arrays: batch, sequence and heads over their mesh axes."""
        return P(self.batch_axis_name, self.axis_name, self.head_axis_name)

    def shift(self, x):
        """Sends ``x`` from device ``i`` to device ``i + 1`` round the ring."""
        n = self.devices
        if n == 1:
            return x
        return lax.ppermute(x, self.axis_name, [(i, (i + 1) % n) for i in range(n)])


# --- zig-zag layout: the sequence in 2P chunks; in natural order device s holds chunks 2s
# and 2s+1, in zig-zag order device d holds chunks d and 2P-1-d. Arrays are [B, T, ...].


def _zigzag_home(chunk: int, n: int) -> int:
    return chunk if chunk < n else 2 * n - 1 - chunk


def _to_zigzag(ring: _Ring, x):
    """Local ``[B, 2c, ...]`` in natural order -> the device's zig-zag chunks."""
    n = ring.devices
    c = x.shape[1] // 2
    even, odd = x[:, :c], x[:, c:]
    got_even = lax.ppermute(even, ring.axis_name, [(s, _zigzag_home(2 * s, n)) for s in range(n)])
    got_odd = lax.ppermute(odd, ring.axis_name, [(s, _zigzag_home(2 * s + 1, n)) for s in range(n)])
    device_is_even = lax.axis_index(ring.axis_name) % 2 == 0
    first = jnp.where(device_is_even, got_even, got_odd)
    second = jnp.where(device_is_even, got_odd, got_even)
    return jnp.concatenate([first, second], axis=1)


def _from_zigzag(ring: _Ring, x):
    """Inverse of :func:`_to_zigzag`."""
    n = ring.devices
    c = x.shape[1] // 2
    device_is_even = lax.axis_index(ring.axis_name) % 2 == 0
    even = jnp.where(device_is_even, x[:, :c], x[:, c:])
    odd = jnp.where(device_is_even, x[:, c:], x[:, :c])
    even_chunk = [d if d % 2 == 0 else 2 * n - 1 - d for d in range(n)]
    odd_chunk = [2 * n - 1 - d if d % 2 == 0 else d for d in range(n)]
    got_even = lax.ppermute(even, ring.axis_name, [(d, even_chunk[d] // 2) for d in range(n)])
    got_odd = lax.ppermute(odd, ring.axis_name, [(d, odd_chunk[d] // 2) for d in range(n)])
    return jnp.concatenate([got_even, got_odd], axis=1)


def _positions(ring: _Ring, device, length: int):
    """Global sequence positions ``[length]`` of the rows device ``device`` holds."""
    if not ring.zigzag:
        return device * length + jnp.arange(length, dtype=jnp.int32)
    c = length // 2
    rows = jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([device * c + rows, (2 * ring.devices - 1 - device) * c + rows])


# --- blocks, in the kernel layout of online_softmax: q [B, K, G, T, H], k [B, K, S, H]


def _split_blocks(x, blocks: int, axis: int):
    """Splits ``axis`` into ``blocks`` and moves the block index first (to scan over)."""
    shape = x.shape[:axis] + (blocks, x.shape[axis] // blocks) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge_blocks(x, axis: int):
    """Inverse of :func:`_split_blocks`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _pad(x, axis: int, before: int = 0, after: int = 0):
    return jnp.pad(x, [(before, after) if i == axis else (0, 0) for i in range(x.ndim)])


def _masked_logits(ring: _Ring, q, k, q_pos, k_pos, kv_lengths, causal: bool):
    """Logits ``[B, K, G, T, S]``; keys after the query (``causal``) or past the key
    length at ``MASKED_LOGIT``."""
    T, S = q.shape[3], k.shape[2]
    logits = block_logits(q, k, ring.scale)
    # [B|1, 1, 1, T|1, S]
    valid = visible(
        q_pos.reshape(1, 1, 1, T, 1),
        k_pos.reshape(1, 1, 1, 1, S),
        is_causal=causal,
        kv_lengths=kv_lengths,
    )
    return logits if valid is None else jnp.where(valid, logits, MASKED_LOGIT)


def _attend(ring: _Ring, q, k, v, q_pos, k_pos, kv_lengths, causal: bool) -> PartialAttention:
    """Partial attention of local ``q`` over ``k, v`` in ``[query_block_size,
    block_size]`` blocks."""
    blocks = max(1, q.shape[3] // ring.query_block_size)
    attend = functools.partial(
        _attend_keys, ring, k=k, v=v, k_pos=k_pos, kv_lengths=kv_lengths, causal=causal
    )
    if blocks == 1:
        return attend(q, q_pos)
    partials = lax.map(
        lambda xs: attend(*xs), (_split_blocks(q, blocks, 3), _split_blocks(q_pos, blocks, 0))
    )
    return PartialAttention(*(_merge_blocks(x, 3) for x in partials))


def _attend_keys(ring: _Ring, q, q_pos, *, k, v, k_pos, kv_lengths, causal) -> PartialAttention:
    """Partial attention of ``q`` over ``k, v``, ``block_size`` keys at a time."""
    blocks = max(1, k.shape[2] // ring.block_size)

    def one_block(partial, kv):
        k_b, v_b, k_pos_b = kv
        logits = _masked_logits(ring, q, k_b, q_pos, k_pos_b, kv_lengths, causal)
        return combine_partials(partial, attend_block(logits, v_b)), None

    if blocks == 1:
        return attend_block(_masked_logits(ring, q, k, q_pos, k_pos, kv_lengths, causal), v)
    B, K, G, T, _ = q.shape
    empty = empty_partial(B, K, G, T, v.shape[-1], compute_dtype(q.dtype))
    xs = (_split_blocks(k, blocks, 2), _split_blocks(v, blocks, 2), _split_blocks(k_pos, blocks, 0))
    return lax.scan(one_block, empty, xs)[0]


def _concat_partials(first: PartialAttention, second: PartialAttention) -> PartialAttention:
    """Partials of two query ranges -> the partial of both (along T)."""
    pairs = zip(first, second, strict=True)
    return PartialAttention(*(jnp.concatenate(pair, axis=3) for pair in pairs))


def _visiting(ring: _Ring, index, s, kernels: tuple, q, k, v):
    """Step ``s`` of the ring: ``kernels = (earlier, later, every)``, each
    ``(q, k, v, k_pos) -> block``, applied to the keys ``k, v`` that came from device
    ``(index - s)``: ``earlier`` or ``later`` (its chunks before or after ours) when
    causal, else ``every``."""
    earlier, later, every = kernels
    source = (index - s) % ring.devices
    k_pos = _positions(ring, source, jax.tree.leaves(k)[0].shape[2])
    if ring.is_causal:
        return lax.cond(source < index, earlier, later, q, k, v, k_pos)
    return every(q, k, v, k_pos)


def _ring_forward_local(ring: _Ring, q, k, v, kv_lengths):
    """Per-device forward on zig-zag (or contiguous) local blocks -> (out, lse)."""
    B, K, G, T, _ = q.shape
    S, H_v = k.shape[2], v.shape[-1]
    c, S_c = T // 2, S // 2
    index = lax.axis_index(ring.axis_name)
    q_pos = _positions(ring, index, T)
    attend = functools.partial(_attend, ring, kv_lengths=kv_lengths, causal=False)
    partial = _attend(ring, q, k, v, q_pos, _positions(ring, index, S), kv_lengths, ring.is_causal)

    def earlier_keys(q, k, v, k_pos):
        # The block's chunks j < i: every local query sees its first chunk only.
        return attend(q, k[:, :, :S_c], v[:, :, :S_c], q_pos, k_pos[:S_c])

    def later_keys(q, k, v, k_pos):
        # j > i: only the late query chunk sees it, and sees all of it.
        late = attend(q[:, :, :, c:], k, v, q_pos[c:], k_pos)
        empty = empty_partial(B, K, G, c, H_v, late.acc.dtype)
        return _concat_partials(empty, late)

    def all_keys(q, k, v, k_pos):
        return attend(q, k, v, q_pos, k_pos)

    def step(s, carry):
        # k, v came from device (index - s); the next block's transfer starts before this
        # block's compute and does not depend on it, so the two can overlap.
        partial, k, v = carry
        k_next, v_next = ring.shift(k), ring.shift(v)
        block = _visiting(ring, index, s, (earlier_keys, later_keys, all_keys), q, k, v)
        return combine_partials(partial, block), k_next, v_next

    partial = lax.fori_loop(1, ring.devices, step, (partial, ring.shift(k), ring.shift(v)))[0]
    return finalize(partial)


class _GradOperands(NamedTuple):
    """What the backward of local queries against some keys reads, in the kernel layout:
    q ``[B, K, G, T, H]``, k ``[B, K, S, H]``, v ``[B, K, S, H_v]``, d_out
    ``[B, K, G, T, H_v]``, lse and ``delta = sum(d_out * out, -1) - d_lse`` ``[B, K, G, T]``,
    and the global positions of the queries ``q_pos [T]`` and keys ``k_pos [S]``."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    d_out: jax.Array
    lse: jax.Array
    delta: jax.Array
    q_pos: jax.Array
    k_pos: jax.Array

    def query_rows(self, rows: slice) -> _GradOperands:
        """The same keys, the query rows ``rows`` only."""
        return self._replace(
            q=self.q[:, :, :, rows],
            d_out=self.d_out[:, :, :, rows],
            lse=self.lse[..., rows],
            delta=self.delta[..., rows],
            q_pos=self.q_pos[rows],
        )


def _grads(ring: _Ring, ops: _GradOperands, kv_lengths, causal: bool):
    """Block gradients ``(dq, dk, dv)`` of ``ops``' queries against its keys in
    ``[query_block_size, block_size]`` blocks."""
    blocks = max(1, ops.q.shape[3] // ring.query_block_size)
    if blocks == 1:
        return _grads_keys(ring, ops, kv_lengths, causal)

    def one_query_block(d_kv, rows):
        q, d_out, lse, delta, q_pos = rows
        part = ops._replace(q=q, d_out=d_out, lse=lse, delta=delta, q_pos=q_pos)
        d_q, d_k, d_v = _grads_keys(ring, part, kv_lengths, causal)
        return (d_kv[0] + d_k, d_kv[1] + d_v), d_q

    dtype = compute_dtype(ops.q.dtype)
    d_kv0 = (jnp.zeros(ops.k.shape, dtype), jnp.zeros(ops.v.shape, dtype))
    xs = tuple(_split_blocks(x, blocks, 3) for x in (ops.q, ops.d_out, ops.lse, ops.delta))
    (d_k, d_v), d_q = lax.scan(one_query_block, d_kv0, (*xs, _split_blocks(ops.q_pos, blocks, 0)))
    return _merge_blocks(d_q, 3), d_k, d_v


def _grads_keys(ring: _Ring, ops: _GradOperands, kv_lengths, causal: bool):
    """:func:`_grads` over ``block_size`` keys at a time."""
    blocks = max(1, ops.k.shape[2] // ring.block_size)

    def block(k, v, k_pos):
        q = ops.q
        logits = _masked_logits(ring, q, k, ops.q_pos, k_pos, kv_lengths, causal)
        return block_gradients(logits, ops.lse, ops.delta, q, k, v, ops.d_out)[:3]

    if blocks == 1:
        return block(ops.k, ops.v, ops.k_pos)

    def one_block(d_q, kv):
        d_q_b, d_k_b, d_v_b = block(*kv)
        return d_q + d_q_b, (d_k_b, d_v_b)

    xs = (
        _split_blocks(ops.k, blocks, 2),
        _split_blocks(ops.v, blocks, 2),
        _split_blocks(ops.k_pos, blocks, 0),
    )
    d_q0 = jnp.zeros(ops.q.shape, compute_dtype(ops.q.dtype))
    d_q, (d_k, d_v) = lax.scan(one_block, d_q0, xs)
    return d_q, _merge_blocks(d_k, 2), _merge_blocks(d_v, 2)


def _ring_backward_local(ring: _Ring, q, k, v, out, lse, d_out, d_lse, kv_lengths):
    """Per-device backward: K/V and their gradient accumulators travel round the ring;
    ``d_lse`` is the cotangent of ``lse``."""
    T, S = q.shape[3], k.shape[2]
    c, S_c = T // 2, S // 2
    index = lax.axis_index(ring.axis_name)
    q_pos = _positions(ring, index, T)
    # [B, K, G, T]
    delta = jnp.sum(d_out.astype(lse.dtype) * out.astype(lse.dtype), axis=-1)
    if d_lse is not None:
        delta = delta - d_lse
    own = _GradOperands(q, k, v, d_out, lse, delta, q_pos, _positions(ring, index, S))
    d_q, d_k, d_v = _grads(ring, own, kv_lengths, ring.is_causal)

    def visiting(q, k, v, k_pos):
        """The local queries against the keys that came round."""
        return own._replace(q=q, k=k, v=v, k_pos=k_pos)

    def earlier_keys(q, k, v, k_pos):
        early = visiting(q, k[:, :, :S_c], v[:, :, :S_c], k_pos[:S_c])
        d_q, d_k, d_v = _grads(ring, early, kv_lengths, False)
        return d_q, _pad(d_k, 2, after=S - S_c), _pad(d_v, 2, after=S - S_c)

    def later_keys(q, k, v, k_pos):
        late = visiting(q, k, v, k_pos).query_rows(slice(c, None))
        d_q, d_k, d_v = _grads(ring, late, kv_lengths, False)
        return _pad(d_q, 3, before=c), d_k, d_v

    def all_keys(q, k, v, k_pos):
        return _grads(ring, visiting(q, k, v, k_pos), kv_lengths, False)

    def step(s, carry):
        # k, v came from device (index - s) with d_k, d_v: their gradients from the devices
        # they visited so far. Add this device's share and pass them on with the block.
        d_q, k, v, d_k, d_v = carry
        k_next, v_next = ring.shift(k), ring.shift(v)
        block = _visiting(ring, index, s, (earlier_keys, later_keys, all_keys), q, k, v)
        d_k, d_v = ring.shift(d_k + block[1]), ring.shift(d_v + block[2])
        return d_q + block[0], k_next, v_next, d_k, d_v

    # After the last step each dK/dV has gone round the ring and is home.
    carry = (d_q, ring.shift(k), ring.shift(v), ring.shift(d_k), ring.shift(d_v))
    d_q, _, _, d_k, d_v = lax.fori_loop(1, ring.devices, step, carry)
    return d_q * ring.scale, d_k * ring.scale, d_v


class _TangentOperands(NamedTuple):
    """What the forward-mode derivative of local queries against some keys reads, in the
    kernel layout: q and its tangent dq ``[B, K, G, T, H]``, the rows' final lse
    ``[B, K, G, T]``, k, dk ``[B, K, S, H]``, v, dv ``[B, K, S, H_v]``, and the global
    positions ``q_pos [T]``, ``k_pos [S]``."""

    q: jax.Array
    dq: jax.Array
    lse: jax.Array
    q_pos: jax.Array
    k: jax.Array
    dk: jax.Array
    v: jax.Array
    dv: jax.Array
    k_pos: jax.Array


def _tangent_keys(ring: _Ring, ops: _TangentOperands, kv_lengths, causal: bool):
    """One query block's :class:`BlockTangent` against ``ops``' keys, ``block_size`` keys
    at a time."""
    blocks = max(1, ops.k.shape[2] // ring.block_size)

    def block(k, dk, v, dv, k_pos):
        def logits(q, k):
            return _masked_logits(ring, q, k, ops.q_pos, k_pos, kv_lengths, causal)

        scores, d_scores = jax.jvp(logits, (ops.q, k), (ops.dq, dk))
        return block_tangent(scores, ops.lse, d_scores, v, dv)

    if blocks == 1:
        return block(ops.k, ops.dk, ops.v, ops.dv, ops.k_pos)

    def one_block(total, kv):
        part = block(*kv)
        return BlockTangent(total.acc + part.acc, total.mu + part.mu), None

    B, K, G, T, _ = ops.q.shape
    dtype = compute_dtype(ops.q.dtype)
    zero = BlockTangent(
        jnp.zeros((B, K, G, T, ops.v.shape[-1]), dtype), jnp.zeros(ops.lse.shape, dtype)
    )
    keys = (_split_blocks(x, blocks, 2) for x in (ops.k, ops.dk, ops.v, ops.dv))
    xs = (*keys, _split_blocks(ops.k_pos, blocks, 0))
    return lax.scan(one_block, zero, xs)[0]


def _tangent_blocks(ring: _Ring, ops: _TangentOperands, kv_lengths, causal: bool):
    """:class:`BlockTangent` of ``ops``' queries (with their tangent) against its keys
    (with theirs) in ``[query_block_size, block_size]`` blocks, with the rows' final
    ``lse``."""
    blocks = max(1, ops.q.shape[3] // ring.query_block_size)
    if blocks == 1:
        return _tangent_keys(ring, ops, kv_lengths, causal)

    def one_query_block(rows):
        q, dq, lse, q_pos = rows
        part = ops._replace(q=q, dq=dq, lse=lse, q_pos=q_pos)
        return _tangent_keys(ring, part, kv_lengths, causal)

    xs = tuple(_split_blocks(x, blocks, 3) for x in (ops.q, ops.dq, ops.lse))
    parts = lax.map(one_query_block, (*xs, _split_blocks(ops.q_pos, blocks, 0)))
    return BlockTangent(*(_merge_blocks(x, 3) for x in parts))


def _ring_tangent_local(ring: _Ring, q, k, v, out, lse, dq, dk, dv, kv_lengths):
    """Per-device forward-mode derivative ``(d_out, d_lse)``: K/V travel round the ring
    with their tangents, each block's share summed with the rows' final ``lse``."""
    T, S = q.shape[3], k.shape[2]
    c, S_c = T // 2, S // 2
    index = lax.axis_index(ring.axis_name)
    q_pos = _positions(ring, index, T)
    own = _TangentOperands(q, dq, lse, q_pos, k, dk, v, dv, _positions(ring, index, S))
    total = _tangent_blocks(ring, own, kv_lengths, ring.is_causal)

    def visiting(qs, ks, vs, k_pos):
        """The local queries against the keys that came round, with their tangents."""
        (q, dq), (k, dk), (v, dv) = qs, ks, vs
        return own._replace(q=q, dq=dq, k=k, dk=dk, v=v, dv=dv, k_pos=k_pos)

    def earlier_keys(qs, ks, vs, k_pos):
        early = slice(None, S_c)
        keys = visiting(qs, ks, vs, k_pos)
        keys = keys._replace(
            k=keys.k[:, :, early],
            dk=keys.dk[:, :, early],
            v=keys.v[:, :, early],
            dv=keys.dv[:, :, early],
            k_pos=keys.k_pos[early],
        )
        return _tangent_blocks(ring, keys, kv_lengths, False)

    def later_keys(qs, ks, vs, k_pos):
        late = slice(c, None)
        rows = visiting(qs, ks, vs, k_pos)
        rows = rows._replace(
            q=rows.q[:, :, :, late],
            dq=rows.dq[:, :, :, late],
            lse=rows.lse[..., late],
            q_pos=rows.q_pos[late],
        )
        part = _tangent_blocks(ring, rows, kv_lengths, False)
        return BlockTangent(_pad(part.acc, 3, before=c), _pad(part.mu, 3, before=c))

    def all_keys(qs, ks, vs, k_pos):
        return _tangent_blocks(ring, visiting(qs, ks, vs, k_pos), kv_lengths, False)

    def step(s, carry):
        total, ks, vs = carry
        ks_next, vs_next = ring.shift(ks), ring.shift(vs)
        part = _visiting(ring, index, s, (earlier_keys, later_keys, all_keys), (q, dq), ks, vs)
        return BlockTangent(total.acc + part.acc, total.mu + part.mu), ks_next, vs_next

    carry = (total, ring.shift((k, dk)), ring.shift((v, dv)))
    total = lax.fori_loop(1, ring.devices, step, carry)[0]
    return total.acc - total.mu[..., None] * out, total.mu


def _shard_map(ring: _Ring, fn, in_specs, out_specs):
    return jax.shard_map(
        fn, mesh=ring.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )


def _local(ring: _Ring, fn, roles: str, out_roles: str, arrays, kv_lengths):
    """``fn(*arrays, kv_lengths)`` on each device's zig-zag share, in the kernel layout.

    ``roles`` names each array's kind: ``"q"`` for ``[B, T, N, ...]`` (queries, outputs,
    ``lse [B, T, N]``; kernel layout ``[B, K, G, T, ...]``), ``"k"`` for ``[B, S, K, ...]``
    (keys, values; kernel layout ``[B, K, S, ...]``); ``out_roles`` those of the results,
    which come back in natural order."""
    K = arrays[roles.index("k")].shape[2]

    def local(*args):
        arrays, lengths = (args[:-1], args[-1]) if kv_lengths is not None else (args, None)
        # The NaN policy's zero-fill (validation.nan_policy_attention), here where each
        # device holds its share: outside, XLA gathers the sequence for it.
        arrays = [finite_or_zero(x) for x in arrays]
        if ring.zigzag:
            arrays = [_to_zigzag(ring, x) for x in arrays]
        arrays = [
            layout.queries_to_kernel(x, K) if role == "q" else layout.keys_to_kernel(x)
            for x, role in zip(arrays, roles, strict=True)
        ]
        results = [
            layout.queries_from_kernel(x) if role == "q" else layout.keys_from_kernel(x)
            for x, role in zip(fn(*arrays, lengths), out_roles, strict=True)
        ]
        if ring.zigzag:
            results = [_from_zigzag(ring, x) for x in results]
        return tuple(results)

    spec = ring.spec
    if _explicit(ring.mesh, (ring.axis_name, ring.batch_axis_name, ring.head_axis_name)):
        # shard_map takes Explicit-axis inputs only in the layout its in_specs name (the
        # cotangents and tangents come as the caller made them).
        arrays = [jax.sharding.reshard(x, NamedSharding(ring.mesh, spec)) for x in arrays]
    lengths = () if kv_lengths is None else (kv_lengths,)
    in_specs = (spec,) * len(arrays) + (P(ring.batch_axis_name),) * len(lengths)
    return _shard_map(ring, local, in_specs, (spec,) * len(out_roles))(*arrays, *lengths)


@functools.cache
def _rules(ring: _Ring) -> FlashRules:
    """Ring attention's maps for :mod:`jax_attn.kernels.flash_autodiff` on ``diff = (q, k,
    v)``, ``nondiff = (kv_lengths,)``; ``out [B, T, N, H_v]`` float32 and ``lse [B, T, N]``
    in natural order. Its loops have static lengths and its collectives transpose, so the
    maps serve as their own pure versions."""

    def forward(diff, nondiff):
        (q, k, v), (kv_lengths,) = diff, nondiff
        out, lse = _local(
            ring, functools.partial(_ring_forward_local, ring), "qkk", "qq", (q, k, v), kv_lengths
        )
        return (varying_like(x, q, k, v, kv_lengths) for x in (out, lse))

    def tangent(diff, nondiff, out, lse, d_diff):
        (q, k, v), (kv_lengths,) = diff, nondiff
        local = functools.partial(_ring_tangent_local, ring)
        d_out, d_lse = _local(
            ring, local, "qkkqqqkk", "qq", (q, k, v, out, lse, *d_diff), kv_lengths
        )
        varying = (q, k, v, kv_lengths, *d_diff)
        return varying_like(d_out, *varying), varying_like(d_lse, *varying)

    def backward(diff, nondiff, out, lse, d_out, d_lse):
        (q, k, v), (kv_lengths,) = diff, nondiff

        arrays = (q, k, v, out, lse, d_out) + (() if d_lse is None else (d_lse,))

        def local(q, k, v, out, lse, d_out, *rest):
            *d_lse, kv_lengths = rest
            d_lse = d_lse[0] if d_lse else None
            return _ring_backward_local(ring, q, k, v, out, lse, d_out, d_lse, kv_lengths)

        roles = "qkkqqq" + "q" * (d_lse is not None)
        grads = _local(ring, local, roles, "qkk", arrays, kv_lengths)
        axes = frozenset().union(*map(manual_axes, arrays))
        # zero at the non-finite entries the forward read as 0 (the NaN policy)
        grads = [
            jnp.where(jnp.isfinite(x), g, jnp.zeros_like(g))
            for g, x in zip(grads, diff, strict=True)
        ]
        return tuple(
            cotangent_like(g.astype(x.dtype), x, axes) for g, x in zip(grads, diff, strict=True)
        )

    forward_ = lambda diff, nondiff: tuple(forward(diff, nondiff))  # noqa: E731
    return FlashRules(forward_, tangent, backward, tangent, backward)


def _ring_attention(ring: _Ring, q, k, v, kv_lengths):
    out, _ = flash_attention(_rules(ring), (q, k, v), (kv_lengths,))
    return out.astype(q.dtype)


# --- entry points -----------------------------------------------------------------------


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def _splits(call: AttentionCall, devices: int) -> int:
    """How many sequence chunks the ring cuts T and S into."""
    return 2 * devices if call.is_causal and devices > 1 else devices


def ring_unsupported(call: AttentionCall, mesh, axis_name: str, hint: str = "") -> str | None:
    """Why ring attention over ``mesh``'s axis ``axis_name`` cannot serve ``call``
    (``hint`` ends the reasons about a missing mesh or axis)."""
    hint = f" ({hint})" if hint else ""
    if mesh is None or mesh.empty:
        return (
            f"needs a mesh with a {axis_name!r} axis set with jax.set_mesh(mesh); none is set{hint}"
        )
    sizes = _axis_sizes(mesh)
    if axis_name not in sizes:
        return (
            f"needs a {axis_name!r} axis in the mesh set with jax.set_mesh, "
            f"got axes {list(mesh.axis_names)}{hint}"
        )
    declined = [
        name
        for name, present in (
            ("mask", call.has_mask),
            ("bias", call.has_bias),
            ("local_window_size", call.window is not None),
            ("dropout", call.dropout_rate > 0.0),
        )
        if present
    ]
    if declined:
        return f"no {', '.join(declined)} (causal, key/query lengths and GQA only)"
    if call.is_causal and call.T != call.S:
        return f"is_causal=True needs T == S (self-attention), got T={call.T}, S={call.S}"
    devices = sizes[axis_name]
    chunks = _splits(call, devices)
    for letter, length in (("T", call.T), ("S", call.S)):
        if length % chunks or length == 0:
            layout = " (causal zig-zag: 2 chunks per device)" if chunks != devices else ""
            return (
                f"sequence length {letter}={length} must be divisible by {chunks} (and > 0), "
                f"for mesh axis {axis_name!r} of size {devices}{layout}"
            )
    return None


def _optional_axis(mesh, name: str | None, *sizes: int) -> str | None:
    """``name`` if the mesh has it with a size > 1 that divides every one of ``sizes``."""
    if name is None:
        return None
    size = _axis_sizes(mesh).get(name, 1)
    return name if size > 1 and all(n % size == 0 for n in sizes) else None


def _explicit(mesh, axes) -> bool:
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    return any(types.get(a) == AxisType.Explicit for a in axes if a is not None)


def ring_attention_core(
    q,
    k,
    v,
    *,
    call: AttentionCall,
    mesh,
    axis_name: str,
    kv_lengths=None,
    block_size: int | None = None,
    batch_axis_name: str | None = None,
    head_axis_name: str | None = None,
):
    """Ring attention on validated, batched inputs (``ring_unsupported`` is ``None``).

    ``block_size`` (``None``: :func:`default_block_size` of each device's chunk)
    splits every ring step into blocks of queries and keys.
    """
    devices = _axis_sizes(mesh)[axis_name]
    chunks = _splits(call, devices)
    key_chunk, query_chunk = call.S // chunks, call.T // chunks
    if block_size is None:
        block_size, query_block_size = (
            default_block_size(key_chunk),
            default_block_size(query_chunk),
        )
    else:
        if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
            raise TypeError(f"block_size must be an int or None, got {block_size!r}")
        if block_size < 1 or key_chunk % block_size or query_chunk % block_size:
            raise ValueError(
                f"block_size must divide the keys and queries per chunk, "
                f"S / {chunks} = {key_chunk} and T / {chunks} = {query_chunk}, got {block_size}"
            )
        query_block_size = block_size
    ring = _Ring(
        mesh=mesh,
        axis_name=axis_name,
        devices=devices,
        is_causal=call.is_causal,
        scale=call.scale,
        block_size=int(block_size),
        query_block_size=int(query_block_size),
        batch_axis_name=batch_axis_name,
        head_axis_name=head_axis_name,
    )
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths).astype(jnp.int32)
    if _explicit(mesh, (axis_name, batch_axis_name, head_axis_name)):
        # shard_map takes Explicit-axis inputs only in the layout its in_specs name.
        q, k, v = (jax.sharding.reshard(x, NamedSharding(mesh, ring.spec)) for x in (q, k, v))
        if kv_lengths is not None:
            kv_lengths = jax.sharding.reshard(kv_lengths, NamedSharding(mesh, P(batch_axis_name)))
    return _ring_attention(ring, q, k, v, kv_lengths)


def ring_kernel(q, k, v, *, call: AttentionCall, inputs: KernelInputs):
    """The registry's ``"ring"`` entry: ring attention over the mesh set with
    ``jax.set_mesh``, on the axes of :func:`current_ring_axes` (read now, at trace time):
    the sequence over ``seq`` (default ``"seq"``), the batch over ``batch`` (``"data"``)
    and the heads over ``heads`` (``"model"``) when the mesh has those axes and they divide
    ``B`` and ``K``. :func:`ring_axes` names other axes."""
    axes = current_ring_axes()
    mesh = jax.sharding.get_abstract_mesh()
    reason = _dispatch_unsupported(call, mesh, axes)
    if reason is not None:
        raise ValueError(f"implementation='ring' cannot serve this call: {reason}")
    out = ring_attention_core(
        q,
        k,
        v,
        call=call,
        mesh=mesh,
        axis_name=axes.seq,
        kv_lengths=inputs.key_value_seq_lengths,
        batch_axis_name=_optional_axis(mesh, axes.batch, call.B),
        head_axis_name=_optional_axis(mesh, axes.heads, call.K),
    )
    if inputs.query_seq_lengths is not None:
        out = layout.zero_rows(out, layout.live_rows(inputs.query_seq_lengths, call.T))
    return out


def _dispatch_unsupported(call: AttentionCall, mesh, axes: RingAxes) -> str | None:
    """ring_unsupported on the configured ring axis, saying how to configure it."""
    default = ", the default" if axes.seq == RING_AXIS else ""
    hint = f"ring axis {axes.seq!r}{default}; {_HOW_TO_CONFIGURE}"
    return ring_unsupported(call, mesh, axes.seq, hint=hint)


ring_kernel.zero_fills_non_finite = True  # type: ignore[attr-defined]

IMPLEMENTATION = Implementation(
    name="ring",
    fn=ring_kernel,
    unsupported=lambda call, platform: _dispatch_unsupported(
        call, jax.sharding.get_abstract_mesh(), current_ring_axes()
    ),
    description="sequence-parallel over the 'seq' axis (ring_axes(seq=...) names another) of "
    "the jax.set_mesh mesh (shard_map + collective-permute), online softmax, "
    "O(T / devices) memory per device",
)
