"""Numerics in every dtype: float32 logits, finite masking, zero rows, huge logits, gradients.

Every test is parametrized over each registered implementation
(``ja.available_implementations()``), so a newly registered kernel is checked without
editing this file, and a call one implementation cannot serve skips that implementation
only. Expected values come from ``attention_float64`` (numpy); half-precision tolerances
are a small multiple of the reference's own error in that dtype (``allowed_error``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HALF_ERROR_RATIO, allowed_error, attention_float64, make_qkv
from jax.test_util import check_grads

import jax_attn as ja
from jax_attn import dispatch, functional
from jax_attn.validation import check_attention_args

IMPLEMENTATIONS = ja.available_implementations()
HALF_DTYPES = [jnp.float16, jnp.bfloat16]
B, T, S, N, K, H = 2, 3, 4, 2, 1, 4


def _supports(name, q, k, v, **kwargs):
    call = check_attention_args(q, k, v, **kwargs)
    return dispatch.unsupported_reason(name, call) is None


def _run(name, q, k, v, **kwargs):
    if not _supports(name, q, k, v, **kwargs):
        pytest.skip(f"{name} does not serve this call")
    return ja.dot_product_attention(q, k, v, implementation=name, **kwargs)


def _assert_matches_float64(out, q, k, v, **kwargs):
    expected = attention_float64(q, k, v, **kwargs)
    got = np.asarray(out, np.float64)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, expected, atol=allowed_error(q, k, v, expected, **kwargs))
    return got, expected


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_half_outputs_are_rounded_once(implementation):
    # Two keys per row with far-apart values: rounding the probabilities to bfloat16
    # before they multiply v moves the output by up to an ulp; computing in float32 and
    # rounding the output once stays within half an ulp (+ float32 error) of float64.
    dtype = jnp.bfloat16
    q, k, v = make_qkv(1, 64, 8, 1, 1, 4, dtype, seed=5)
    v = v.at[:, ::2].multiply(4)
    rows = np.arange(64)[:, None]
    mask = (np.arange(8)[None, :] == rows % 8) | (np.arange(8)[None, :] == (rows + 3) % 8)
    kwargs = dict(mask=jnp.asarray(mask), scale=0.3)
    out = _run(implementation, q, k, v, **kwargs)
    expected = attention_float64(q, k, v, **kwargs)
    half_ulp = np.spacing(np.abs(expected).astype(np.float32)) * 2.0**15
    float32_error = 1e-5 * np.abs(np.asarray(v, np.float64)).max()
    error = np.abs(np.asarray(out, np.float64) - expected)
    assert (error <= half_ulp + float32_error).all(), float((error - half_ulp).max())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
# scale 1/3 checks both roundings (the logits and q * scale); scale 1.0, the logits alone
# (the same code path), runs in the slow step.
@pytest.mark.parametrize("scale", [pytest.param(1.0, marks=pytest.mark.slow), 1 / 3])
def test_logits_are_float32_for_half_inputs(implementation, dtype, scale):
    # q.k = 256 + O(1): float32 holds the O(1) part, bfloat16 (spacing 2 there) and
    # float16 (spacing 0.25) do not, so a kernel that rounds the logits (or q * scale,
    # with a scale that is not a power of 2) to the input dtype changes the softmax by
    # O(1). q, k are exact in both dtypes.
    q, k, v = make_qkv(B, T, S, N, K, H, dtype, seed=3, scale=0.5)
    q = q.at[..., 0].set(16)
    k = k.at[..., 0].set(16)
    out = _run(implementation, q, k, v, scale=scale, is_causal=True)
    assert out.dtype == dtype
    _assert_matches_float64(out, q, k, v, scale=scale, is_causal=True)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_logits_accumulate_in_float32_for_half_inputs(implementation, dtype):
    # q.k ~ 2e5 overflows float16 (max 65504) although each input is representable;
    # the scale brings the logits back to O(1), so only a float16 dot product fails.
    q, k, v = make_qkv(B, T, S, N, K, H, dtype, seed=3)
    q, k = (x + jnp.asarray(220.0, dtype) for x in (q, k))
    scale = 1.0 / float(np.sum(np.asarray(q[0, 0, 0], np.float64) * np.asarray(k[0, 0, 0])))
    out = _run(implementation, q, k, v, scale=scale, is_causal=True)
    assert out.dtype == dtype
    got, _ = _assert_matches_float64(out, q, k, v, scale=scale, is_causal=True)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_masked_logit_is_finite_and_vanishes_after_softmax(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        assert np.isfinite(np.asarray(functional.large_negative(dtype), np.float64))
        logits = jnp.asarray([[0.0, 3.0], [1.0, 2.0]], dtype)
        weights = functional.masked_softmax(logits, jnp.asarray([[True, False], [False, False]]))
        assert weights.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
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
        bias=jnp.broadcast_to(
            jnp.where(jnp.arange(B)[:, None, None, None] == 1, -jnp.inf, 0.0), (B, 1, T, S)
        )
    ),
    "causal T>S": lambda: dict(is_causal=True),
    "window T>S": lambda: dict(local_window_size=(0, 0)),
}


# float16 for every way (its range is where a -1e30-style mask overflows into NaN);
# the other dtypes for a few ways.
_EMPTY_ROW_CASES = [(way, jnp.float16) for way in sorted(_EMPTY_ROW_WAYS)] + [
    ("bias=-inf", jnp.bfloat16),
    ("kv_lengths=0", jnp.float32),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("way, dtype", _EMPTY_ROW_CASES)
def test_fully_masked_rows_give_exact_zeros(way, dtype, implementation):
    kwargs = _EMPTY_ROW_WAYS[way]()
    long_queries = way in ("causal T>S", "window T>S")
    q, k, v = make_qkv(B, S + 2 if long_queries else T, S, N, K, H, dtype)
    out = _run(implementation, q, k, v, **kwargs)
    got, expected = _assert_matches_float64(out, q, k, v, **kwargs)
    empty = np.all(expected == 0.0, axis=-1)
    assert empty.any(), "the case must contain an empty row"
    np.testing.assert_array_equal(got[empty], 0.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_huge_logits_do_not_overflow(implementation, dtype):
    # |q.k| ~ 1e5 with scale 1: the softmax is (nearly) one-hot, never inf or NaN.
    q, k, v = make_qkv(B, T, S, N, K, H, dtype, seed=5, scale=100.0)
    logits = np.einsum("btnh,bsh->bnts", np.asarray(q, np.float64), np.asarray(k[:, :, 0]))
    assert np.abs(logits).max() > 3e4
    mask = jnp.asarray([True, True, True, False])
    out = _run(implementation, q, k, v, scale=1.0, mask=mask)
    _assert_matches_float64(out, q, k, v, scale=1.0, mask=mask)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_large_finite_bias_in_float16_gives_no_nan(implementation):
    # Regression: the xla path cast a float32 bias to float16, so -1e5 became -inf and a
    # row masked only by it turned into NaN. A finite bias is not a mask.
    q, k, v = make_qkv(B, T, S, N, K, H, jnp.float16)
    bias = jnp.full((T, S), -1e5, jnp.float32)
    _assert_matches_float64(_run(implementation, q, k, v, bias=bias), q, k, v, bias=bias)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_keys_at_all_gives_zeros(implementation):
    # Regression: S == 0 made the xla path call jnp.any(None).
    q = make_qkv(B, T, S, N, K, H)[0]
    k = v = jnp.zeros((B, 0, K, H))
    out = _run(implementation, q, k, v)
    np.testing.assert_array_equal(np.asarray(out), np.zeros((B, T, N, H)))


def _masked_setup(dtype=jnp.float32):
    q, k, v = make_qkv(B, T, S, N, K, H, dtype)
    # key 3 is padding for both sequences; sequence 1 has its query 2 fully masked
    kv_lengths = jnp.asarray([3, 3])
    mask = jnp.ones((B, 1, T, S), bool).at[1, 0, 2].set(False)
    bias = jnp.asarray(np.random.default_rng(9).standard_normal((B, N, T, S)), jnp.float32)
    bias = bias.at[0, 1, 0, 1].set(-jnp.inf)
    return q, k, v, dict(mask=mask, key_value_seq_lengths=kv_lengths), bias


def _loss_fn(implementation, kwargs):
    def loss(q, k, v, bias):
        out = ja.dot_product_attention(q, k, v, bias=bias, implementation=implementation, **kwargs)
        weights = jnp.broadcast_to(jnp.cos(jnp.arange(out.shape[-1], dtype=jnp.float32)), out.shape)
        return jnp.sum(out.astype(jnp.float32) * weights)

    return loss


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_exactly_zero_at_masked_positions_and_finite(implementation):
    q, k, v, kwargs, bias = _masked_setup()
    if not _supports(implementation, q, k, v, bias=bias, **kwargs):
        pytest.skip(f"{implementation} does not serve this call")
    # under one jax.jit: one compiled program, not one per eager op of the backward pass
    dq, dk, dv, dbias = jax.jit(jax.grad(_loss_fn(implementation, kwargs), argnums=(0, 1, 2, 3)))(
        q, k, v, bias
    )
    for name, grad in dict(dq=dq, dk=dk, dv=dv, dbias=dbias).items():
        assert np.isfinite(np.asarray(grad)).all(), name
    np.testing.assert_array_equal(np.asarray(dk[:, 3]), 0.0)  # padded key
    np.testing.assert_array_equal(np.asarray(dv[:, 3]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[1, 2]), 0.0)  # fully masked query row
    np.testing.assert_array_equal(np.asarray(dbias[..., 3]), 0.0)
    np.testing.assert_array_equal(np.asarray(dbias[1, :, 2]), 0.0)
    np.testing.assert_array_equal(np.asarray(dbias[0, 1, 0, 1]), 0.0)  # -inf bias
    assert np.abs(np.asarray(dq)).sum() > 0 and np.abs(np.asarray(dv)).sum() > 0


# float16 in the fast set; bfloat16 (the same code, another half dtype) in the slow step.
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float16, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_half_precision_gradients_match_float32_reference(implementation, dtype):
    """Gradients in half precision vs the float32 reference's on the same rounded inputs,
    within ``HALF_ERROR_RATIO`` x the reference's own half-precision gradient error."""
    q, k, v, kwargs, bias = _masked_setup(dtype)
    kwargs = dict(kwargs, is_causal=True)
    if not _supports(implementation, q, k, v, bias=bias, **kwargs):
        pytest.skip(f"{implementation} does not serve this call")
    argnums = (0, 1, 2)
    wide = tuple(x.astype(jnp.float32) for x in (q, k, v))
    reference_grad = jax.jit(jax.grad(_loss_fn("reference", kwargs), argnums))
    expected = reference_grad(*wide, bias)
    own = reference_grad(q, k, v, bias)
    got = jax.jit(jax.grad(_loss_fn(implementation, kwargs), argnums))(q, k, v, bias)
    for name, g, o, e in zip("qkv", got, own, expected, strict=True):
        assert g.dtype == dtype, name
        g, o, e = (np.asarray(x, np.float64) for x in (g, o, e))
        budget = max(HALF_ERROR_RATIO * np.abs(o - e).max(), 1e-5 * np.abs(e).max())
        np.testing.assert_allclose(g, e, atol=budget, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_half_logit_gradients_stay_float32(implementation):
    # Keys share a large common part c (k = c + d, all exact in bfloat16): the logit
    # gradients of a row sum to 0, so dq = sum_s d_logits[s] k[s] = sum_s d_logits[s] d[s]
    # and c cancels exactly in float32. A backward that rounds d_logits (or the weights)
    # to bfloat16 first leaves ~2^-9 |d_logits| |c| of c behind: measured 23x the
    # reference's own bfloat16 error (rounding dq once) here, 8-27x over seeds 0-7, where
    # the chunked kernel's error is 1-1.7x it. The bound is HALF_ERROR_RATIO x that error.
    # bfloat16 only (float16 has 3 more mantissa bits: the same check, weaker).
    dtype = jnp.bfloat16
    q, k, v = make_qkv(1, 8, 8, 1, 1, 4, dtype, seed=11)
    k = k + jnp.asarray(32.0, dtype)
    q = (q * 8).round().astype(jnp.float32) / 8  # multiples of 1/8: q.k exact in float32
    q = q.astype(dtype)
    kwargs = dict(is_causal=True, scale=0.125)
    if not _supports(implementation, q, k, v, **kwargs):
        pytest.skip(f"{implementation} does not serve this call")

    def grad_fn(name):
        return jax.jit(jax.grad(lambda q, k, v: _loss_fn(name, kwargs)(q, k, v, None)))

    expected = np.asarray(grad_fn("reference")(*(x.astype(jnp.float32) for x in (q, k, v))))
    own = np.asarray(grad_fn("reference")(q, k, v), np.float64)
    got = grad_fn(implementation)(q, k, v)
    assert got.dtype == dtype
    own_error = np.abs(own - expected).max()
    error = np.abs(np.asarray(got, np.float64) - expected)
    assert own_error > 0
    if not dispatch._REGISTRY[implementation].half_products:
        assert error.max() <= HALF_ERROR_RATIO * own_error, (error.max(), own_error)
        return
    # A kernel that declares half_products (JAX's Pallas kernels) rounds as it says: the
    # error shows (18-44% of max|dq| here, in interpret mode and on an H200) and stays
    # within what rounding the logit gradients, and the weights and output its backward
    # reads, to bfloat16 can cost.
    assert error.max() > HALF_ERROR_RATIO * own_error, "half_products but float32 products"
    bound = _rounded_logit_gradient_bound(q, k, v, kwargs["scale"], float(jnp.finfo(dtype).eps) / 2)
    assert (error <= bound + own_error).all(), float((error - bound).max())


def _rounded_logit_gradient_bound(q, k, v, scale, unit_roundoff):
    """``[T, H]`` bound on ``|dq - dq_exact|`` (B = N = 1, causal, ``_loss_fn``'s loss)
    when a backward rounds the logit gradients ``dS`` to relative ``unit_roundoff`` u
    before ``dS @ k`` and forms ``delta = rowsum(dO * O)`` from an output ``O`` whose
    forward rounded the weights ``P`` before ``P @ v`` and rounded ``O`` itself:
    ``scale u (|dS| @ |k| + (P @ |k|) rowsum(|dO| (|O| + P @ |v|)))``, float64 values."""
    q, k, v = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v))
    T, S = q.shape[0], k.shape[0]
    # [T, S]
    logits = np.where(np.tri(T, S, S - T, dtype=bool), scale * q @ k.T, -np.inf)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    out = weights @ v
    d_out = np.broadcast_to(np.cos(np.arange(out.shape[-1])), out.shape)
    d_weights = d_out @ v.T
    d_logits = weights * (d_weights - (weights * d_weights).sum(axis=1, keepdims=True))
    out_error = unit_roundoff * (np.abs(out) + weights @ np.abs(v))
    delta_error = (np.abs(d_out) * out_error).sum(axis=1, keepdims=True)
    return scale * (
        unit_roundoff * np.abs(d_logits) @ np.abs(k) + (weights @ np.abs(k)) * delta_error
    )


def _grad_dtype(implementation):
    with jax.enable_x64(True):
        q, k, v = (jnp.zeros(x.shape, jnp.float64) for x in make_qkv(B, T, S, N, K, H))
        return jnp.float64 if _supports(implementation, q, k, v) else jnp.float32


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_check_grads(implementation, mode):
    """Numerical vs automatic derivatives (float64 where the implementation serves it)."""
    dtype = _grad_dtype(implementation)
    q, k, v, kwargs, bias = _masked_setup()
    bias = jnp.where(jnp.isfinite(bias), bias, 0.0)  # finite differences need finite inputs
    if not _supports(implementation, q, k, v, bias=bias, is_causal=True, **kwargs):
        pytest.skip(f"{implementation} does not serve this call")

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


# Slow step: every fast test that runs an implementation also checks its output dtype
# (half dtypes: test_logits_are_float32_for_half_inputs; float32: test_kernels_vs_reference.py::
# test_fully_masked_rows_are_zero_in_every_dtype; float64: tests/core/test_x64.py).
@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, *HALF_DTYPES, jnp.float64])
def test_output_keeps_input_dtype(implementation, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        q, k, v = (jnp.asarray(np.asarray(x), dtype) for x in make_qkv(B, T, S, N, K, H))
        out = _run(implementation, q, k, v, is_causal=True)
        assert out.dtype == dtype
