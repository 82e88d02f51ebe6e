"""What every kernel declares: its function, what it cannot serve, where it runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jax_attn.validation import AttentionCall


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An attention kernel and what it supports.

    ``fn(query, key, value, *, call, **attention_kwargs)`` takes batched inputs and the
    validated :class:`~jax_attn.validation.AttentionCall`; ``unsupported(call, platform)``
    returns a human-readable reason it cannot serve the call, or ``None``;
    ``platforms`` lists the backends it runs on (``None``: all); ``functions`` names
    which of ``mask_fn``, ``score_fn``, ``block_mask`` it takes (the dispatcher declines
    the others for it, see :func:`jax_attn.dispatch.unsupported_reason`).
    """

    name: str
    fn: Callable
    unsupported: Callable[[AttentionCall, str], str | None]
    platforms: tuple[str, ...] | None = None
    description: str = ""
    functions: frozenset[str] = frozenset()
