"""Scale-out on JAX's own machinery: meshes, tensor-parallel multi-head attention and
sequence-parallel ring attention.

* :func:`make_mesh` builds a ``jax.sharding.Mesh`` with axes ``("data", "model", "seq")``.
* :func:`shard_params` lays out :class:`jax_attn.MultiHeadAttention` parameters
  tensor-parallel over ``"model"`` (Megatron style): the query/key/value projections are
  split by heads (their output dim), ``out_proj`` on its input dim, so each device runs
  its own heads and the output is reduced once. :func:`shard_batch` puts activations
  batch-parallel over ``"data"``. ``jax.jit``'s SPMD partitioner does the rest.
* :func:`ring_attention` shards q, k and v along the sequence with ``shard_map``; the
  key/value blocks travel round the ring with ``jax.lax.ppermute`` and each device
  combines partial results with the online softmax of :mod:`jax_attn.kernels.chunked`. Causal
  attention uses the zig-zag layout (device ``i`` holds sequence chunks ``i`` and
  ``2P - 1 - i`` of ``2P``) so every device does the same work and blocks entirely in
  the future are skipped. Gradients come from a custom VJP that runs a second ring
  pass, passing dK/dV round with the blocks; nothing of size ``T`` or ``T x T`` is ever
  held by one device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_attn.kernels.chunked import (
    PartialAttention,
    attend_block,
    combine_partials,
    empty_partial,
    finalize_partial,
)
from jax_attn.validation import check_attention_args

__all__ = [
    "AXIS_NAMES",
    "make_mesh",
    "param_specs",
    "shard_params",
    "batch_sharding",
    "shard_batch",
    "ring_attention",
    "default_block_size",
]

AXIS_NAMES = ("data", "model", "seq")
_PROJECTIONS = ("W_query", "W_key", "W_value")


# --- meshes --------------------------------------------------------------------------------


def _check_axis_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"make_mesh: {name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"make_mesh: {name} must be >= 1, got {value}")
    return int(value)


def make_mesh(data: int = 1, model: int = 1, seq: int = 1, *, devices=None) -> Mesh:
    """A mesh of shape ``(data, model, seq)`` with axes ``("data", "model", "seq")``.

    ``data * model * seq`` must equal the number of ``devices``. By default all of
    ``jax.devices()``, ordered by ``mesh_utils.create_device_mesh`` (topology-aware on
    TPU); given ``devices`` (e.g. ``jax.devices()[:n]``, a subset) keep their order.
    """
    sizes = {
        "data": _check_axis_size("data", data),
        "model": _check_axis_size("model", model),
        "seq": _check_axis_size("seq", seq),
    }
    explicit_order = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    product = math.prod(sizes.values())
    if product != len(devices):
        spelled = " * ".join(f"{k}={v}" for k, v in sizes.items())
        hint = (
            f"; to use a subset pass devices=jax.devices()[:{product}]"
            if product < len(devices)
            else "; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N set before "
            "importing jax gives N virtual devices"
        )
        raise ValueError(
            f"make_mesh: {spelled} = {product} must equal the number of devices, "
            f"{len(devices)} ({devices[0].platform if devices else 'none'}){hint}"
        )
    shape = tuple(sizes.values())
    grid = np.asarray(devices, dtype=object).reshape(shape)
    if not explicit_order:
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # noqa: BLE001 - topology-aware order is an optimisation only
            pass
    return Mesh(grid, AXIS_NAMES)


def _axis_size(mesh: Mesh, name: str) -> int:
    return int(dict(mesh.shape).get(name, 1))


def _check_mesh(owner: str, mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{owner}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")


# --- tensor-parallel multi-head attention --------------------------------------------------


def _unwrap_params(params) -> tuple[dict, bool]:
    if not hasattr(params, "keys"):
        raise TypeError(f"shard_params: params must be a dict, got {type(params).__name__}")
    wrapped = "params" in params and len(params) == 1
    inner = params["params"] if wrapped else params
    missing = [name for name in (*_PROJECTIONS, "out_proj") if name not in inner]
    if missing:
        raise ValueError(
            "shard_params: params must be MultiHeadAttention's (W_query, W_key, W_value, "
            f"out_proj), missing {missing}; got keys {sorted(inner)}"
        )
    return inner, wrapped


def param_specs(params, model_axis: str = "model") -> dict:
    """PartitionSpecs of :class:`~jax_attn.MultiHeadAttention` params, same tree.

    Projection kernels ``[d_in, d_out]`` split their output (heads) over ``model_axis``,
    their biases too; ``out_proj`` kernel ``[d_out, d_out]`` splits its input, its bias
    is replicated.
    """
    inner, wrapped = _unwrap_params(params)
    specs = {}
    for name, layer in inner.items():
        if name in _PROJECTIONS:
            specs[name] = {
                leaf: P(None, model_axis) if leaf == "kernel" else P(model_axis) for leaf in layer
            }
        elif name == "out_proj":
            specs[name] = {leaf: P(model_axis, None) if leaf == "kernel" else P() for leaf in layer}
        else:
            specs[name] = jax.tree.map(lambda _: P(), layer)
    return {"params": specs} if wrapped else specs


def shard_params(params, mesh: Mesh, *, num_heads: int | None = None):
    """``MultiHeadAttention`` params placed tensor-parallel over the mesh's ``"model"`` axis.

    Accepts the inner params dict or ``{"params": ...}`` and returns the same tree of
    sharded arrays. With ``num_heads`` it also checks that heads split evenly.
    """
    _check_mesh("shard_params", mesh)
    inner, _ = _unwrap_params(params)
    model = _axis_size(mesh, "model")
    d_out = int(jnp.shape(inner["W_query"]["kernel"])[-1])
    if d_out % model:
        raise ValueError(
            f"shard_params: d_out={d_out} must be divisible by the mesh's model axis size {model}"
        )
    if num_heads is not None and num_heads % model:
        raise ValueError(
            f"shard_params: num_heads={num_heads} must be divisible by the mesh's model axis "
            f"size {model} so that every device holds whole heads"
        )
    model_axis = "model" if "model" in mesh.axis_names else None
    specs = param_specs(params, model_axis)
    return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), params, specs)


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Activations ``[B, ...]`` split over ``"data"`` on the batch dim, replicated otherwise."""
    _check_mesh("batch_sharding", mesh)
    data_axis = "data" if "data" in mesh.axis_names else None
    return NamedSharding(mesh, P(data_axis, *([None] * (ndim - 1))))


def shard_batch(x, mesh: Mesh):
    """``x [B, ...]`` placed batch-parallel over ``"data"``; ``B`` must divide evenly."""
    x = jnp.asarray(x)
    data = _axis_size(mesh, "data")
    if x.ndim == 0 or x.shape[0] % data:
        raise ValueError(
            f"shard_batch: batch dim of x (shape {list(x.shape)}) must be divisible by the "
            f"mesh's data axis size {data}"
        )
    return jax.device_put(x, batch_sharding(mesh, x.ndim))


# --- ring attention ------------------------------------------------------------------------


def _shard_map(fn, mesh, in_specs, out_specs):
    """``jax.shard_map`` (jax >= 0.7), else ``jax.experimental.shard_map.shard_map``."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring-attention call (hashable: a custom_vjp nondiff arg)."""

    mesh: Mesh
    axis_name: str
    devices: int
    is_causal: bool
    scale: float
    block_size: int
    query_block_size: int
    batch_axis_name: str | None

    @property
    def zigzag(self) -> bool:
        return self.is_causal and self.devices > 1

    @property
    def spec(self) -> P:
        return P(self.batch_axis_name, self.axis_name)

    def shift(self, x, offset: int = 1):
        """Sends ``x`` from device ``i`` to device ``i + offset`` round the ring."""
        n = self.devices
        if n == 1:
            return x
        return lax.ppermute(x, self.axis_name, [(i, (i + offset) % n) for i in range(n)])


# Zig-zag layout: the sequence is cut into 2P chunks; in natural order device s holds
# chunks 2s and 2s+1, in zig-zag order device d holds chunks d and 2P-1-d.


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


def _local_positions(ring: _Ring, length: int):
    """Global sequence positions ``[length]`` of this device's (zig-zag) rows."""
    index = lax.axis_index(ring.axis_name)
    if not ring.zigzag:
        return index * length + jnp.arange(length)
    c = length // 2
    return jnp.concatenate(
        [index * c + jnp.arange(c), (2 * ring.devices - 1 - index) * c + jnp.arange(c)]
    )


def _causal_mask(q_pos, k_pos):
    # [T, S]
    return k_pos[None, :] <= q_pos[:, None]


DEFAULT_MAX_BLOCK_SIZE = 512


def default_block_size(keys: int, largest: int = DEFAULT_MAX_BLOCK_SIZE) -> int:
    """The largest divisor of ``keys`` up to ``largest``; ``keys`` itself if that divisor
    is below ``largest // 8`` (a prime-ish chunk: one block beats thousands of tiny ones)."""
    if keys <= largest:
        return keys
    best = max(d for d in range(1, largest + 1) if keys % d == 0)
    return best if best >= largest // 8 else keys


def _key_blocks(ring: _Ring, S: int) -> int:
    return max(1, S // ring.block_size)


def _attend(ring: _Ring, q, k, v, q_pos=None, k_pos=None) -> PartialAttention:
    """Partial attention of local ``q`` over ``k, v`` in ``[query_block_size, block_size]``
    blocks. With positions, keys later than the query are masked (causal)."""
    T = q.shape[1]
    blocks = max(1, T // ring.query_block_size)
    if blocks == 1:
        return _attend_keys(ring, q, k, v, q_pos, k_pos)
    causal = q_pos is not None
    split = functools.partial(_split_blocks, blocks=blocks)
    partials = lax.map(
        lambda args: _attend_keys(ring, args[0], k, v, args[1] if causal else None, k_pos),
        (split(q), split(q_pos if causal else jnp.zeros((T,), jnp.int32), axis=0)),
    )
    return PartialAttention(*(_merge_blocks(x) for x in partials))


def _attend_keys(ring: _Ring, q, k, v, q_pos=None, k_pos=None) -> PartialAttention:
    """Partial attention of ``q`` over ``k, v``, ``block_size`` keys at a time."""
    B, T, N, _ = q.shape
    _, S, K, H = k.shape
    blocks = _key_blocks(ring, S)

    def one_block(partial, kv):
        k_b, v_b, k_pos_b = kv
        mask = None if q_pos is None else _causal_mask(q_pos, k_pos_b)
        block = attend_block(q, k_b, v_b, scale=ring.scale, mask=mask)
        return combine_partials(partial, block), None

    if k_pos is None:
        k_pos = jnp.zeros((S,), jnp.int32)
    if blocks == 1:
        mask = None if q_pos is None else _causal_mask(q_pos, k_pos)
        return attend_block(q, k, v, scale=ring.scale, mask=mask)
    split = functools.partial(_split_blocks, blocks=blocks)
    partial, _ = lax.scan(
        one_block, empty_partial(B, T, N, v.shape[-1]), (split(k), split(v), split(k_pos, axis=0))
    )
    return partial


def _split_blocks(x, blocks: int, axis: int = 1):
    """``[B, S, ...]`` -> ``[blocks, B, S // blocks, ...]`` (scan over the leading dim)."""
    shape = x.shape[:axis] + (blocks, x.shape[axis] // blocks) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge_blocks(x, axis: int = 1):
    """Inverse of :func:`_split_blocks`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _concat_partials(first: PartialAttention, second: PartialAttention) -> PartialAttention:
    """Partials of two query ranges -> the partial of both (along T)."""
    pairs = zip(first, second, strict=True)
    return PartialAttention(*(jnp.concatenate(pair, axis=1) for pair in pairs))


def _ring_forward_local(ring: _Ring, q, k, v):
    """Per-device forward on zig-zag (or contiguous) local blocks -> (out, log-sum-exp)."""
    B, T, N, _ = q.shape
    index = lax.axis_index(ring.axis_name)
    if ring.is_causal:
        positions = _local_positions(ring, T)
        partial = _attend(ring, q, k, v, positions, positions)
    else:
        partial = _attend(ring, q, k, v)
    c = T // 2

    def earlier_keys(q, k, v):
        # This block's chunks j < i: every local query sees its first chunk only.
        return _attend(ring, q, k[:, :c], v[:, :c])

    def later_keys(q, k, v):
        # j > i: only the late query chunk sees it, and sees all of it.
        late = _attend(ring, q[:, c:], k, v)
        return _concat_partials(empty_partial(B, c, N, v.shape[-1]), late)

    def step(s, carry):
        # k, v came from device (index - s); the next block's transfer starts before this
        # block's compute and does not depend on it, so the two can overlap.
        partial, k, v = carry
        k_next, v_next = ring.shift(k), ring.shift(v)
        if ring.is_causal:
            source = (index - s) % ring.devices
            block = lax.cond(source < index, earlier_keys, later_keys, q, k, v)
        else:
            block = _attend(ring, q, k, v)
        return combine_partials(partial, block), k_next, v_next

    partial = _ring_loop(ring, step, (partial, ring.shift(k), ring.shift(v)))[0]
    out = finalize_partial(partial, q.dtype)
    safe_sum = jnp.where(partial.row_sum > 0, partial.row_sum, 1.0)
    # [B, T, N]
    log_sum_exp = partial.row_max + jnp.log(safe_sum)
    return out, log_sum_exp


def _ring_loop(ring: _Ring, step, carry):
    """Runs ``step(s, carry)`` for ring steps ``s = 1 .. P-1``. (The last step's prefetch
    is wasted; peeling that step off the loop would double the compiled loop body.)"""
    return lax.fori_loop(1, ring.devices, step, carry)


def _block_grads(ring: _Ring, q, k, v, out, lse, d_out, q_pos=None, k_pos=None):
    """Gradients of one (query block, key block) pair given the final ``out`` and
    ``lse`` [B, T, N]: returns ``dq [B, T, N, H]``, ``dk, dv [B, S, K, H]`` (float32)."""
    B, T, N, H = q.shape
    _, S, K, H_v = v.shape
    G = N // K
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    q5 = q.astype(f32).reshape(B, T, K, G, H)
    d_out5 = d_out.astype(f32).reshape(B, T, K, G, H_v)
    k, v = k.astype(f32), v.astype(f32)
    # [B, K, G, T]
    lse5 = jnp.transpose(lse.reshape(B, T, K, G), (0, 2, 3, 1))
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", d_out5, out.astype(f32).reshape(B, T, K, G, H_v))
    # [B, K, G, T, S]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q5, k) * ring.scale
    probs = jnp.exp(logits - lse5[..., None])
    if q_pos is not None:
        probs = jnp.where(_causal_mask(q_pos, k_pos), probs, 0.0)
    # [B, S, K, H_v]
    d_v = jnp.einsum("BKGTS,BTKGH->BSKH", probs, d_out5)
    # [B, K, G, T, S]
    d_probs = jnp.einsum("BTKGH,BSKH->BKGTS", d_out5, v)
    d_logits = probs * (d_probs - delta[..., None]) * ring.scale
    # [B, T, K, G, H]
    d_q = jnp.einsum("BKGTS,BSKH->BTKGH", d_logits, k).reshape(B, T, N, H)
    # [B, S, K, H]
    d_k = jnp.einsum("BKGTS,BTKGH->BSKH", d_logits, q5)
    return d_q, d_k, d_v


def _grads(ring: _Ring, q, k, v, out, lse, d_out, q_pos=None, k_pos=None):
    """:func:`_block_grads` in ``[query_block_size, block_size]`` blocks."""
    T = q.shape[1]
    blocks = max(1, T // ring.query_block_size)
    if blocks == 1:
        return _grads_keys(ring, q, k, v, out, lse, d_out, q_pos, k_pos)
    causal = q_pos is not None
    split = functools.partial(_split_blocks, blocks=blocks)
    f32 = jnp.promote_types(k.dtype, jnp.float32)

    def one_query_block(d_kv, xs):
        q_b, out_b, lse_b, d_out_b, q_pos_b = xs
        d_q_b, d_k_b, d_v_b = _grads_keys(
            ring, q_b, k, v, out_b, lse_b, d_out_b, q_pos_b if causal else None, k_pos
        )
        return (d_kv[0] + d_k_b, d_kv[1] + d_v_b), d_q_b

    d_kv0 = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    q_pos = q_pos if causal else jnp.zeros((T,), jnp.int32)
    (d_k, d_v), d_q = lax.scan(
        one_query_block,
        d_kv0,
        (split(q), split(out), split(lse), split(d_out), split(q_pos, axis=0)),
    )
    return _merge_blocks(d_q), d_k, d_v


def _grads_keys(ring: _Ring, q, k, v, out, lse, d_out, q_pos=None, k_pos=None):
    """:func:`_block_grads` over ``block_size`` keys at a time."""
    S = k.shape[1]
    blocks = _key_blocks(ring, S)
    if blocks == 1:
        return _block_grads(ring, q, k, v, out, lse, d_out, q_pos, k_pos)
    if k_pos is None:
        k_pos = jnp.zeros((S,), jnp.int32)

    def one_block(d_q, kv):
        k_b, v_b, k_pos_b = kv
        d_q_b, d_k_b, d_v_b = _block_grads(
            ring, q, k_b, v_b, out, lse, d_out, q_pos, None if q_pos is None else k_pos_b
        )
        return d_q + d_q_b, (d_k_b, d_v_b)

    split = functools.partial(_split_blocks, blocks=blocks)
    d_q0 = jnp.zeros(q.shape, jnp.promote_types(q.dtype, jnp.float32))
    d_q, (d_k, d_v) = lax.scan(one_block, d_q0, (split(k), split(v), split(k_pos, axis=0)))
    return d_q, _merge_blocks(d_k), _merge_blocks(d_v)


def _ring_backward_local(ring: _Ring, q, k, v, out, lse, d_out):
    """Per-device backward: K/V and their gradient accumulators travel round the ring."""
    T = q.shape[1]
    c = T // 2
    S_c = k.shape[1] // 2
    index = lax.axis_index(ring.axis_name)
    grads = functools.partial(_grads, ring, out=out, lse=lse)
    if ring.is_causal:
        positions = _local_positions(ring, T)
        d_q, d_k, d_v = grads(q=q, k=k, v=v, d_out=d_out, q_pos=positions, k_pos=positions)
    else:
        d_q, d_k, d_v = grads(q=q, k=k, v=v, d_out=d_out)

    def earlier_keys(q, k, v, d_out):
        d_q, d_k, d_v = grads(q=q, k=k[:, :S_c], v=v[:, :S_c], d_out=d_out)
        return d_q, _pad_rows(d_k, after=S_c), _pad_rows(d_v, after=S_c)

    def later_keys(q, k, v, d_out):
        late = slice(c, None)
        d_q, d_k, d_v = _grads(ring, q[:, late], k, v, out[:, late], lse[:, late], d_out[:, late])
        return _pad_rows(d_q, before=c), d_k, d_v

    def step(s, carry):
        # k, v came from device (index - s) with d_k, d_v: their gradients from the devices
        # they visited so far. Add this device's share and pass them on with the block.
        d_q, k, v, d_k, d_v = carry
        k_next, v_next = ring.shift(k), ring.shift(v)
        if ring.is_causal:
            source = (index - s) % ring.devices
            block = lax.cond(source < index, earlier_keys, later_keys, q, k, v, d_out)
        else:
            block = grads(q=q, k=k, v=v, d_out=d_out)
        d_k, d_v = ring.shift(d_k + block[1]), ring.shift(d_v + block[2])
        return d_q + block[0], k_next, v_next, d_k, d_v

    # After the last step each dK/dV has gone round the ring and is home.
    d_q, _, _, d_k, d_v = _ring_loop(
        ring, step, (d_q, ring.shift(k), ring.shift(v), ring.shift(d_k), ring.shift(d_v))
    )
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


def _pad_rows(x, before: int = 0, after: int = 0):
    return jnp.pad(x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))


def _ring_forward(ring: _Ring, q, k, v):
    def local(q, k, v):
        if ring.zigzag:
            q, k, v = (_to_zigzag(ring, x) for x in (q, k, v))
        out, lse = _ring_forward_local(ring, q, k, v)
        natural_out = _from_zigzag(ring, out) if ring.zigzag else out
        return natural_out, (q, k, v, out, lse)

    spec = ring.spec
    return _shard_map(local, ring.mesh, (spec, spec, spec), (spec, (spec,) * 5))(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v):
    return _ring_forward(ring, q, k, v)[0]


def _ring_attention_fwd(ring: _Ring, q, k, v):
    return _ring_forward(ring, q, k, v)


def _ring_attention_bwd(ring: _Ring, residuals, d_out):
    def local(q, k, v, out, lse, d_out):
        if ring.zigzag:
            d_out = _to_zigzag(ring, d_out)
        grads = _ring_backward_local(ring, q, k, v, out, lse, d_out)
        if ring.zigzag:
            grads = tuple(_from_zigzag(ring, g) for g in grads)
        return grads

    spec = ring.spec
    return _shard_map(local, ring.mesh, (spec,) * 6, (spec,) * 3)(*residuals, d_out)


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def ring_attention(
    q,
    k,
    v,
    *,
    mesh: Mesh,
    axis_name: str,
    is_causal: bool = False,
    scale: float | None = None,
    block_size: int | None = None,
    batch_axis_name: str | None = None,
):
    """Sequence-parallel attention: q ``[B, T, N, H]``, k/v ``[B, S, K, H]`` split along the
    sequence over the mesh axis ``axis_name`` -> ``[B, T, N, H]``, sharded the same way.

    Same result as :func:`jax_attn.dot_product_attention` (``N % K == 0``; causal needs
    ``T == S`` and ``T`` divisible by twice the axis size). Each ring step runs in blocks
    of ``block_size`` queries by ``block_size`` keys, so one device holds O(T / P)
    activations and ``[B, N, block_size, block_size]`` logits; the default is the
    largest divisor of the local chunk up to ``DEFAULT_MAX_BLOCK_SIZE`` (the whole chunk
    when that divisor is tiny), for queries and keys separately.
    ``batch_axis_name`` also splits the batch over another mesh axis. Differentiable
    (custom VJP: a second ring pass).
    """
    _check_mesh("ring_attention", mesh)
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"ring_attention: axis_name must be one of the mesh axes {list(mesh.axis_names)}, "
            f"got {axis_name!r}"
        )
    if batch_axis_name is not None and (
        batch_axis_name not in mesh.axis_names or batch_axis_name == axis_name
    ):
        raise ValueError(
            f"ring_attention: batch_axis_name must be another mesh axis "
            f"({[a for a in mesh.axis_names if a != axis_name]}), got {batch_axis_name!r}"
        )
    call = check_attention_args(q, k, v, is_causal=is_causal, scale=scale)
    if not call.batched:
        raise ValueError(
            f"ring_attention: q must have shape [B, T, N, H], got {list(jnp.shape(q))}"
        )
    devices = _axis_size(mesh, axis_name)
    if call.is_causal and call.T != call.S:
        raise ValueError(
            f"ring_attention: is_causal=True needs T == S (self-attention), got T={call.T}, "
            f"S={call.S}"
        )
    chunks = 2 * devices if call.is_causal and devices > 1 else devices
    for letter, length in (("T", call.T), ("S", call.S)):
        if length % chunks:
            layout = " (causal zig-zag: 2 chunks per device)" if chunks != devices else ""
            raise ValueError(
                f"ring_attention: sequence length {letter}={length} must be divisible by "
                f"{chunks}, for mesh axis {axis_name!r} of size {devices}{layout}"
            )
    key_chunk, query_chunk = call.S // chunks, call.T // chunks
    if block_size is None:
        block_size, query_block_size = (
            default_block_size(key_chunk),
            default_block_size(query_chunk),
        )
    else:
        if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
            raise TypeError(
                f"ring_attention: block_size must be an int or None, got {block_size!r}"
            )
        if block_size < 1 or key_chunk % block_size or query_chunk % block_size:
            raise ValueError(
                f"ring_attention: block_size must divide the keys and queries per chunk, "
                f"S / {chunks} = {key_chunk} and T / {chunks} = {query_chunk}, got {block_size}"
            )
        query_block_size = block_size
    if batch_axis_name is not None and call.B % _axis_size(mesh, batch_axis_name):
        raise ValueError(
            f"ring_attention: batch B={call.B} must be divisible by mesh axis "
            f"{batch_axis_name!r} of size {_axis_size(mesh, batch_axis_name)}"
        )
    ring = _Ring(
        mesh=mesh,
        axis_name=axis_name,
        devices=devices,
        is_causal=call.is_causal,
        scale=call.scale,
        block_size=int(block_size),
        query_block_size=int(query_block_size),
        batch_axis_name=batch_axis_name,
    )
    return _ring_attention(ring, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
