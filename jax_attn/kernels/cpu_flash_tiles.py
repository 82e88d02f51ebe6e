"""The block structure of a ``mask_fn`` on ``cpu_flash``'s tiles, for its tile operands.

The compiled kernel cannot call Python, so what it needs of a ``mask_fn`` is computed here,
in JAX, on its own ``TILE x TILE`` tiles (query rows x keys):

* a tile table, int32 ``[B, 1|N, q_tiles, key_tiles]``: ``EMPTY`` (skipped), ``FULL``
  (no per-element mask; causal, window and lengths still apply) or the index of the tile's
  bitmask (a partial tile);
* the bitmasks, uint32 ``[B, P, TILE * TILE / 32]``, of the partial tiles only: bit ``c %
  32`` of word ``r * TILE / 32 + c // 32`` says whether row ``r`` of the tile may attend
  its key ``c``.

The tiles come from ``block_mask`` (its blocks laid over the kernel's tiles: a tile is
visited where a block it overlaps is, full where all are) or, without one, from
``mask_fn`` itself (:func:`jax_attn.mask_functions.block_mask_arrays` on ``TILE x TILE``
blocks), cut to the tiles the causal/window band reaches. Where they do not depend on a
traced array (the usual case: a ``mask_fn`` closing over constants, eager or under
``jax.jit``), the table is built while the call is traced and ``P`` is the largest count
of partial tiles of a batch row (a tile whose bits come out all set or all clear is made
full or empty). Otherwise it is built in the program, the bitmasks of the partial tiles
filled in a loop of as many steps as they need, with room for :data:`ROOM_PER_TILE_LINE`
partial tiles per query and key tile line (every tile of the band where that is fewer),
so memory stays O(T); a mask with more partial tiles is told to the caller, which runs
the ``chunked`` kernel instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.mask_functions import block_mask_arrays, uses_batch_and_head

__all__ = ["EMPTY", "FULL", "ROOM_PER_TILE_LINE", "TILE", "table_mask_fn", "tile_table", "tiles"]

TILE = 64  # cpu_flash.cc's kTile
EMPTY, FULL = -1, -2  # cpu_flash.cc's kTileEmpty, kTileFull
_WORDS = TILE // 32  # uint32 words of one bitmask row
# Partial tiles whose bitmasks one step of the program's loop evaluates (per batch row:
# [64, TILE, TILE] bools a step); building while tracing takes 16 times as many at once.
_TILES_PER_STEP = 64
# Partial tiles a table built in the program has room for, per query and per key tile line
# of each head (the partial tiles of documents and windows lie along a few diagonals).
ROOM_PER_TILE_LINE = 4


def _grid(T: int, S: int) -> tuple[int, int]:
    return -(-T // TILE), -(-S // TILE)


def _band(T: int, S: int, is_causal: bool, window) -> np.ndarray:
    """bool ``[q_tiles, key_tiles]``: the tiles the causal limit and the window reach
    (query ``t`` sits at key position ``t + S - T``)."""
    nq, nk = _grid(T, S)
    first = np.arange(nq) * TILE + (S - T)
    last = np.minimum(np.arange(nq) * TILE + TILE, T) - 1 + (S - T)
    lo, hi = np.zeros(nq, np.int64), np.full(nq, S, np.int64)  # keys [lo, hi)
    if is_causal:
        hi = np.minimum(hi, last + 1)
    if window is not None:
        lo = np.maximum(lo, first - window[0])
        hi = np.minimum(hi, last + window[1] + 1)
    key_lo = np.arange(nk) * TILE
    key_hi = np.minimum(key_lo + TILE, S)
    return (key_lo[None, :] < hi[:, None]) & (key_hi[None, :] > lo[:, None])


def _overlapped(n_tiles: int, block: int, length: int):
    """The first and last block of size ``block`` each tile overlaps (int arrays)."""
    first = np.arange(n_tiles) * TILE
    last = np.minimum(first + TILE, length) - 1
    return first // block, last // block


def _blocks_on_tiles(any_blocks, full_blocks, block_size, T: int, S: int):
    """A block mask's ``(any, full)`` ``[B', N', nqb, nkb]`` on the kernel's tiles
    ``[B', N', q_tiles, key_tiles]``, by rectangle sums of prefix sums."""
    nq, nk = _grid(T, S)
    q_first, q_last = _overlapped(nq, block_size[0], T)
    k_first, k_last = _overlapped(nk, block_size[1], S)

    def blocks_in_tile(x):
        # [B', N', nqb + 1, nkb + 1] inclusive prefix sums behind a zero row and column
        sums = jnp.cumsum(jnp.cumsum(x.astype(jnp.int32), axis=2), axis=3)
        sums = jnp.pad(sums, [(0, 0), (0, 0), (1, 0), (1, 0)])

        def at(rows, cols):
            return sums[:, :, rows][:, :, :, cols]

        return (
            at(q_last + 1, k_last + 1)
            - at(q_first, k_last + 1)
            - at(q_last + 1, k_first)
            + at(q_first, k_first)
        )

    area = ((q_last - q_first + 1)[:, None] * (k_last - k_first + 1)[None, :]).astype(np.int32)
    return blocks_in_tile(any_blocks) > 0, blocks_in_tile(full_blocks) == area[None, None]


def _fit(x, size: int, axis: int, reduce):
    """``x`` with ``axis`` of ``size``: kept, broadcast from 1, or reduced to 1."""
    if x.shape[axis] == size:
        return x
    if x.shape[axis] == 1:
        return jnp.broadcast_to(x, (*x.shape[:axis], size, *x.shape[axis + 1 :]))
    return reduce(x, axis=axis, keepdims=True)


def _tile_classes(call, inputs, dims):
    """bool ``(any, full)`` ``[B|1, N|1, q_tiles, key_tiles]`` of the call's ``mask_fn``
    (``B``, ``N`` where it reads ``b``, ``h``), cut to the causal/window band."""
    B_m, N_m = (call.B if dims[0] else 1), (call.N if dims[1] else 1)
    if inputs.block_mask is not None:
        bm = inputs.block_mask
        any_, full = _blocks_on_tiles(bm.any_blocks, bm.full_blocks, bm.block_size, call.T, call.S)
        any_, full = _fit(any_, B_m, 0, jnp.any), _fit(full, B_m, 0, jnp.all)
        any_, full = _fit(any_, N_m, 1, jnp.any), _fit(full, N_m, 1, jnp.all)
    else:
        any_, full = block_mask_arrays(
            inputs.mask_fn, call.B, call.N, call.T, call.S, TILE, TILE, dims
        )
    # [1, 1, q_tiles, key_tiles]
    band = jnp.asarray(_band(call.T, call.S, call.is_causal, call.window))[None, None]
    return any_ & band, full & band


def _tile_bits(mask_fn, T: int, S: int, b, h, q_tile, k_tile):
    """``(words, any, all)``: the bitmasks uint32 ``[M, TILE * _WORDS]`` of the tiles
    ``(b, h, q_tile, k_tile)`` (int32 ``[M]`` each), and bool ``[M]``: whether a tile
    allows some element, and every element inside ``T x S``."""
    # [M, TILE] rows and keys of each tile
    rows = q_tile[:, None] * TILE + jnp.arange(TILE, dtype=jnp.int32)[None, :]
    keys = k_tile[:, None] * TILE + jnp.arange(TILE, dtype=jnp.int32)[None, :]
    grid = jax.vmap(jax.vmap(mask_fn, (None, None, None, 0)), (None, None, 0, None))

    def one_tile(b, h, rows, keys):
        inside = (rows < T)[:, None] & (keys < S)[None, :]
        allowed = jnp.asarray(grid(b, h, jnp.minimum(rows, T - 1), jnp.minimum(keys, S - 1)))
        return jnp.broadcast_to(allowed.astype(jnp.bool_), inside.shape) & inside, inside

    # [M, TILE, TILE]
    allowed, inside = jax.vmap(one_tile)(b, h, rows, keys)
    words, inside_words = _words(allowed), _words(inside)
    every = jnp.all((words | ~inside_words) == jnp.uint32(0xFFFFFFFF), axis=1)
    return words, jnp.any(words != jnp.uint32(0), axis=1), every


def _words(bits):
    """bool ``[M, TILE, TILE]`` as the kernel's bitmasks, uint32 ``[M, TILE * _WORDS]``: bit
    ``c % 32`` of word ``r * _WORDS + c // 32`` is ``bits[:, r, c]``."""
    # [M, TILE, _WORDS, 4] bytes of 8 keys each, key c at bit c % 8
    octets = jnp.packbits(bits, axis=-1, bitorder="little").reshape(-1, TILE, _WORDS, 4)
    shifts = jnp.arange(0, 32, 8, dtype=jnp.uint32)[None, None, None, :]
    words = jnp.sum(jnp.left_shift(octets.astype(jnp.uint32), shifts), axis=-1, dtype=jnp.uint32)
    return words.reshape(-1, TILE * _WORDS)


def _known_table(call, inputs, dims):
    """The table and bitmasks as numpy arrays, built now; ``None`` where the mask's tiles
    depend on a traced array."""
    try:
        with jax.ensure_compile_time_eval():
            any_, full = (np.array(x) for x in _tile_classes(call, inputs, dims))
            # b, h, q tile, k tile of each partial tile
            found = [x.astype(np.int32) for x in np.nonzero(any_ & ~full)]
            words = np.zeros((0, TILE * _WORDS), np.uint32)
            if found[0].size:
                pieces, chunk = [], 16 * _TILES_PER_STEP
                for start in range(0, found[0].size, chunk):
                    part = [x[start : start + chunk] for x in found]
                    # a power of two of tiles (tile (0, 0) as filler): eager operations
                    # compile once per size, so few sizes serve every call
                    padded = max(_TILES_PER_STEP, 1 << (part[0].size - 1).bit_length())
                    part = [jnp.asarray(np.pad(x, (0, padded - x.size))) for x in part]
                    bits = _tile_bits(inputs.mask_fn, call.T, call.S, *part)
                    pieces.append(
                        [np.asarray(x)[: min(chunk, found[0].size - start)] for x in bits]
                    )
                words, some, every = (np.concatenate(x) for x in zip(*pieces, strict=True))
                full[tuple(found)] = every
                keep = some & ~every
                found, words = [x[keep] for x in found], words[keep]
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None  # a block mask known, a mask_fn of traced arrays: all in the program
    table = np.where(full, FULL, EMPTY).astype(np.int32)
    B_m = table.shape[0]
    counts = np.bincount(found[0], minlength=B_m)
    P = max(1, int(counts.max(initial=0)))
    bitmasks = np.zeros((B_m, P, TILE * _WORDS), np.uint32)
    # each partial tile's index among its batch row's, in the order found (row-major)
    index = np.arange(found[0].size) - np.concatenate([[0], np.cumsum(counts)[:-1]])[found[0]]
    table[tuple(found)] = index
    bitmasks[found[0], index] = words
    return table, bitmasks


def _traced_table(call, inputs, dims):
    """The table, bitmasks and whether they hold every partial tile (a traced bool, or
    ``None`` where the room covers the whole band), computed in the program (the mask's
    tiles are traced): bitmasks evaluated for the partial tiles only."""
    any_, full = _tile_classes(call, inputs, dims)
    B_m, N_m, nq, nk = any_.shape
    # [B', N' * nq * nk]
    partial = (any_ & ~full).reshape(B_m, -1)
    counts = jnp.sum(partial, axis=1, dtype=jnp.int32)
    index = jnp.cumsum(partial, axis=1, dtype=jnp.int32) - 1
    table = jnp.where(partial, index, jnp.where(full.reshape(B_m, -1), FULL, EMPTY))
    table = table.reshape(B_m, N_m, nq, nk).astype(jnp.int32)
    band_tiles = N_m * int(_band(call.T, call.S, call.is_causal, call.window).sum())
    wanted = min(band_tiles, ROOM_PER_TILE_LINE * N_m * (nq + nk))
    steps = max(1, -(-wanted // _TILES_PER_STEP))
    room = steps * _TILES_PER_STEP
    fits = None if room >= band_tiles else jnp.max(counts) <= room
    # an overflowing table (whose results are not used) still indexes inside the bitmasks
    table = jnp.minimum(table, room - 1)
    # [B', room] each partial tile's place in its row of `partial`
    slots = jax.vmap(lambda row: jnp.nonzero(row, size=room, fill_value=0)[0])(partial)
    slots = slots.astype(jnp.int32)
    b = jnp.broadcast_to(jnp.arange(B_m, dtype=jnp.int32)[:, None], slots.shape)
    coordinates = (b, slots // (nq * nk), slots // nk % nq, slots % nk)

    def step(i, carry):
        bitmasks, some, every = carry
        at = i * _TILES_PER_STEP
        part = (
            jax.lax.dynamic_slice_in_dim(x, at, _TILES_PER_STEP, axis=1).reshape(-1)
            for x in coordinates
        )
        words, some_, every_ = _tile_bits(inputs.mask_fn, call.T, call.S, *part)
        words = words.reshape(B_m, _TILES_PER_STEP, TILE * _WORDS)
        some_, every_ = (x.reshape(B_m, _TILES_PER_STEP) for x in (some_, every_))
        return (
            jax.lax.dynamic_update_slice_in_dim(bitmasks, words, at, axis=1),
            jax.lax.dynamic_update_slice_in_dim(some, some_, at, axis=1),
            jax.lax.dynamic_update_slice_in_dim(every, every_, at, axis=1),
        )

    needed = jnp.minimum((jnp.max(counts) + _TILES_PER_STEP - 1) // _TILES_PER_STEP, steps)
    carry = (
        jnp.zeros((B_m, room, TILE * _WORDS), jnp.uint32),
        jnp.ones((B_m, room), jnp.bool_),
        jnp.zeros((B_m, room), jnp.bool_),
    )
    bitmasks, some, every = jax.lax.fori_loop(0, needed, step, carry)
    # a block's tile whose bits come out all clear or all set: empty or full after all
    entries = jnp.where(some, jnp.where(every, FULL, jnp.arange(room, dtype=jnp.int32)), EMPTY)
    filled = jnp.arange(room, dtype=jnp.int32)[None, :] < counts[:, None]
    flat = table.reshape(B_m, -1)
    rows = jnp.broadcast_to(jnp.arange(B_m, dtype=jnp.int32)[:, None], slots.shape)
    # unfilled slots (nonzero's filler) write past the end: dropped
    targets = jnp.where(filled, slots, flat.shape[1])
    flat = flat.at[rows, targets].set(entries, mode="drop")
    return flat.reshape(table.shape), bitmasks, fits


def tiles(call, inputs):
    """``(table int32 [B, 1|N, q_tiles, key_tiles], bitmasks uint32 [B, P, TILE * TILE /
    32], fits)`` of ``inputs.mask_fn`` (and ``inputs.block_mask``) for ``call`` (``T, S >
    0``); ``fits``: ``None``, or a traced bool that is False where the mask has more
    partial tiles than a table built in the program has room for (then the table is not
    the mask's)."""
    dims = uses_batch_and_head(inputs.mask_fn)
    known = _known_table(call, inputs, dims)
    if known is None:
        table, bitmasks, fits = _traced_table(call, inputs, dims)
    else:
        (table, bitmasks), fits = map(jnp.asarray, known), None
    table = jnp.broadcast_to(table, (call.B, *table.shape[1:]))
    return table, jnp.broadcast_to(bitmasks, (call.B, *bitmasks.shape[1:])), fits


def tile_table(call, inputs):
    """:func:`tiles` where they fit: ``(table, bitmasks)``."""
    table, bitmasks, fits = tiles(call, inputs)
    if fits is not None:
        raise ValueError("the mask has more partial tiles than a traced table has room for")
    return table, bitmasks


def table_mask_fn(b, h, q_idx, kv_idx, table, bitmasks):
    """The mask :func:`tile_table`'s table and bitmasks encode, as a ``mask_fn`` on int32
    scalars (the pure-JAX maps the kernel's higher derivatives go through)."""
    entry = table[b, h if table.shape[1] > 1 else 0, q_idx // TILE, kv_idx // TILE]
    row, col = q_idx % TILE, kv_idx % TILE
    word = bitmasks[b, jnp.maximum(entry, 0), row * _WORDS + col // 32]
    bit = jnp.right_shift(word, (col % 32).astype(jnp.uint32)) & jnp.uint32(1)
    return (entry == FULL) | ((entry >= 0) & (bit == jnp.uint32(1)))
