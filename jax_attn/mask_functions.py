"""Masks and scores as functions (FlexAttention's ``mask_mod`` / ``score_mod`` in JAX).

``mask_fn(b, h, q_idx, kv_idx) -> bool`` says whether query ``q_idx`` of batch ``b``,
query head ``h`` may attend key ``kv_idx``; ``score_fn(score, b, h, q_idx, kv_idx) ->
score`` rewrites one scaled logit. Indices are int32 scalars (``q_idx`` counts queries
from 0, not aligned to the keys) and the library vmaps the functions over the grid, so
they are written for one element with ``jnp`` and may close over arrays.

:func:`make_block_mask` evaluates a ``mask_fn`` block by block (never the whole
``[T, S]`` at once) into a :class:`BlockMask`: which ``(query block, key block)`` pairs
hold any allowed element, and which hold only allowed ones. The chunked kernel visits
only the first kind and evaluates ``mask_fn`` element-wise only on blocks not of the
second kind. One block mask serves every layer that shares the mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MASK_FN_BLOCK_SIZE",
    "BlockMask",
    "block_mask_arrays",
    "evaluate_mask",
    "evaluate_score",
    "make_block_mask",
    "score_options",
    "soft_cap_then_alibi",
    "uses_batch_and_head",
]

# (query block, key block) for calls with a mask_fn (FlexAttention's default): blocks
# large enough that a block mask of [T / 128, S / 128] entries stays small, while sparse
# masks still leave whole blocks empty to skip (docs/performance.md, "Where the code's
# constants come from"). make_block_mask(..., block_size=) picks others.
MASK_FN_BLOCK_SIZE = (128, 128)
# Elements of mask_fn evaluated per step of make_block_mask ([B', N', Tq, S'] per step).
_ELEMENTS_PER_STEP = 2**24

_INDEX = jax.ShapeDtypeStruct((), jnp.int32)


def _grid(fn: Callable, with_score: bool) -> Callable:
    """``fn`` vmapped over index vectors b, h, q, kv (and a score ``[B, N, Tq, Sk]``)."""
    offset = 1 if with_score else 0
    for axis in (3, 2, 1, 0):  # kv innermost, b outermost
        in_axes = [0 if with_score and i == 0 else None for i in range(4 + offset)]
        in_axes[offset + axis] = 0
        fn = jax.vmap(fn, in_axes=tuple(in_axes))
    return fn


def uses_batch_and_head(mask_fn: Callable) -> tuple[bool, bool]:
    """Whether ``mask_fn``'s value can depend on ``b`` and on ``h`` (read from its jaxpr;
    ``True`` when in doubt). A mask that ignores them is evaluated once for all."""
    try:
        jaxpr = jax.make_jaxpr(mask_fn)(_INDEX, _INDEX, _INDEX, _INDEX).jaxpr
    except Exception:  # noqa: BLE001 - any tracing trouble: assume dependence
        return True, True
    read = {id(var) for eqn in jaxpr.eqns for var in eqn.invars}
    read |= {id(var) for var in jaxpr.outvars}
    return id(jaxpr.invars[0]) in read, id(jaxpr.invars[1]) in read


def evaluate_mask(mask_fn: Callable, B: int, N: int, q_idx, kv_idx, dims=None):
    """bool ``[B|1, N|1, Tq, Sk]``: ``mask_fn`` at every ``(b, h, q_idx, kv_idx)``.

    ``q_idx [Tq]``, ``kv_idx [Sk]`` int32; the ``B`` and ``N`` dims are 1 where
    ``mask_fn`` ignores ``b`` or ``h`` (``dims`` = :func:`uses_batch_and_head`'s answer).
    """
    uses_b, uses_h = uses_batch_and_head(mask_fn) if dims is None else dims
    b = jnp.arange(B if uses_b else 1, dtype=jnp.int32)
    h = jnp.arange(N if uses_h else 1, dtype=jnp.int32)
    allowed = _grid(mask_fn, with_score=False)(b, h, q_idx, kv_idx)
    return jnp.asarray(allowed).astype(jnp.bool_)


def evaluate_score(score_fn: Callable, scores, q_idx, kv_idx):
    """``score_fn`` on every element of ``scores [B, N, Tq, Sk]`` (float32 or float64)
    with its indices; ``q_idx [Tq]``, ``kv_idx [Sk]`` int32. Same dtype as ``scores``."""
    B, N = scores.shape[:2]
    b = jnp.arange(B, dtype=jnp.int32)
    h = jnp.arange(N, dtype=jnp.int32)
    out = _grid(score_fn, with_score=True)(scores, b, h, q_idx, kv_idx)
    return jnp.asarray(out).astype(scores.dtype)


@dataclasses.dataclass(frozen=True)
class BlockMask:
    """Block sparsity of a ``mask_fn`` for calls of shape ``(B, N, T, S)``.

    any_blocks, full_blocks: bool ``[B|1, N|1, T / Tq, S / Sk]`` (rounded up): the
    block holds at least one allowed element / only allowed elements (a block reaching
    past ``T`` or ``S`` is never full). ``block_size = (Tq, Sk)``. A pytree: pass it
    through ``jax.jit`` like an array (``mask_fn``, sizes and shape are static).
    """

    any_blocks: jax.Array
    full_blocks: jax.Array
    mask_fn: Callable = dataclasses.field(metadata={"static": True})
    shape: tuple[int, int, int, int] = dataclasses.field(metadata={"static": True})
    block_size: tuple[int, int] = dataclasses.field(metadata={"static": True})

    @property
    def kv_num_blocks(self):
        """int32 ``[B|1, N|1, T / Tq]``: key blocks each query block visits."""
        return jnp.sum(self.any_blocks, axis=-1, dtype=jnp.int32)


jax.tree_util.register_dataclass(
    BlockMask,
    data_fields=["any_blocks", "full_blocks"],
    meta_fields=["mask_fn", "shape", "block_size"],
)


def _check_size(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"make_block_mask: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"make_block_mask: {name} must be >= {minimum}, got {value}")
    return int(value)


def block_sizes(T: int, S: int, block_size=None) -> tuple[int, int]:
    """``(Tq, Sk)`` clipped to the sequence lengths (at least 1)."""
    Tq, Sk = MASK_FN_BLOCK_SIZE if block_size is None else block_size
    return max(1, min(Tq, T)), max(1, min(Sk, S))


def block_mask_arrays(
    mask_fn: Callable, B: int, N: int, T: int, S: int, Tq: int, Sk: int, dims=None
):
    """``(any_blocks, full_blocks)`` bool ``[B|1, N|1, nq, nk]`` of ``mask_fn``: one query
    block (and a bounded slice of keys) per step of a ``lax.map``, so memory stays
    ``O(Tq * S)`` however long the sequences. ``dims`` as for :func:`evaluate_mask`."""
    dims = uses_batch_and_head(mask_fn) if dims is None else dims
    nq, nk = -(-T // Tq), -(-S // Sk)
    rows = (B if dims[0] else 1) * (N if dims[1] else 1) * Tq
    k_blocks_per_step = max(1, min(nk, _ELEMENTS_PER_STEP // max(1, rows * Sk)))
    steps = -(-nk // k_blocks_per_step)
    padded = nq * Tq != T or steps * k_blocks_per_step * Sk != S

    def one_block_row(q_block):
        q_idx = q_block * Tq + jnp.arange(Tq, dtype=jnp.int32)

        def some_key_blocks(step):
            kv_idx = step * k_blocks_per_step * Sk + jnp.arange(k_blocks_per_step * Sk)
            kv_idx = kv_idx.astype(jnp.int32)
            # [B', N', Tq, Sk']
            allowed = evaluate_mask(mask_fn, B, N, q_idx, kv_idx, dims)
            if padded:
                allowed = (
                    allowed & (q_idx < T)[None, None, :, None] & (kv_idx < S)[None, None, None, :]
                )
            # int8 max/min, one axis at a time: XLA:CPU reduces these faster than any/all
            # over both axes (docs/performance.md)
            allowed = allowed.astype(jnp.int8).reshape(*allowed.shape[:3], k_blocks_per_step, Sk)
            any_ = jnp.max(jnp.max(allowed, axis=4), axis=2) > 0
            return any_, jnp.min(jnp.min(allowed, axis=4), axis=2) > 0

        any_, full = jax.lax.map(some_key_blocks, jnp.arange(steps, dtype=jnp.int32))
        # [steps, B', N', kps] -> [B', N', nk]
        any_, full = (
            jnp.moveaxis(x, 0, 2).reshape(*x.shape[1:3], -1)[..., :nk] for x in (any_, full)
        )
        return any_, full

    any_, full = jax.lax.map(one_block_row, jnp.arange(nq, dtype=jnp.int32))
    # [nq, B', N', nk] -> [B', N', nq, nk]
    return jnp.moveaxis(any_, 0, 2), jnp.moveaxis(full, 0, 2)


def make_block_mask(
    mask_fn: Callable, B: int, N: int, T: int, S: int, *, block_size=None
) -> BlockMask:
    """The block sparsity of ``mask_fn`` for calls with batch ``B``, ``N`` query heads,
    ``T`` queries and ``S`` keys (FlexAttention's ``create_block_mask``).

    Pass the result as ``block_mask=`` to ``dot_product_attention`` (``mask_fn`` may then
    be left out); one block mask serves every layer with the same mask. ``B`` or ``N``
    may be 1 to serve any batch or head count when ``mask_fn`` ignores ``b`` or ``h``.
    ``block_size = (Tq, Sk)`` defaults to :data:`MASK_FN_BLOCK_SIZE`.

    >>> import jax.numpy as jnp
    >>> causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    >>> bm = make_block_mask(causal, 1, 1, 4, 4, block_size=(2, 2))
    >>> bm.any_blocks[0, 0].astype(int).tolist(), bm.full_blocks[0, 0].astype(int).tolist()
    ([[1, 0], [1, 1]], [[0, 0], [1, 0]])
    """
    if not callable(mask_fn):
        raise TypeError(
            f"make_block_mask: mask_fn must be a function (b, h, q_idx, kv_idx) -> bool, "
            f"got {type(mask_fn).__name__}"
        )
    B, N = _check_size("B", B, 1), _check_size("N", N, 1)
    T, S = _check_size("T", T), _check_size("S", S)
    if block_size is not None and not (
        isinstance(block_size, tuple | list)
        and len(block_size) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in block_size)
    ):
        raise ValueError(
            f"make_block_mask: block_size must be a pair of positive ints (Tq, Sk), "
            f"got {block_size!r}"
        )
    Tq, Sk = block_sizes(T, S, block_size)
    any_, full = block_mask_arrays(mask_fn, B, N, T, S, Tq, Sk)
    return BlockMask(any_, full, mask_fn, (B, N, T, S), (Tq, Sk))


# --- the score options models ship: ALiBi and soft-capping -------------------------------


def score_options(
    alibi_slopes, logit_soft_cap, *, T: int, S: int, N: int, B: int | None, score_fn=None
) -> Callable | None:
    """``score_fn`` made from ``dot_product_attention``'s ``logit_soft_cap`` (Gemma 2:
    ``cap * tanh(score / cap)``) and ``alibi_slopes`` (Press et al. 2022, with
    FlashAttention's convention: ``-slope[h] * |q_idx + S - T - kv_idx|``, ``[N]`` or
    ``[B, N]`` float slopes), applied in that order and then the caller's ``score_fn``;
    ``None`` when none is given. ``B`` is ``None`` for an unbatched call."""
    if alibi_slopes is None and logit_soft_cap is None:
        return score_fn
    cap = _check_soft_cap(logit_soft_cap)
    slopes = None if alibi_slopes is None else _check_slopes(alibi_slopes, N, B)

    def options_score_fn(score, b, h, q_idx, kv_idx):
        slope = None if slopes is None else slopes[h] if slopes.ndim == 1 else slopes[b, h]
        score = soft_cap_then_alibi(score, cap, slope, q_idx, kv_idx, S - T)
        return score if score_fn is None else score_fn(score, b, h, q_idx, kv_idx)

    return options_score_fn


def soft_cap_then_alibi(score, cap, slope, q_idx, kv_idx, shift: int):
    """The score options on one scaled logit (the definition every pure-JAX path and the
    compiled kernel's second-order maps share): ``cap * tanh(score / cap)`` unless ``cap``
    is ``None``, then ``- slope * |q_idx + shift - kv_idx|`` unless ``slope`` is ``None``
    (``shift = S - T``: bottom-right aligned positions)."""
    if cap is not None:
        score = cap * jnp.tanh(score / cap)
    if slope is not None:
        distance = jnp.abs(q_idx + shift - kv_idx).astype(score.dtype)
        score = score - slope.astype(score.dtype) * distance
    return score


def _check_soft_cap(cap) -> float | None:
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, int | float | np.integer | np.floating):
        raise TypeError(f"logit_soft_cap must be a positive float or None, got {cap!r}")
    if not np.isfinite(cap) or cap <= 0:
        raise ValueError(f"logit_soft_cap must be a positive finite float, got {cap}")
    return float(cap)


def _check_slopes(slopes, N: int, B: int | None):
    try:
        dtype = jnp.result_type(slopes)
        shape = tuple(jnp.shape(slopes))
    except TypeError as error:
        raise TypeError(f"alibi_slopes must be an array, got {type(slopes).__name__}") from error
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"alibi_slopes must hold floats, got dtype {dtype}")
    allowed = [(N,)] + ([] if B is None else [(B, N)])
    if shape not in allowed:
        want = " or ".join(str(list(s)) for s in allowed)
        raise ValueError(f"alibi_slopes must have shape {want} ([N] or [B, N]), got {list(shape)}")
    return jnp.asarray(slopes)
