"""Boolean attention masks. True means "may attend".

Every mask here broadcasts to the logits' shape ``[B, N, T, S]``. Query position
``t`` is aligned with key position ``t + (S - T)`` ("bottom-right" alignment), so
with ``T == S`` query ``i`` sees keys ``<= i`` under the causal mask, and with
``T < S`` (decoding against a cache) the last query sees every key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # annotations only: the contract sits above the masks
    from jax_attn.kernels.contract import AttentionCall
    from jax_attn.shapes import Array, Bool, Lengths, Mask, PRNGKey

__all__ = [
    "MASKED_LOGIT",
    "masked_logit",
    "visible",
    "before_lengths",
    "length_mask",
    "make_causal_mask",
    "make_padding_mask",
    "make_sliding_window_mask",
    "combine_masks",
    "normalize_window",
    "build_attention_mask",
    "call_mask",
    "make_dropout_mask",
    "dropout_row_seeds",
    "dropout_threshold",
    "as_4d",
]


def masked_logit(dtype=np.float32) -> float:
    """The finite "minus infinity" a masked logit takes in ``dtype``: ``exp`` of it minus
    any row maximum underflows to 0, and a row with nothing to attend stays finite (``-inf``
    would give ``-inf - -inf = NaN`` in the softmax's max subtraction). The 0.7 leaves
    headroom for a bias or a score added after masking before anything overflows."""
    return -0.7 * float(np.finfo(dtype).max)


# Of float32 logits: the kernels' (they compute in float32), also the C++ kernel's kMasked
# (tests/kernels/test_shared_constants.py keeps the two equal).
MASKED_LOGIT = masked_logit(np.float32)


def visible(query_pos, key_pos, *, is_causal: bool = False, window=None, kv_lengths=None):
    """Where a query at aligned position ``query_pos`` may attend the key at ``key_pos``
    (int arrays that broadcast together, any layout), or ``None`` when nothing masks.

    The one definition of the position masks every pure-JAX path uses: causal (keys up to
    the query's position), ``window = (left, right)`` around it, and ``kv_lengths [B]``
    (keys before their sequence's length; reshaped to ``[B, 1, ...]`` against
    ``key_pos``'s rank, so ``key_pos`` carries the batch as its first axis).
    """
    conditions = []
    if is_causal:
        conditions.append(key_pos <= query_pos)
    if window is not None:
        left, right = window
        conditions += [key_pos >= query_pos - left, key_pos <= query_pos + right]
    if kv_lengths is not None:
        conditions.append(before_lengths(key_pos, kv_lengths))
    if not conditions:
        return None
    allowed = conditions[0]
    for condition in conditions[1:]:
        allowed = allowed & condition
    return allowed


def before_lengths(positions, lengths):
    """bool: ``positions`` (batch first, or 1 there) lie before their sequence's
    ``lengths [B]``: ``positions < lengths`` with ``lengths`` as ``[B, 1, ...]``."""
    lengths = jnp.asarray(lengths)
    return positions < lengths.reshape((-1,) + (1,) * (jnp.ndim(positions) - 1))


def _check_length(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _positions(T: int, S: int, offset: int = 0):
    """Aligned query positions ``[T, 1]`` and key positions ``[1, S]``."""
    query_pos = jnp.arange(T)[:, None] + (S - T) + offset
    key_pos = jnp.arange(S)[None, :]
    return query_pos, key_pos


def make_causal_mask(T: int, S: int | None = None) -> Bool[Array, "T S"]:
    """Causal mask ``[T, S]``: query ``t`` may attend keys ``<= t + (S - T)``.

    >>> make_causal_mask(3).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    T = _check_length("T", T)
    S = T if S is None else _check_length("S", S)
    query_pos, key_pos = _positions(T, S)
    allowed = visible(query_pos, key_pos, is_causal=True)
    assert allowed is not None  # causal: one condition
    return allowed


def normalize_window(window) -> tuple[int, int]:
    """``window`` as ``(left, right)``: an int ``w`` means ``(w, w)`` (as in jax.nn)."""
    if isinstance(window, int | np.integer) and not isinstance(window, bool):
        left = right = int(window)
    elif (
        isinstance(window, tuple | list)
        and len(window) == 2
        and all(isinstance(w, int | np.integer) and not isinstance(w, bool) for w in window)
    ):
        left, right = (int(w) for w in window)
    else:
        raise TypeError(
            f"local_window_size must be an int or a (left, right) pair of ints, got {window!r}"
        )
    if left < 0 or right < 0:
        raise ValueError(f"local_window_size must be >= 0 on both sides, got {(left, right)}")
    return left, right


def make_sliding_window_mask(T: int, window, S: int | None = None) -> Bool[Array, "T S"]:
    """Local-window mask ``[T, S]``.

    ``window`` is ``(left, right)`` or an int ``w`` meaning ``(w, w)``: query ``t``
    (aligned position ``p = t + S - T``) may attend keys ``p - left ... p + right``.
    Combine with :func:`make_causal_mask` for a causal sliding window.

    >>> make_sliding_window_mask(4, (1, 0)).astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    T = _check_length("T", T)
    S = T if S is None else _check_length("S", S)
    left, right = normalize_window(window)
    query_pos, key_pos = _positions(T, S)
    allowed = visible(query_pos, key_pos, window=(left, right))
    assert allowed is not None  # a window: two conditions
    return allowed


def make_padding_mask(
    q_lengths: Lengths | None, kv_lengths: Lengths | None, T: int, S: int
) -> Bool[Array, "B 1 T S"]:
    """Padding mask ``[B, 1, T, S]`` from per-sequence lengths ``[B]``.

    Query ``t`` of sequence ``b`` may attend key ``s`` when ``t < q_lengths[b]`` and
    ``s < kv_lengths[b]``. Either length array may be ``None`` (no padding on that side).
    A padded query row is fully masked; attention gives it zero output.

    >>> make_padding_mask(jnp.array([1]), jnp.array([2]), 2, 3)[0, 0].astype(int).tolist()
    [[1, 1, 0], [0, 0, 0]]
    """
    T = _check_length("T", T)
    S = _check_length("S", S)
    if q_lengths is None and kv_lengths is None:
        raise ValueError("make_padding_mask needs q_lengths or kv_lengths, got neither")
    lengths = [x for x in (q_lengths, kv_lengths) if x is not None]
    for name, x in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
        if x is not None and jnp.ndim(x) != 1:
            raise ValueError(f"{name} must have shape [B], got shape {jnp.shape(x)}")
        if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise TypeError(f"{name} must be integers, got dtype {jnp.result_type(x)}")
    B = jnp.shape(lengths[0])[0]
    if len(lengths) == 2 and jnp.shape(lengths[1])[0] != B:
        raise ValueError(
            f"q_lengths and kv_lengths must have the same batch size B, got shapes "
            f"{jnp.shape(lengths[0])} and {jnp.shape(lengths[1])}"
        )
    query_ok = jnp.ones((B, T), bool) if q_lengths is None else length_mask(q_lengths, T)
    key_ok = jnp.ones((B, S), bool) if kv_lengths is None else length_mask(kv_lengths, S)
    # [B, 1, T, S]
    return query_ok[:, None, :, None] & key_ok[:, None, None, :]


def length_mask(lengths, size: int) -> Bool[Array, "B L"]:
    """``[B, size]``: position ``i`` of sequence ``b`` is before ``lengths[b]``."""
    lengths = jnp.asarray(lengths)
    return before_lengths(jnp.arange(size, dtype=lengths.dtype)[None, :], lengths)


def combine_masks(*masks: Mask | None) -> Mask | None:
    """Logical AND of the masks that are not ``None``, broadcast together; ``None`` if none."""
    present = [jnp.asarray(m) for m in masks if m is not None]
    if not present:
        return None
    for m in present:
        if m.dtype != jnp.bool_:
            raise TypeError(f"combine_masks expects boolean masks, got dtype {m.dtype}")
    try:
        shape = np.broadcast_shapes(*(m.shape for m in present))
    except ValueError as error:
        shapes = [m.shape for m in present]
        raise ValueError(f"combine_masks: mask shapes {shapes} do not broadcast") from error
    result = jnp.broadcast_to(present[0], shape)
    for m in present[1:]:
        result = result & jnp.broadcast_to(m, shape)
    return result


def build_attention_mask(
    T: int,
    S: int,
    *,
    mask=None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
):
    """Everything that says "may attend", ANDed into one mask broadcastable to ``[B, N, T, S]``.

    Returns ``None`` when nothing masks. ``mask`` may be ``[T, S]``, ``[N, T, S]`` or
    ``[B, N, T, S]`` (anything that broadcasts).
    """
    causal = make_causal_mask(T, S) if is_causal else None
    window = (
        make_sliding_window_mask(T, local_window_size, S) if local_window_size is not None else None
    )
    padding = None
    if query_seq_lengths is not None or key_value_seq_lengths is not None:
        padding = make_padding_mask(query_seq_lengths, key_value_seq_lengths, T, S)
    user = None if mask is None else jnp.asarray(mask)
    combined = combine_masks(user, causal, window, padding)
    return None if combined is None else as_4d(combined)


def call_mask(call: AttentionCall, mask=None, query_seq_lengths=None, key_value_seq_lengths=None):
    """Everything a validated ``call`` masks (``mask``, causal, window, lengths) ANDed:
    bool broadcastable to ``[B, N, T, S]``, True = may attend, or ``None`` when nothing
    masks. The reference and the ``"xla"`` adapter (for its empty rows) both use it."""
    return build_attention_mask(
        call.T,
        call.S,
        mask=mask,
        is_causal=call.is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=call.window,
    )


def as_4d(x: Array) -> Array:
    """``x`` broadcastable to ``[B, N, T, S]`` with leading 1s added to rank 4 (no copy)."""
    x = jnp.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


_GOLDEN = 0x9E3779B1


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _row_hash(seed, b, n):
    """The hash state of :func:`make_dropout_mask` after the key and ``(b, n)``."""
    row = _fmix32(seed[0] ^ (b * jnp.uint32(_GOLDEN)))
    return _fmix32(row ^ (n * jnp.uint32(0x85EBCA77) + seed[1]))


def dropout_threshold(rate: float) -> int:
    """The 32-bit threshold of :func:`make_dropout_mask`: a weight whose hash is below it
    is dropped."""
    return min(int(round(float(rate) * 2.0**32)), 2**32 - 1)


def dropout_row_seeds(rng: PRNGKey, B: int, N: int):
    """uint32 ``[B, N]``: :func:`make_dropout_mask`'s hash of the key and ``(b, n)``, from
    which a compiled kernel finishes the hash of each ``(t, s)`` (``cpu_flash.cc``) and
    drops exactly the weights the reference drops."""
    seed = jax.random.bits(rng, (2,), jnp.uint32)
    b = jnp.arange(B, dtype=jnp.uint32)[:, None]
    n = jnp.arange(N, dtype=jnp.uint32)[None, :]
    return _row_hash(seed, b, n)


def make_dropout_mask(
    rng: PRNGKey, rate: float, shape, offsets=(0, 0, 0, 0), broadcast_dims=()
) -> Mask:
    """Keep-mask for dropout on attention weights ``[B, N, T, S]`` (True = keep).

    Element ``(b, n, t, s)`` is kept with probability ``1 - rate``, decided by a hash of
    the key and its *global* index ``(b, n, t, s) + offsets``. So any block of the
    weights can draw its own slice of the same mask: a chunked kernel and the einsum
    reference drop exactly the same weights for the same key. Shapes of rank < 4 are
    treated as trailing dimensions of ``[B, N, T, S]``. ``broadcast_dims`` (axes of
    ``[B, N, T, S]``, e.g. ``(1,)``) share one mask along those axes, e.g. over heads;
    by default every element is independent.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) > 4:
        raise ValueError(f"make_dropout_mask: shape must have at most 4 dims, got {shape}")
    shared = {int(d) % 4 for d in broadcast_dims}
    full = (1,) * (4 - len(shape)) + shape
    seed = jax.random.bits(rng, (2,), jnp.uint32)
    b, n, t, s = (
        jnp.zeros((1, 1, 1, 1), jnp.uint32)
        if axis in shared
        else jnp.arange(size, dtype=jnp.uint32).reshape([-1 if i == axis else 1 for i in range(4)])
        + jnp.uint32(offset)
        for axis, (size, offset) in enumerate(zip(full, offsets, strict=True))
    )
    row = _fmix32(_row_hash(seed, b, n) ^ (t * jnp.uint32(0xC2B2AE3D)))
    bits = _fmix32(row ^ (s * jnp.uint32(0x27D4EB2F) + jnp.uint32(0x165667B1)))
    keep = bits >= jnp.uint32(dropout_threshold(rate))
    return jnp.broadcast_to(keep, full).reshape(shape)
