"""jax_attn: attention mechanisms in JAX/Flax, from the book's chapter 3 to fast kernels.

>>> import jax, jax_attn as ja
>>> q = k = v = jax.numpy.ones((1, 4, 2, 8))
>>> ja.dot_product_attention(q, k, v, is_causal=True).shape
(1, 4, 2, 8)
"""

from jax_attn import functional, masks, reference
from jax_attn.dispatch import available_implementations, dot_product_attention
from jax_attn.flax_attention import flax_attention_fn
from jax_attn.functional import dot_product_attention_weights
from jax_attn.linen_modules import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    SelfAttentionV2,
)
from jax_attn.mask_functions import BlockMask, make_block_mask
from jax_attn.masks import (
    combine_masks,
    make_causal_mask,
    make_padding_mask,
    make_sliding_window_mask,
)

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "CausalAttention",
    "MultiHeadAttention",
    "MultiHeadAttentionWrapper",
    "SelfAttentionV1",
    "SelfAttentionV2",
    "available_implementations",
    "combine_masks",
    "dot_product_attention",
    "dot_product_attention_weights",
    "flax_attention_fn",
    "functional",
    "make_block_mask",
    "make_causal_mask",
    "make_padding_mask",
    "make_sliding_window_mask",
    "masks",
    "reference",
]


# Heavier layers load on first use: ja.interop, ja.sharding, ja.kv_cache, ja.nnx_modules, ...
_LAZY_SUBMODULES = (
    "dispatch",
    "interop",
    "kernels",
    "kv_cache",
    "linen_modules",
    "nnx_modules",
    "shapes",
    "sharding",
    "validation",
)


def __getattr__(name):
    import importlib

    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"jax_attn.{name}")
    raise AttributeError(f"module 'jax_attn' has no attribute {name!r}")


def __dir__():
    # what dir(), help() and IDEs list: the module's globals and the lazy layers, loaded or not
    return sorted({*globals(), *_LAZY_SUBMODULES})
