"""Numerics in every dtype: float32 logits, finite masking, zero rows, huge logits, gradients.

Every test runs over each registered implementation (``ja.available_implementations()``),
so a newly registered kernel is checked without editing this file. Expected values
come from the reference evaluated in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_attn as ja
from jax_attn import dispatch, functional
from jax_attn.validation import check_attention_args

IMPLEMENTATIONS = ja.available_implementations()
HALF_DTYPES = [jnp.float16, jnp.bfloat16]
DTYPES = [jnp.float32, *HALF_DTYPES]
B, T, S, N, K, H = 2, 3, 4, 2, 1, 4


def _rand(seed, shape, scale=1.0, dtype=jnp.float32):
    return (scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _qkv(dtype=jnp.float32, scale=1.0, seed=0, T=T, S=S):
    return (
        _rand(seed, (B, T, N, H), scale, dtype),
        _rand(seed + 1, (B, S, K, H), scale, dtype),
        _rand(seed + 2, (B, S, K, H), 1.0, dtype),
    )


def _reference64(q, k, v, **kwargs):
    """The oracle in float64 on the same (already rounded) inputs, back as numpy float64."""
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        if kwargs.get("bias") is not None:
            kwargs["bias"] = jnp.asarray(np.asarray(kwargs["bias"], np.float64))
        return np.asarray(ja.reference.dot_product_attention(q, k, v, **kwargs))


def _supports(name, q, k, v, **kwargs):
    call = check_attention_args(q, k, v, **kwargs)
    return dispatch.unsupported_reason(name, call) is None


def _run(name, q, k, v, **kwargs):
    if not _supports(name, q, k, v, **kwargs):
        pytest.skip(f"{name} does not serve this call")
    return ja.dot_product_attention(q, k, v, implementation=name, **kwargs)


TOLERANCE = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_logits_accumulate_in_float32_for_half_inputs(implementation, dtype):
    # q.k ~ 2e5 overflows float16 (max 65504) although each input is representable;
    # the scale brings the logits back to O(1), so only a float16 dot product fails.
    q, k, v = _qkv(dtype, seed=3)
    q, k = (x + jnp.asarray(220.0, dtype) for x in (q, k))
    scale = 1.0 / float(np.sum(np.asarray(q[0, 0, 0], np.float64) * np.asarray(k[0, 0, 0])))
    out = _run(implementation, q, k, v, scale=scale, is_causal=True)
    assert out.dtype == dtype
    expected = _reference64(q, k, v, scale=scale, is_causal=True)
    got = np.asarray(out, np.float64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE[dtype] * 4, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_masked_logit_is_finite_and_vanishes_after_softmax(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        assert np.isfinite(np.asarray(functional.large_negative(dtype), np.float64))
        logits = jnp.asarray([[0.0, 3.0], [1.0, 2.0]], dtype)
        weights = functional.masked_softmax(logits, jnp.asarray([[True, False], [False, False]]))
        assert weights.dtype == jnp.promote_types(dtype, jnp.float32)
        np.testing.assert_array_equal(np.asarray(weights), [[1.0, 0.0], [0.0, 0.0]])


_EMPTY_ROW_WAYS = {
    # each way leaves batch 1, query row 0 (and more) with nothing to attend
    "mask": lambda: dict(
        mask=jnp.asarray([True, False])[:, None, None, None]
        & jnp.asarray([False, True, True])[None, None, :, None]
    ),
    "kv_lengths=0": lambda: dict(key_value_seq_lengths=jnp.asarray([S, 0])),
    "q_lengths=0": lambda: dict(query_seq_lengths=jnp.asarray([T, 0])),
    "bias=-inf": lambda: dict(
        bias=jnp.where(jnp.arange(B)[:, None, None, None] == 1, -jnp.inf, 0.0)
        * jnp.ones((B, 1, T, S))
    ),
    "causal T>S": lambda: dict(is_causal=True),
    "window T>S": lambda: dict(local_window_size=(0, 0)),
}


# float16 for every way (its range is where a -1e30-style mask overflows into NaN);
# the other dtypes for a few ways (every dtype with a mask is also in test_attention.py).
_EMPTY_ROW_CASES = [(way, jnp.float16) for way in sorted(_EMPTY_ROW_WAYS)] + [
    ("bias=-inf", jnp.bfloat16),
    ("kv_lengths=0", jnp.float32),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("way, dtype", _EMPTY_ROW_CASES)
def test_fully_masked_rows_give_exact_zeros(way, dtype, implementation):
    kwargs = _EMPTY_ROW_WAYS[way]()
    long_queries = way in ("causal T>S", "window T>S")
    q, k, v = _qkv(dtype, T=S + 2 if long_queries else T)
    out = np.asarray(_run(implementation, q, k, v, **kwargs), np.float64)
    expected = _reference64(q, k, v, **kwargs)
    empty = np.all(expected == 0.0, axis=-1)
    assert empty.any(), "the case must contain an empty row"
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[empty], 0.0)
    np.testing.assert_allclose(out, expected, atol=TOLERANCE[dtype] * 4, rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_huge_logits_do_not_overflow(implementation, dtype):
    # |q.k| ~ 1e5 with scale 1: the softmax is (nearly) one-hot, never inf or NaN.
    q, k, v = _qkv(dtype, scale=80.0, seed=5)
    logits = np.einsum("btnh,bsh->bnts", np.asarray(q, np.float64), np.asarray(k[:, :, 0]))
    assert np.abs(logits).max() > 3e4
    out = _run(implementation, q, k, v, scale=1.0, mask=jnp.asarray([True, True, True, False]))
    expected = _reference64(q, k, v, scale=1.0, mask=jnp.asarray([True, True, True, False]))
    np.testing.assert_allclose(
        np.asarray(out, np.float64), expected, atol=TOLERANCE[dtype] * 4, rtol=0
    )


def test_large_finite_bias_in_float16_gives_no_nan():
    # Regression: the xla path cast a float32 bias to float16, so -1e5 became -inf and a
    # row masked only by it turned into NaN. A finite bias is not a mask.
    q, k, v = _qkv(jnp.float16)
    bias = jnp.full((T, S), -1e5, jnp.float32)
    for name in IMPLEMENTATIONS:
        out = np.asarray(_run(name, q, k, v, bias=bias), np.float64)
        np.testing.assert_allclose(out, _reference64(q, k, v, bias=bias), atol=1e-2, rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_keys_at_all_gives_zeros(implementation):
    # Regression: S == 0 made the xla path call jnp.any(None).
    q = _rand(0, (B, T, N, H))
    k = v = jnp.zeros((B, 0, K, H))
    out = _run(implementation, q, k, v)
    np.testing.assert_array_equal(np.asarray(out), np.zeros((B, T, N, H)))


def _masked_setup():
    q, k, v = _qkv()
    # key 3 is padding for both sequences; sequence 1 has its query 2 fully masked
    kv_lengths = jnp.asarray([3, 3])
    mask = jnp.ones((B, 1, T, S), bool).at[1, 0, 2].set(False)
    bias = _rand(9, (B, N, T, S)).at[0, 1, 0, 1].set(-jnp.inf)
    return q, k, v, dict(mask=mask, key_value_seq_lengths=kv_lengths), bias


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_exactly_zero_at_masked_positions_and_finite(implementation):
    q, k, v, kwargs, bias = _masked_setup()
    if not _supports(implementation, q, k, v, bias=bias, **kwargs):
        pytest.skip(f"{implementation} does not serve this call")

    def loss(q, k, v, bias):
        out = ja.dot_product_attention(q, k, v, bias=bias, implementation=implementation, **kwargs)
        return jnp.sum(out * jnp.cos(jnp.arange(H)))

    dq, dk, dv, dbias = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    for name, grad in dict(dq=dq, dk=dk, dv=dv, dbias=dbias).items():
        assert np.isfinite(np.asarray(grad)).all(), name
    np.testing.assert_array_equal(np.asarray(dk[:, 3]), 0.0)  # padded key
    np.testing.assert_array_equal(np.asarray(dv[:, 3]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[1, 2]), 0.0)  # fully masked query row
    np.testing.assert_array_equal(np.asarray(dbias[..., 3]), 0.0)
    np.testing.assert_array_equal(np.asarray(dbias[1, :, 2]), 0.0)
    np.testing.assert_array_equal(np.asarray(dbias[0, 1, 0, 1]), 0.0)  # -inf bias
    assert np.abs(np.asarray(dq)).sum() > 0 and np.abs(np.asarray(dv)).sum() > 0


def _grad_dtype(implementation):
    with jax.enable_x64(True):
        q, k, v = (jnp.zeros(x.shape, jnp.float64) for x in _qkv())
        return jnp.float64 if _supports(implementation, q, k, v) else jnp.float32


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_check_grads(implementation, mode):
    """Numerical vs automatic derivatives (float64 where the implementation serves it)."""
    dtype = _grad_dtype(implementation)
    q, k, v, kwargs, bias = _masked_setup()
    bias = jnp.where(jnp.isfinite(bias), bias, 0.0)  # finite differences need finite inputs

    def attend(q, k, v, bias):
        return ja.dot_product_attention(
            q, k, v, bias=bias, is_causal=True, implementation=implementation, **kwargs
        )

    with jax.enable_x64(dtype == jnp.float64):
        args = tuple(jnp.asarray(np.asarray(x), dtype) for x in (q, k, v, bias))
        tolerance = {} if dtype == jnp.float64 else dict(eps=1e-2, atol=2e-2, rtol=2e-2)
        try:
            check_grads(jax.jit(attend), args, order=1, modes=(mode,), **tolerance)
        except TypeError as error:
            if mode == "fwd" and "custom_vjp" in str(error):
                pytest.skip(f"{implementation} defines a custom_vjp: reverse mode only")
            raise


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [*DTYPES, jnp.float64])
def test_output_keeps_input_dtype(implementation, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        q, k, v = (jnp.asarray(np.asarray(x), dtype) for x in _qkv())
        out = _run(implementation, q, k, v, is_causal=True)
        assert out.dtype == dtype
