"""``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention`` on NVIDIA
GPUs (bfloat16/float16), with this library's semantics via the ``"xla"`` adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_attn.kernels.composable import composable
from jax_attn.kernels.contract import AttentionCall, Implementation, KernelInputs
from jax_attn.kernels.xla import jax_nn_attention


def _nvidia_device():
    """The default device if it is an NVIDIA GPU, else ``None``."""
    device = jax.devices()[0]
    return device if "nvidia" in str(getattr(device, "device_kind", "")).lower() else None


def _cudnn_unsupported(call: AttentionCall, platform: str) -> str | None:
    device = _nvidia_device() if platform == "gpu" else None
    if device is None:
        return "needs an NVIDIA GPU"
    if call.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {call.dtype} (bfloat16 and float16 only)"
    if call.dropout_rate > 0.0:
        return "no dropout (jax.nn.dot_product_attention has none)"
    capability = str(getattr(device, "compute_capability", "0"))
    H_max = 256 if float(capability or 0) >= 9.0 else 128
    if call.H % 8 or call.H > H_max:
        return f"head dim H must be a multiple of 8 and <= {H_max}, got {call.H}"
    if call.H_v != call.H:
        return f"needs value head dim equal to H={call.H}, got {call.H_v}"
    if call.T == 0 or call.S == 0:
        return f"empty sequences (T={call.T}, S={call.S})"
    explicit_mask = (
        call.has_mask
        or call.has_bias
        or (call.T != call.S and call.is_causal)
        or (call.window is not None and (call.T != call.S or not call.is_causal))
    )
    if explicit_mask and (call.T % 2 or call.S % 2):
        return f"a mask or bias needs even T and S, got T={call.T}, S={call.S}"
    return None


def cudnn_attention(q, k, v, *, call: AttentionCall, inputs: KernelInputs):
    return jax_nn_attention(q, k, v, call=call, inputs=inputs, implementation="cudnn")


IMPLEMENTATION = Implementation(
    name="cudnn",
    fn=composable(cudnn_attention),
    unsupported=_cudnn_unsupported,
    platforms=("gpu",),
    description="jax.nn.dot_product_attention(implementation='cudnn'): cuDNN flash attention",
)
