"""``"pallas_gpu_decode"`` (JAX's Pallas split-K decoding kernel) against the float64
reference in Pallas interpret mode on any machine: one query per sequence over a cache,
its derivatives (through ``chunked``'s maps), a jitted decode loop, and what it declines."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allowed_error, attention_float64, make_qkv

import jax_attn as ja
from jax_attn import dispatch, kv_cache, reference
from jax_attn.kernels import pallas_gpu, pallas_gpu_decode
from jax_attn.validation import check_attention_args

pytestmark = pytest.mark.skipif(
    pallas_gpu_decode._kernel_api()[1] is not None,
    reason=f"pallas_gpu_decode: {pallas_gpu_decode._kernel_api()[1]}",
)

# S 256 = 16 shares of 16 keys: every share boundary is crossed by the lengths below
SHAPE = dict(B=3, T=1, S=256, N=4, H=32)
CASES = {
    "full cache": {},
    "lengths, one empty": {"key_value_seq_lengths": jnp.array([0, 1, 200])},
    "causal, left window": {
        "is_causal": True,
        "local_window_size": (50, 0),
        "key_value_seq_lengths": jnp.array([256, 100, 30]),
    },
    "a padded query": {
        "query_seq_lengths": jnp.array([1, 0, 1]),
        "key_value_seq_lengths": jnp.array([5, 100, 256]),
    },
}


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv(pallas_gpu.INTERPRET_ENV, "1")


def _decode(q, k, v, **kwargs):
    return ja.dot_product_attention(q, k, v, implementation="pallas_gpu_decode", **kwargs)


@pytest.mark.parametrize(
    "K, dtype",
    [
        # interpret mode takes seconds a case: all run in the slow step (the default one
        # compares float32 outputs in test_derivatives_equal_the_references)
        pytest.param(2, "bfloat16", marks=pytest.mark.slow),
        pytest.param(2, "float32", marks=pytest.mark.slow),
        pytest.param(4, "float32", marks=pytest.mark.slow),  # G = 1: masked head loads
        pytest.param(4, "bfloat16", marks=pytest.mark.slow),
    ],
)
def test_output_equals_float64_reference(K, dtype, interpret):
    q, k, v = make_qkv(**SHAPE, K=K, dtype=dtype)
    for case, kwargs in CASES.items():
        want = attention_float64(q, k, v, **kwargs)
        got = jax.jit(functools.partial(_decode, **kwargs))(q, k, v)
        assert got.dtype == q.dtype and got.shape == (3, 1, 4, 32)
        error = np.abs(np.asarray(got, np.float64) - want).max()
        assert error <= allowed_error(q, k, v, want, **kwargs), (case, error)


def test_derivatives_equal_the_references(interpret):
    # The kernel has no derivative of its own: chunked's maps give reverse and forward mode.
    q, k, v = make_qkv(**SHAPE, K=2)
    kwargs = CASES["lengths, one empty"]
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    directions = make_qkv(**SHAPE, K=2, seed=2)

    def derivatives(attention):
        def f(q, k, v):
            return attention(q, k, v, **kwargs)

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cotangent), jax.jvp(f, (q, k, v), directions)[1]

    got = jax.jit(lambda q, k, v: derivatives(_decode))(q, k, v)
    want = jax.jit(lambda q, k, v: derivatives(reference.dot_product_attention))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(np.abs(b).max()))


def test_a_scanned_decode_loop_equals_the_full_causal_pass(interpret):
    # The user's loop: one token per step written into the cache, lax.scan over the steps.
    B, S_max, N, K, H = 2, 32, 4, 2, 16
    q, k, v = make_qkv(B=B, T=6, S=6, N=N, K=K, H=H)

    def step(cache, qkv):
        q, k, v = (x[:, None] for x in qkv)
        out, cache = kv_cache.decode_attention(cache, q, k, v, implementation="pallas_gpu_decode")
        return cache, out[:, 0]

    tokens = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v))
    cache, outs = jax.jit(lambda c, t: jax.lax.scan(step, c, t))(
        kv_cache.init_cache(B, S_max, K, H), tokens
    )
    want = reference.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(jnp.swapaxes(outs, 0, 1), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.index, [6, 6])


def _reason(**kwargs):
    shape = dict(SHAPE, K=2)
    for name in ("T", "S", "H"):
        shape[name] = kwargs.pop(name, shape[name])
    q, k, v = make_qkv(**shape, dtype=kwargs.pop("dtype", "float32"))
    return dispatch.unsupported_reason(
        "pallas_gpu_decode", check_attention_args(q, k, v, **kwargs), "cpu"
    )


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(T=2, S=256), "T == 1"),
        (dict(S=200), "S must split"),
        (dict(H=24), "head dims"),
        (dict(mask=jnp.ones((1, 256), bool)), "mask"),
        (dict(dtype=jnp.float16, dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
    ],
)
def test_declines_what_it_does_not_serve(kwargs, expected, interpret):
    reason = _reason(**kwargs)
    assert reason is not None and expected in reason


def test_not_the_default_and_off_the_gpu_only_when_asked(monkeypatch):
    monkeypatch.delenv(pallas_gpu.INTERPRET_ENV, raising=False)
    if jax.default_backend() != "gpu":
        assert "pallas_gpu_decode" not in ja.available_implementations()
    call = check_attention_args(*make_qkv(**SHAPE, K=2))
    assert "pallas_gpu_decode" not in dispatch.preference_order(call, "gpu")


@pytest.mark.parametrize(
    "S, splits", [(1024, 16), (768, 12), (4096, 16), (48, 3), (16, 1), (200, None)]
)
def test_key_splits_are_equal_power_of_two_shares(S, splits):
    assert pallas_gpu_decode.key_splits(S) == splits


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_compiled_bfloat16_gqa_against_a_cache():
    q, k, v = make_qkv(B=4, T=1, S=1024, N=8, K=2, H=128, dtype="bfloat16")
    kwargs = {"key_value_seq_lengths": jnp.array([1, 300, 1000, 1024])}
    want = attention_float64(q, k, v, **kwargs)
    got = jax.jit(functools.partial(_decode, **kwargs))(q, k, v)
    assert np.abs(np.asarray(got, np.float64) - want).max() <= allowed_error(
        q, k, v, want, **kwargs
    )
