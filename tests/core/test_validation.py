"""Every user mistake is refused in Python with a ValueError/TypeError naming the argument,
inside ``jit`` and ``grad`` too; the summary ``check_attention_args`` returns.

The catalogue of mistakes (``jax_attn.apps.fuzz``: every argument of every entry point,
``docs/errors.md``) is tested in ``tests/apps/test_fuzz.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_qkv

import jax_attn as ja
from jax_attn.validation import AttentionCall, check_attention_args

# a small valid batched call (B, T, S, N, K, H) = (2, 4, 5, 4, 2, 8)
CALL = dict(zip(("query", "key", "value"), make_qkv(B=2, T=4, S=5, N=4, K=2, H=8), strict=True))


def test_mistakes_inside_jit_raise_the_same_errors():
    q, k, v = CALL["query"], CALL["key"], CALL["value"]
    with pytest.raises(ValueError, match="key"):
        jax.jit(lambda q, k, v: ja.dot_product_attention(q, k[..., :4], v))(q, k, v)
    with pytest.raises(ValueError, match="mask"):
        jax.jit(lambda q, m: ja.dot_product_attention(q, k, v, mask=m))(q, jnp.ones((3, 5), bool))
    with pytest.raises(TypeError, match="dropout_rate"):
        jax.grad(
            lambda p: ja.dot_product_attention(
                q, k, v, dropout_rate=p, dropout_rng=jax.random.key(0)
            ).sum()
        )(0.1)


def test_traced_lengths_pass_validation_under_jit():
    q, k, v = CALL["query"], CALL["key"], CALL["value"]
    lengths = jnp.asarray([5, 2])
    jitted = jax.jit(lambda n: ja.dot_product_attention(q, k, v, key_value_seq_lengths=n))
    expected = ja.reference.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
    np.testing.assert_allclose(jitted(lengths), expected, atol=1e-6)


def test_concrete_scalar_arrays_are_accepted_like_python_numbers():
    q, k, v = CALL["query"], CALL["key"], CALL["value"]
    rng = jax.random.key(1)
    expected = ja.reference.dot_product_attention(
        q, k, v, scale=0.5, is_causal=True, dropout_rate=0.25, dropout_rng=rng
    )
    got = ja.reference.dot_product_attention(
        q,
        k,
        v,
        scale=jnp.float32(0.5),
        is_causal=np.bool_(True),
        dropout_rate=np.float32(0.25),
        dropout_rng=rng,
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_check_attention_args_summary_is_compatible():
    q, k, v = CALL["query"], CALL["key"], CALL["value"]
    call = check_attention_args(q, k, v, is_causal=True, local_window_size=2)
    assert isinstance(call, AttentionCall)
    assert (call.B, call.T, call.S, call.N, call.K, call.H, call.H_v, call.G) == (
        2,
        4,
        5,
        4,
        2,
        8,
        8,
        2,
    )
    assert call.window == (2, 2) and call.is_causal and call.batched
    assert call.scale == pytest.approx(8**-0.5)
    weights_only = check_attention_args(q, k)  # no value: an attention-weights call
    assert weights_only.H_v == weights_only.H
    unbatched = check_attention_args(q[0], k[0], v[0])
    assert not unbatched.batched and unbatched.B == 1
