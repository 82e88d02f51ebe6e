"""The layout the pure-JAX flash kernels (``chunked``, ``ring``) share with the online
softmax, and the rows past the query lengths.

The kernel layout puts the key/value heads before the sequence so every block is a
batched matrix product (:mod:`jax_attn.kernels.online_softmax`): queries and what has
their rows (outputs, ``lse``) ``[B, T, N, ...]`` <-> ``[B, K, G, T, ...]``, keys and
values ``[B, S, K, ...]`` <-> ``[B, K, S, ...]``.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_attn.masks import length_mask

__all__ = [
    "keys_from_kernel",
    "keys_to_kernel",
    "live_rows",
    "queries_from_kernel",
    "queries_to_kernel",
    "zero_rows",
]


def queries_to_kernel(x, K: int):
    """``[B, T, N, ...]`` -> ``[B, K, G, T, ...]`` (query head ``n`` is ``(k, g)`` with
    ``n = k * G + g``, so GQA needs no repeat of the keys)."""
    B, T, N = x.shape[:3]
    return jnp.moveaxis(x.reshape(B, T, K, N // K, *x.shape[3:]), 1, 3)


def queries_from_kernel(x):
    """``[B, K, G, T, ...]`` -> ``[B, T, N, ...]``, inverse of :func:`queries_to_kernel`."""
    B, K, G, T = x.shape[:4]
    return jnp.moveaxis(x, 3, 1).reshape(B, T, K * G, *x.shape[4:])


def keys_to_kernel(x):
    """``[B, S, K, ...]`` -> ``[B, K, S, ...]``."""
    return jnp.swapaxes(x, 1, 2)


def keys_from_kernel(x):
    """``[B, K, S, ...]`` -> ``[B, S, K, ...]``, inverse of :func:`keys_to_kernel`."""
    return jnp.swapaxes(x, 1, 2)


def live_rows(query_seq_lengths, T: int):
    """bool ``[B, T]``: the query rows before their sequence's length (int32 positions)."""
    return length_mask(jnp.asarray(query_seq_lengths).astype(jnp.int32), T)


def zero_rows(x, rows):
    """``x [B, T, ...]`` with the rows where ``rows [B, T]`` is False set to zero: a row
    past its query length attends nothing, and so gives (and takes) nothing."""
    rows = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
    return jnp.where(rows, x, jnp.zeros((), x.dtype))
