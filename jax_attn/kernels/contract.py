"""The kernel contract: what validation hands a kernel and what a kernel declares.

:class:`AttentionCall` (the validated call: shapes, dtype, options, which inputs came) and
:class:`KernelInputs` (the call's arrays and functions) go to every kernel as
``fn(q, k, v, *, call, inputs)``; :class:`Implementation` is what a kernel file exports.
They sit below validation (which builds the first two) and the kernels (which export the
third), so that neither imports the other for its types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from jax_attn.mask_functions import BlockMask

if TYPE_CHECKING:  # shape annotations only; see jax_attn.shapes
    from jax_attn.shapes import Array, Float, Lengths, Mask, PRNGKey

__all__ = [
    "FUNCTION_ARGUMENTS",
    "AttentionCall",
    "Implementation",
    "KernelInputs",
    "compute_dtype",
]

# The keyword arguments that pass functions (or their block mask) to a kernel.
FUNCTION_ARGUMENTS = ("mask_fn", "score_fn", "block_mask")


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What an attention call asks for, after validation. Shape letters as in jax.nn."""

    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    H_v: int
    dtype: np.dtype
    batched: bool
    has_mask: bool
    has_bias: bool
    is_causal: bool
    has_query_lengths: bool
    has_kv_lengths: bool
    window: tuple[int, int] | None
    dropout_rate: float
    scale: float
    has_mask_fn: bool = False
    has_score_fn: bool = False
    has_block_mask: bool = False
    # ``dot_product_attention``'s score options, also folded into ``score_fn`` (so
    # ``has_score_fn``) for the kernels that take them that way; ``score_options_only``:
    # that ``score_fn`` is the options alone (the caller passed none, and the slopes are
    # concrete, not traced: constants), which a kernel serving the options natively
    # (``Implementation.score_options``) can run without it.
    logit_soft_cap: float | None = None
    has_alibi_slopes: bool = False
    score_options_only: bool = False

    @property
    def G(self) -> int:
        return self.N // self.K

    @property
    def functions(self) -> tuple[str, ...]:
        """Which of ``mask_fn``, ``score_fn``, ``block_mask`` the call passes."""
        flags = (self.has_mask_fn, self.has_score_fn, self.has_block_mask)
        return tuple(name for name, flag in zip(FUNCTION_ARGUMENTS, flags, strict=True) if flag)

    @property
    def compute_dtype(self) -> np.dtype:
        return compute_dtype(self.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class KernelInputs:
    """What a kernel receives besides q, k, v and the :class:`AttentionCall`: the call's
    per-call arrays and functions, ``None`` where the call has none (batched as q is; the
    :class:`AttentionCall` says which came). ``mask_fn`` defaults to ``block_mask``'s."""

    mask: Mask | None = None
    bias: Float[Array, "*bias"] | None = None
    query_seq_lengths: Lengths | None = None
    key_value_seq_lengths: Lengths | None = None
    dropout_rng: PRNGKey | None = None
    mask_fn: Callable | None = None
    score_fn: Callable | None = None
    block_mask: BlockMask | None = None
    # ``[N]`` or ``[B, N]``, also folded into ``score_fn`` (see AttentionCall)
    alibi_slopes: Float[Array, "*slopes"] | None = None

    def __post_init__(self):
        if self.mask_fn is None and self.block_mask is not None:
            object.__setattr__(self, "mask_fn", self.block_mask.mask_fn)


def compute_dtype(dtype) -> np.dtype:
    """The dtype logits and softmax are computed in: float64 for float64, else float32.

    Explicit rather than ``jnp.promote_types(dtype, float32)``, which refuses half
    precision under ``jax_numpy_dtype_promotion="strict"``.
    """
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An attention kernel and what it supports.

    ``fn(q, k, v, *, call, inputs) -> [B, T, N, H_v]`` (in ``call.dtype``) is the kernel
    protocol: batched ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, H_v]``,
    ``call`` the validated :class:`~jax_attn.validation.AttentionCall` (shapes, dtype,
    scale, causal, window, dropout rate, which optional inputs came) and ``inputs`` the
    call's :class:`~jax_attn.validation.KernelInputs` (``mask``, ``bias``,
    ``query_seq_lengths``, ``key_value_seq_lengths``, ``dropout_rng``, ``mask_fn``,
    ``score_fn``, ``block_mask``; ``None`` where not passed), built once by
    :func:`~jax_attn.validation.run_attention`. A kernel reads only the inputs it
    serves; ``unsupported`` declines calls with the others. ``unsupported(call, platform)``
    returns a human-readable reason it cannot serve the call, or ``None``;
    ``platforms`` lists the backends it runs on (``None``: all); ``functions`` names
    which of ``mask_fn``, ``score_fn``, ``block_mask`` it takes (the dispatcher declines
    the others for it, see :func:`jax_attn.dispatch.unsupported_reason`).
    ``runs_anywhere`` (asked at each lookup, ``None``: never) says whether the kernel runs
    on every platform at the moment, beyond ``platforms`` (Pallas in interpret mode, see
    :func:`jax_attn.kernels.pallas_gpu.interpret_requested`); :meth:`runs_on` combines the
    two. ``half_products`` marks a kernel that, for bfloat16/float16 inputs, rounds the
    attention weights and the logit gradients to that dtype before multiplying them by
    ``v`` and ``k`` (FlashAttention-2's tensor-core products, as JAX's Pallas kernels do):
    its gradients can be far from the float32 reference's where keys share a large common
    part. The kernels written here keep both in float32. ``score_options`` marks a kernel
    that serves ``alibi_slopes`` and ``logit_soft_cap`` natively (``call.logit_soft_cap``,
    ``inputs.alibi_slopes``): a call whose ``score_fn`` is only those options
    (``call.score_options_only``) reaches it; every other kernel gets them folded into
    ``score_fn``.
    """

    name: str
    fn: Callable
    unsupported: Callable[[AttentionCall, str], str | None]
    platforms: tuple[str, ...] | None = None
    description: str = ""
    functions: frozenset[str] = frozenset()
    half_products: bool = False
    score_options: bool = False
    runs_anywhere: Callable[[], bool] | None = None

    def runs_on(self, platform: str) -> bool:
        """Whether the kernel runs on ``platform`` now."""
        if self.platforms is None or platform in self.platforms:
            return True
        return self.runs_anywhere is not None and self.runs_anywhere()
