"""dot_product_attention: every implementation against the einsum reference and jax.nn.

"Every implementation" is ``ja.available_implementations()``; a call one of them cannot
serve skips that implementation only.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allowed_error, attention_float64, make_qkv

import jax_attn as ja
from jax_attn import dispatch
from jax_attn import functional as F
from jax_attn.validation import check_attention_args

IMPLEMENTATIONS = ja.available_implementations()
SHAPE = dict(B=2, T=5, S=7, N=4, K=2, H=8)


def _random_mask(shape, seed=3, p=0.7):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def _run(implementation, q, k, v, **kwargs):
    call = check_attention_args(q, k, v, **kwargs)
    reason = dispatch.unsupported_reason(implementation, call)
    if reason is not None:
        pytest.skip(f"{implementation}: {reason}")
    return ja.dot_product_attention(q, k, v, implementation=implementation, **kwargs)


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "mask": dict(mask=_random_mask((2, 4, 5, 7))),
    "mask_broadcast": dict(mask=_random_mask((1, 1, 5, 7), seed=4)),
    "bias": dict(bias=jnp.asarray(np.random.default_rng(5).standard_normal((1, 4, 5, 7)))),
    "lengths": dict(query_seq_lengths=jnp.array([3, 5]), key_value_seq_lengths=jnp.array([7, 2])),
    "zero_kv_length": dict(key_value_seq_lengths=jnp.array([0, 4])),
    "window": dict(local_window_size=(2, 1)),
    "causal_window": dict(is_causal=True, local_window_size=(1, 0)),
    "scale": dict(scale=0.3, is_causal=True),
    "fully_masked_rows": dict(mask=jnp.zeros((2, 4, 5, 7), bool).at[:, :, :2].set(True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_implementation_equals_reference(case, implementation):
    q, k, v = make_qkv(**SHAPE)
    kwargs = CASES[case]
    got = _run(implementation, q, k, v, **kwargs)
    want = ja.reference.dot_product_attention(q, k, v, **kwargs)
    assert not jnp.isnan(got).any()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", ["plain", "causal", "mask", "bias", "window", "scale"])
def test_reference_equals_jax_nn_where_both_define_it(case):
    # Square T == S (jax.nn aligns causal/window top-left) and no fully masked rows.
    q, k, v = make_qkv(**dict(SHAPE, S=5))
    kwargs = dict(CASES[case])
    if "mask" in kwargs:
        kwargs["mask"] = kwargs["mask"][..., :5].at[..., 0].set(True)
    if "bias" in kwargs:
        kwargs["bias"] = kwargs["bias"][..., :5]
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    got = ja.reference.dot_product_attention(q, k, v, **kwargs)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_reference_float64_matches_numpy_loops():
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in make_qkv(B=1, T=3, S=4, N=2, K=1, H=3))
        got = ja.reference.dot_product_attention(q, k, v, is_causal=True)
        assert got.dtype == jnp.float64
        qn, kn, vn = (np.asarray(x) for x in (q, k, v))
        want = np.zeros_like(qn)
        for n in range(2):
            for t in range(3):
                logits = np.array([qn[0, t, n] @ kn[0, s, 0] / np.sqrt(3) for s in range(4)])
                logits[np.arange(4) > t + 1] = -np.inf
                w = np.exp(logits - logits.max())
                w /= w.sum()
                want[0, t, n] = w @ vn[0, :, 0]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# float32 in the fast set; the half dtypes in the slow step (fast: empty rows in float16
# and bfloat16 for every implementation in
# test_numerics.py::test_fully_masked_rows_give_exact_zeros).
@pytest.mark.parametrize(
    "dtype",
    [
        jnp.float32,
        pytest.param(jnp.bfloat16, marks=pytest.mark.slow),
        pytest.param(jnp.float16, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fully_masked_rows_are_zero_in_every_dtype(dtype, implementation):
    q, k, v = make_qkv(**SHAPE, dtype=dtype)
    mask = jnp.ones((2, 4, 5, 7), bool).at[:, :, 1].set(False)
    out = _run(implementation, q, k, v, mask=mask)
    assert out.dtype == dtype
    assert not jnp.isnan(out.astype(jnp.float32)).any()
    assert (out[:, 1] == 0).all()
    lengths = _run(implementation, q, k, v, query_seq_lengths=jnp.array([1, 0]))
    assert not jnp.isnan(lengths.astype(jnp.float32)).any()
    assert (lengths[:, 1:] == 0).all() and (lengths[1] == 0).all()


def test_weights_of_fully_masked_rows_are_zero():
    q, k, _ = make_qkv(**SHAPE)
    mask = jnp.ones((2, 4, 5, 7), bool).at[:, :, 1].set(False)
    weights = ja.dot_product_attention_weights(q, k, mask=mask)
    assert (weights[:, :, 1] == 0).all()


# bfloat16 fast, float16 slow (fast float16 vs float64 for every implementation:
# test_numerics.py::test_logits_are_float32_for_half_inputs, causal too).
@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_low_precision_close_to_float64(dtype, implementation):
    """Within a small multiple of the reference's own error in that dtype."""
    q, k, v = make_qkv(**SHAPE, dtype=dtype)
    got = np.asarray(_run(implementation, q, k, v, is_causal=True), np.float64)
    want = attention_float64(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, want, atol=allowed_error(q, k, v, want, is_causal=True), rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_minus_inf_bias_masks_like_mask(implementation):
    q, k, v = make_qkv(**SHAPE)
    mask = _random_mask((2, 4, 5, 7)).at[:, :, 0].set(False)
    bias = jnp.where(mask, 0.0, -jnp.inf)
    by_bias = _run(implementation, q, k, v, bias=bias)
    by_mask = _run(implementation, q, k, v, mask=mask)
    np.testing.assert_allclose(by_bias, by_mask, atol=1e-6)
    assert not jnp.isnan(by_bias).any()


def test_gqa_equals_repeated_heads():
    q, k, v = make_qkv(**SHAPE)  # N=4, K=2: G=2, the file's one shape (its compiles are reused)
    got = ja.dot_product_attention(q, k, v, is_causal=True)
    # query head n uses key/value head n // G
    k_full, v_full = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    want = ja.reference.dot_product_attention(q, k_full, v_full, is_causal=True)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_unbatched_equals_batched():
    q, k, v = make_qkv(**SHAPE)
    batched = ja.dot_product_attention(q, k, v, is_causal=True)
    for b in range(2):
        single = ja.dot_product_attention(q[b], k[b], v[b], is_causal=True)
        np.testing.assert_allclose(single, batched[b], atol=1e-6)


def test_weights_rows_sum_to_one_and_match_output():
    q, k, v = make_qkv(**dict(SHAPE, N=2, K=2))
    weights = ja.dot_product_attention_weights(q, k, is_causal=True)
    assert weights.shape == (2, 2, 5, 7)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    # [B, T, N, H]
    out = jnp.einsum("BNTS,BSNH->BTNH", weights, v)
    np.testing.assert_allclose(
        out, ja.reference.dot_product_attention(q, k, v, is_causal=True), atol=1e-5
    )


def test_vmap_of_single_sequence_equals_batched_call():
    q, k, v = make_qkv(**SHAPE)

    def one(q1, k1, v1):
        return ja.dot_product_attention(q1, k1, v1, is_causal=True)

    np.testing.assert_allclose(
        jax.vmap(one)(q, k, v), ja.dot_product_attention(q, k, v, is_causal=True), atol=1e-6
    )


@pytest.mark.parametrize("transform", [jax.jit, lambda f: f], ids=["jit", "eager"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_and_eager_equal_reference(implementation, transform):
    q, k, v = make_qkv(**SHAPE)
    kwargs = dict(is_causal=True, key_value_seq_lengths=jnp.array([7, 3]))
    want = ja.reference.dot_product_attention(q, k, v, **kwargs)
    _run(implementation, q, k, v, **kwargs)  # skips an implementation that cannot serve it

    @transform
    def attend(q, k, v):
        return ja.dot_product_attention(q, k, v, implementation=implementation, **kwargs)

    chex.assert_trees_all_close(attend(q, k, v), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_future_leakage(implementation):
    """d out[:, t] / d x[:, t'] is exactly zero for t' > t, and not all zero for t' <= t."""
    x = make_qkv(**dict(SHAPE, S=5, N=4, K=4))[0]
    _run(implementation, x, x[:, :, :2], x[:, :, :2], is_causal=True)

    def attend(x):
        return ja.dot_product_attention(
            x, x[:, :, :2], x[:, :, :2], is_causal=True, implementation=implementation
        )

    @jax.jit  # one compiled program, not one per eager op
    def reach_of(x):
        out, pullback = jax.vjp(attend, x)
        # one cotangent per output position t: ones at t, zeros elsewhere; [T, B, T, N, H]
        cotangents = jnp.broadcast_to(
            jnp.eye(5, dtype=out.dtype)[:, None, :, None, None], (5, *out.shape)
        )
        # [T, B, T', N, H] -> [T, T']
        (grads,) = jax.vmap(pullback)(cotangents)
        return jnp.abs(grads).sum(axis=(1, 3, 4))

    reach = np.asarray(reach_of(x))
    assert (reach[np.triu_indices(5, 1)] == 0).all()
    assert (np.diag(reach) != 0).all()


def test_dropout_same_key_same_output_and_mean_preserved():
    q, k, v = make_qkv(**SHAPE)
    key = jax.random.key(11)
    n, p = 200, 0.4

    # jitted: one compiled program each, not one per eager op; a and b are separate calls
    @jax.jit
    def attend(key):
        return ja.dot_product_attention(q, k, v, dropout_rate=0.4, dropout_rng=key)

    @jax.jit
    def drop(key):
        weights = ja.dot_product_attention_weights(q, k)
        dropped = F.dropout(weights, 0.4, key)
        draws = jax.vmap(lambda key: F.dropout(weights, p, key))(jax.random.split(key, n))
        return weights, dropped, draws

    a, b, c = attend(key), attend(key), attend(jax.random.key(12))
    weights, dropped, draws = drop(key)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    kept = np.asarray(dropped) != 0
    np.testing.assert_allclose(
        np.asarray(dropped)[kept], np.asarray(weights)[kept] / 0.6, rtol=1e-6
    )
    # each draw is w / (1 - p) with probability 1 - p, else 0: mean w, sd w sqrt(p / (1 - p))
    sigma = np.asarray(weights) * np.sqrt(p / (1 - p) / n)
    assert (np.abs(np.asarray(draws.mean(0)) - np.asarray(weights)) <= 5 * sigma + 1e-7).all()


def test_dispatch_without_dropout_support_falls_back():
    q, k, v = make_qkv(**SHAPE)
    key = jax.random.key(1)
    got = ja.dot_product_attention(q, k, v, dropout_rate=0.2, dropout_rng=key)
    want = ja.reference.dot_product_attention(q, k, v, dropout_rate=0.2, dropout_rng=key)
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="dropout"):
        ja.dot_product_attention(q, k, v, dropout_rate=0.2, dropout_rng=key, implementation="xla")


def test_available_implementations_lists_registered_ones():
    names = ja.available_implementations()
    assert {"reference", "xla"} <= set(names)


q0, k0, v0 = make_qkv(**SHAPE)
BAD_CALLS = {
    "query rank": (lambda: ja.dot_product_attention(q0[0, 0], k0, v0), ValueError, "query"),
    "key rank": (lambda: ja.dot_product_attention(q0, k0[0], v0), ValueError, "key"),
    "head dim": (lambda: ja.dot_product_attention(q0, k0[..., :4], v0), ValueError, "key"),
    "value length": (lambda: ja.dot_product_attention(q0, k0, v0[:, :3]), ValueError, "value"),
    "N % K": (lambda: ja.dot_product_attention(q0[:, :, :3], k0, v0), ValueError, "N=3"),
    "batch": (lambda: ja.dot_product_attention(q0, k0[:1], v0[:1]), ValueError, "batch"),
    "mask shape": (
        lambda: ja.dot_product_attention(q0, k0, v0, mask=jnp.ones((5, 6), bool)),
        ValueError,
        "mask",
    ),
    "mask dtype": (
        lambda: ja.dot_product_attention(q0, k0, v0, mask=jnp.ones((5, 7))),
        TypeError,
        "mask",
    ),
    "bias shape": (
        lambda: ja.dot_product_attention(q0, k0, v0, bias=jnp.ones((3, 5, 7))),
        ValueError,
        "bias",
    ),
    "dropout range": (
        lambda: ja.dot_product_attention(
            q0, k0, v0, dropout_rate=1.0, dropout_rng=jax.random.key(0)
        ),
        ValueError,
        "dropout_rate",
    ),
    "dropout rng": (
        lambda: ja.dot_product_attention(q0, k0, v0, dropout_rate=0.1),
        ValueError,
        "dropout_rng",
    ),
    "implementation": (
        lambda: ja.dot_product_attention(q0, k0, v0, implementation="fast"),
        ValueError,
        "implementation",
    ),
    "lengths shape": (
        lambda: ja.dot_product_attention(q0, k0, v0, query_seq_lengths=jnp.array([1])),
        ValueError,
        "query_seq_lengths",
    ),
    "lengths range": (
        lambda: ja.dot_product_attention(q0, k0, v0, key_value_seq_lengths=jnp.array([1, 9])),
        ValueError,
        "key_value_seq_lengths",
    ),
    "window": (
        lambda: ja.dot_product_attention(q0, k0, v0, local_window_size=(-1, 2)),
        ValueError,
        "local_window_size",
    ),
    "dtype mix": (
        lambda: ja.dot_product_attention(q0.astype(jnp.bfloat16), k0, v0),
        TypeError,
        "dtype",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_inputs_raise_clear_errors(name):
    call, error, fragment = BAD_CALLS[name]
    with pytest.raises(error, match=fragment):
        call()
