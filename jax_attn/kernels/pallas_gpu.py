"""``"pallas_gpu"``: JAX's Pallas (Triton) flash attention on NVIDIA GPUs, with this
library's semantics.

The kernel is ``jax.experimental.pallas.ops.gpu.attention.mha`` (forward and its
``custom_vjp`` backward), called on ``q, k, v [B, T, N, H]``:

* self-attention lengths only (``T == S``): the kernel's causal mask is aligned top-left
  and its fused backward needs as many query blocks as key blocks;
* ``T`` is padded up to a block multiple; with the causal mask the padded keys are
  visible to padded queries only, otherwise padding is a segment of its own;
* GQA/MQA by repeating each key/value head ``G = N // K`` times;
* ``query_seq_lengths``: rows past a sequence's length are set to zero (so is their
  gradient); key lengths, masks, bias, windows and dropout are declined: the kernel's
  segment ids are shared by queries and keys and cannot say "keys < L" for every row;
* head dims below 16 are zero-padded (Triton's dot needs 16), above 128 declined.

``JAX_ATTN_PALLAS_INTERPRET=1`` (read at each call) makes it, and ``"pallas_tpu"``,
available on every platform in Pallas interpret mode: slow, for tests and
``jax-attn check``. On an NVIDIA GPU it always runs compiled.
"""

from __future__ import annotations

import functools
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.kernels.composable import composable
from jax_attn.kernels.contract import AttentionCall, Implementation, KernelInputs

__all__ = [
    "BACKWARD_BLOCK",
    "FORWARD_BLOCKS",
    "IMPLEMENTATION",
    "INTERPRET_ENV",
    "interpret_requested",
    "padded_length",
    "pallas_gpu_attention",
    "pallas_implementation",
    "rows_with_keys",
]

INTERPRET_ENV = "JAX_ATTN_PALLAS_INTERPRET"

# Forward blocks (block_q, block_k): float32 tiles take twice the shared memory of half
# ones, so float32 gets a narrower key block; float16 has bfloat16's element size and
# its blocks (docs/performance.md has the GPU timings that chose them).
FORWARD_BLOCKS = {"float32": (128, 64), "bfloat16": (128, 128), "float16": (128, 128)}
# Backward blocks (dq and dk/dv kernels), the kernel's defaults.
BACKWARD_BLOCK = 32
_BACKWARD_BLOCK_FIELDS = ("block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq")
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
_DTYPES = ("float32", "bfloat16", "float16")
_FULL_FLOAT32 = ("highest", "float32", "f32_f32_f32", "tf32_tf32_f32_x3", "bf16_bf16_f32_x6")


def interpret_requested() -> bool:
    """Whether ``JAX_ATTN_PALLAS_INTERPRET`` asks for interpret mode (read at each call)."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def pallas_implementation(platform: str, fn, unsupported, description: str) -> Implementation:
    """The :class:`Implementation` ``pallas_<platform>`` of a Pallas kernel compiled for
    ``platform`` (any platform in interpret mode). JAX's Pallas attention kernels round the
    weights and logit gradients to a half input dtype for their products
    (``half_products``). Their ``custom_vjp`` is made :func:`composable` (forward mode and
    second order through ``chunked``'s maps)."""
    return Implementation(
        name=f"pallas_{platform}",
        fn=composable(fn),
        unsupported=unsupported,
        platforms=(platform,),
        runs_anywhere=interpret_requested,
        description=description,
        half_products=True,
    )


def padded_length(T: int, block: int) -> int:
    """``T`` rounded up to a multiple of ``block``; below it, to a power of two >= 16."""
    if T >= block:
        return -(-T // block) * block
    return max(16, 1 << (T - 1).bit_length())


def rows_with_keys(call: AttentionCall, query_seq_lengths=None, key_value_seq_lengths=None):
    """bool ``[B, T]``: the query rows that have at least one key to attend (the same for
    every head), or ``None`` when every row has one. Masks and bias are not looked at."""
    T, S = call.T, call.S
    # With T <= S each query's own aligned position is a key its causal mask and window keep.
    if T <= S and not (call.has_query_lengths or call.has_kv_lengths):
        return None
    # Query t sits at key position t + S - T (bottom-right alignment).
    position = jnp.arange(T, dtype=jnp.int32) + (S - T)
    first = jnp.zeros((1, T), jnp.int32)
    last = jnp.full((1, T), S - 1, jnp.int32)
    if call.window is not None:
        left, right = call.window
        first = jnp.maximum(first, (position - left)[None])
        if not call.is_causal:
            last = jnp.minimum(last, (position + right)[None])
    if call.is_causal:
        last = jnp.minimum(last, position[None])
    if key_value_seq_lengths is not None:
        kv_lengths = jnp.asarray(key_value_seq_lengths).astype(jnp.int32)
        last = jnp.minimum(last, kv_lengths[:, None] - 1)
    has_keys = first <= last
    if query_seq_lengths is not None:
        q_lengths = jnp.asarray(query_seq_lengths).astype(jnp.int32)
        has_keys = has_keys & (jnp.arange(T, dtype=jnp.int32)[None] < q_lengths[:, None])
    return jnp.broadcast_to(has_keys, (call.B, T))


def zero_empty_rows(out, has_keys):
    """``out [B, T, N, H]`` with the rows where ``has_keys [B, T]`` is False set to zero."""
    if has_keys is None:
        return out
    return jnp.where(has_keys[:, :, None, None], out, jnp.zeros((), out.dtype))


@functools.cache
def _kernel_api():
    """``(attention module, None)``, or ``(None, reason)`` when this jax's Pallas GPU
    attention lacks what this adapter calls."""
    try:
        from jax.experimental.pallas.ops.gpu import attention
    except Exception as error:  # noqa: BLE001 - any import failure means "not here"
        return None, f"cannot import jax.experimental.pallas.ops.gpu.attention ({error})"
    wanted = {"segment_ids", "sm_scale", "causal", "block_sizes", "interpret"}
    try:
        params = set(inspect.signature(attention.mha).parameters)
    except (TypeError, ValueError):
        params = wanted
    fields = {"block_q", "block_k", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq"}
    have_fields = set(getattr(attention.BlockSizes, "__dataclass_fields__", fields))
    missing = sorted((wanted - params) | (fields - have_fields))
    if missing:
        return None, f"this jax's Pallas GPU attention (jax {jax.__version__}) lacks {missing}"
    return attention, None


def _nvidia_gpu() -> bool:
    device = jax.devices()[0]
    return "nvidia" in str(getattr(device, "device_kind", "")).lower()


def _full_float32_matmuls() -> bool:
    """Whether ``jax_default_matmul_precision`` asks for more than TF32 (Triton's dots in
    this kernel use TF32 for float32 whatever it says)."""
    precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
    return precision is not None and str(precision).lower() in _FULL_FLOAT32


def _pallas_gpu_unsupported(call: AttentionCall, platform: str) -> str | None:
    compiled = platform == "gpu"
    if not compiled and not interpret_requested():
        return f"runs on NVIDIA GPUs only, not on {platform} (or set {INTERPRET_ENV}=1)"
    if compiled and not _nvidia_gpu():
        return "needs an NVIDIA GPU (Triton)"
    _, reason = _kernel_api()
    if reason is not None:
        return reason
    if call.dtype.name not in _DTYPES:
        return f"dtype {call.dtype} (float32, bfloat16 and float16 only)"
    if compiled and call.dtype == np.float32 and _full_float32_matmuls():
        precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
        return (
            f"float32 with jax_default_matmul_precision={precision!r}: the Triton kernel's "
            "matmuls use TF32"
        )
    if call.T != call.S:
        return (
            f"needs T == S (the kernel aligns causal masks top-left and its backward "
            f"needs as many query as key blocks), got T={call.T}, S={call.S}"
        )
    if call.T == 0:
        return "empty sequences (T = S = 0)"
    if call.H_v != call.H:
        return f"needs value head dim equal to H={call.H}, got {call.H_v}"
    if call.H > MAX_HEAD_DIM:
        return f"head dim H <= {MAX_HEAD_DIM} (the block sizes measured), got {call.H}"
    if call.has_mask or call.has_bias:
        return "no mask or bias (the kernel has neither)"
    if call.window is not None:
        return f"no local window (the kernel has none), got {call.window}"
    if call.dropout_rate > 0.0:
        return f"no dropout (the kernel has none), got dropout_rate={call.dropout_rate}"
    if call.has_kv_lengths:
        return (
            "no key_value_seq_lengths: the kernel's segment ids are shared by queries and "
            "keys, so 'keys < length' cannot be expressed for every query row"
        )
    return None


def _pad_axis(x, axis: int, size: int):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def pallas_gpu_attention(q, k, v, *, call: AttentionCall, inputs: KernelInputs):
    """q ``[B, T, N, H]``, k, v ``[B, T, K, H]`` -> ``[B, T, N, H]`` through the Pallas GPU
    kernel (interpret mode off the GPU); of ``inputs`` only the query lengths (the others
    are declined by ``_pallas_gpu_unsupported``)."""
    attention, reason = _kernel_api()
    if reason is not None:
        raise ValueError(f"pallas_gpu: {reason}")
    B, T, H = call.B, call.T, call.H
    if call.G > 1:
        k, v = (jnp.repeat(x, call.G, axis=2) for x in (k, v))
    block_q, block_k = FORWARD_BLOCKS[call.dtype.name]
    T_pad = padded_length(T, max(block_q, block_k))
    H_pad = max(H, MIN_HEAD_DIM)  # zero columns add nothing to the logits
    q, k, v = (_pad_axis(_pad_axis(x, 1, T_pad), 3, H_pad) for x in (q, k, v))
    segment_ids = None
    if T_pad > T and not call.is_causal:
        # [B, T_pad]: the padding is a segment of its own, unseen by the real queries.
        segment_ids = jnp.broadcast_to((jnp.arange(T_pad) >= T).astype(jnp.int32), (B, T_pad))
    backward = dict.fromkeys(_BACKWARD_BLOCK_FIELDS, BACKWARD_BLOCK)
    sizes = attention.BlockSizes(block_q=block_q, block_k=block_k, **backward)
    out = attention.mha(
        q,
        k,
        v,
        segment_ids,
        sm_scale=call.scale,
        causal=call.is_causal,
        block_sizes=sizes,
        interpret=jax.default_backend() != "gpu",
    )
    out = out[:, :T, :, :H]
    return zero_empty_rows(out, rows_with_keys(call, query_seq_lengths=inputs.query_seq_lengths))


IMPLEMENTATION = pallas_implementation(
    "gpu",
    pallas_gpu_attention,
    _pallas_gpu_unsupported,
    "jax.experimental.pallas.ops.gpu.attention.mha: Triton flash attention",
)
