"""Named mask and score functions for the command line (``jax-attn plot --mask-fn``,
``jax-attn check``): the gallery of docs/masks.md, each built from a name and one integer.

``mask_fn("window:4", T)`` returns ``mask_fn(b, h, q_idx, kv_idx) -> bool``;
``score_fn("soft_cap:5", N)`` returns ``score_fn(score, b, h, q_idx, kv_idx) -> score``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

__all__ = ["MASK_FNS", "SCORE_FNS", "mask_fn", "score_fn", "segment_ids"]


def segment_ids(T: int, documents: int) -> np.ndarray:
    """``[T]`` ids of ``documents`` packed sequences, the earlier ones one longer (the same
    for every batch row)."""
    lengths = [T // documents + (i < T % documents) for i in range(documents)]
    return np.repeat(np.arange(documents), lengths).astype(np.int32)


def _causal(_, T):
    return lambda b, h, q_idx, kv_idx: q_idx >= kv_idx


def _window(width, T):
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < width)


def _document(documents, T):
    ids = jnp.asarray(segment_ids(T, documents))
    return lambda b, h, q_idx, kv_idx: (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)


def _prefix_lm(prefix, T):
    return lambda b, h, q_idx, kv_idx: (kv_idx < prefix) | (q_idx >= kv_idx)


def _alibi(_, N):
    slopes = jnp.asarray(2.0 ** (-8.0 * np.arange(1, N + 1) / N), jnp.float32)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h].astype(score.dtype) * (q_idx - kv_idx).astype(score.dtype)

    return alibi


def _soft_cap(cap, N):
    return lambda score, b, h, q_idx, kv_idx: cap * jnp.tanh(score / cap)


# name: (builder(argument, size), default argument, what the argument means)
MASK_FNS: dict[str, tuple[Callable, int | None, str]] = {
    "causal": (_causal, None, ""),
    "window": (_window, 4, "keys seen, the query's own included"),
    "document": (_document, 3, "packed documents, causal in each"),
    "prefix_lm": (_prefix_lm, 2, "prefix tokens every query sees"),
}
SCORE_FNS: dict[str, tuple[Callable, int | None, str]] = {
    "alibi": (_alibi, None, ""),
    "soft_cap": (_soft_cap, 5, "cap on |score|"),
}


def _build(table: dict, kind: str, spec: str, size: int) -> Callable:
    name, _, argument = spec.partition(":")
    if name not in table:
        raise ValueError(f"{kind} must be one of {sorted(table)} (NAME or NAME:INT), got {spec!r}")
    builder, default, meaning = table[name]
    if not argument:
        return builder(default, size)
    if default is None:
        raise ValueError(f"{kind} {name!r} takes no argument, got {spec!r}")
    if not argument.isdigit() or int(argument) < 1:
        raise ValueError(f"{kind} {name}:N needs N >= 1 ({meaning}), got {spec!r}")
    return builder(int(argument), size)


def mask_fn(spec: str, T: int) -> Callable:
    """The mask function ``spec`` (``NAME`` or ``NAME:INT``) for sequences of length ``T``."""
    return _build(MASK_FNS, "mask_fn", spec, T)


def score_fn(spec: str, N: int) -> Callable:
    """The score function ``spec`` (``NAME`` or ``NAME:INT``) for ``N`` query heads."""
    return _build(SCORE_FNS, "score_fn", spec, N)
