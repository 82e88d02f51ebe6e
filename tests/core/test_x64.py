"""The core with ``jax_enable_x64`` on (and the suite's strict promotion settings).

Under x64, ``jnp.arange`` and Python ints become int64 and Python floats float64: every
mask, length and scale must still combine with float32 inputs and int32 lengths without
an implicit promotion.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_float64, make_qkv

import jax_attn as ja

KWARGS = dict(is_causal=True, local_window_size=(2, 0), scale=0.5)


def _lengths_mask_bias():
    return dict(
        mask=jnp.asarray(np.random.default_rng(1).random((2, 1, 3, 4)) < 0.8),
        bias=jnp.asarray(np.random.default_rng(2).standard_normal((3, 4)), jnp.float32),
        key_value_seq_lengths=jnp.asarray([4, 2], jnp.int32),
        query_seq_lengths=jnp.asarray([3, 1], jnp.int32),
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_implementation_under_x64(dtype):
    with jax.enable_x64(True):
        q, k, v = make_qkv(dtype=dtype)
        kwargs = dict(KWARGS, **_lengths_mask_bias())
        expected = attention_float64(q, k, v, **kwargs)
        tolerance = 1e-12 if dtype == "float64" else 1e-5
        served = []
        for name in ja.available_implementations():
            # under jax.jit (mask, bias and lengths closed over, concrete as in an eager
            # call): one compiled program per implementation, not one per eager op
            def attend(q, k, v, name=name):
                return ja.dot_product_attention(q, k, v, implementation=name, **kwargs)

            try:
                out = jax.jit(attend)(q, k, v)
            except ValueError as error:
                assert "cannot serve" in str(error)
                continue
            served.append(name)
            assert out.dtype == jnp.dtype(dtype), name
            np.testing.assert_allclose(np.asarray(out), expected, atol=tolerance, err_msg=name)
        assert "reference" in served
        weights = ja.dot_product_attention_weights(q, k, is_causal=True, bias=kwargs["bias"])
        assert weights.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)


def test_masks_under_x64():
    with jax.enable_x64(True):
        padding = ja.make_padding_mask(jnp.asarray([1, 3], jnp.int32), None, 3, 4)
        combined = ja.combine_masks(padding, ja.make_causal_mask(3, 4))
        assert combined.shape == (2, 1, 3, 4) and combined.dtype == jnp.bool_
        np.testing.assert_array_equal(
            np.asarray(combined[0, 0]), [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
        )
