"""The Pallas kernels ("pallas_gpu": Triton flash attention, "pallas_tpu": splash attention)
against the reference, forward and gradients, in Pallas interpret mode on any machine
(JAX_ATTN_PALLAS_INTERPRET=1), and what they decline."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_qkv

import jax_attn as ja
from jax_attn import dispatch
from jax_attn.kernels import pallas_gpu
from jax_attn.validation import check_attention_args

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
PALLAS = ["pallas_gpu", "pallas_tpu"]
NATIVE = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}
# make_qkv's shape for the tests below, unless they say otherwise
SHAPE = dict(B=1, T=256, S=256, N=4, K=2, H=32)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv(pallas_gpu.INTERPRET_ENV, "1")


@functools.partial(jax.jit, static_argnames=("attention", "options"))
def _forward_and_grads(q, k, v, cotangent, lengths, *, attention, options):
    def f(q, k, v):
        return attention(q, k, v, **dict(options), **lengths)

    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(cotangent)


def _assert_matches_reference(implementation, q, k, v, lengths=None, **options):
    """Output and gradients (the VJP of a random cotangent) against the reference's."""
    if implementation == "pallas_gpu" and q.dtype == jnp.float32 and jax.default_backend() == "gpu":
        pytest.skip("float32: the compiled Triton kernel uses TF32 (compared in interpret mode)")
    out_shape = (*q.shape[:-1], v.shape[-1])
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape), q.dtype)
    options = tuple(sorted(options.items()))
    lengths = lengths or {}
    got = _forward_and_grads(
        q,
        k,
        v,
        cotangent,
        lengths,
        attention=functools.partial(ja.dot_product_attention, implementation=implementation),
        options=options,
    )
    want = _forward_and_grads(
        q, k, v, cotangent, lengths, attention=ja.reference.dot_product_attention, options=options
    )
    tol = TOL[q.dtype.type]
    leaves = zip(
        ["out", "dq", "dk", "dv"], jax.tree.leaves(got), jax.tree.leaves(want), strict=True
    )
    for name, a, b in leaves:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert not np.isnan(a).any(), f"{implementation} {name}: NaN"
        np.testing.assert_allclose(a, b, atol=tol, rtol=tol, err_msg=f"{implementation} {name}")


# --- without the variable: not available off their platform --------------------------


@pytest.mark.parametrize("implementation", PALLAS)
def test_not_available_without_interpret_variable(implementation, monkeypatch):
    monkeypatch.delenv(pallas_gpu.INTERPRET_ENV, raising=False)
    platform = jax.default_backend()
    if platform == NATIVE[implementation]:
        pytest.skip(f"{implementation} is native on {platform}")
    assert implementation not in ja.available_implementations()
    q, k, v = make_qkv(**dict(SHAPE, T=16, S=16, H=16))
    with pytest.raises(ValueError, match=f"implementation='{implementation}' cannot serve"):
        ja.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


@pytest.mark.parametrize("implementation", PALLAS)
def test_interpret_variable_makes_them_available_but_never_default(implementation, interpret):
    assert implementation in ja.available_implementations()
    call = check_attention_args(*make_qkv(**dict(SHAPE, T=64, S=64)), is_causal=True)
    assert dispatch.select_implementation(call, "cpu") in ("cpu_flash", "chunked")


def test_preferred_on_their_platform():
    call = check_attention_args(*make_qkv(**dict(SHAPE, T=64, S=64)), is_causal=True)
    assert dispatch.preference_order(call, "gpu")[:2] == ["cudnn", "pallas_gpu"]
    assert dispatch.preference_order(call, "tpu")[0] == "pallas_tpu"


# --- against the reference in interpret mode ------------------------------------------


@pytest.mark.parametrize(
    "implementation",
    # pallas_gpu's default case is test_gpu_padding_query_lengths_mqa_scale
    [pytest.param("pallas_gpu", marks=pytest.mark.slow), "pallas_tpu"],
)
def test_causal_gqa(implementation, interpret):
    _assert_matches_reference(implementation, *make_qkv(**SHAPE), is_causal=True)


def test_gpu_padding_query_lengths_mqa_scale(interpret):
    # T = 100 pads to 128: non-causal padding is a segment of its own; H 8 pads to 16.
    q, k, v = make_qkv(**dict(SHAPE, B=2, T=100, S=100, K=1, H=8))
    lengths = {"query_seq_lengths": jnp.array([100, 37], jnp.int32)}
    _assert_matches_reference("pallas_gpu", q, k, v, lengths, scale=0.3)


@pytest.mark.slow
def test_gpu_bfloat16_causal_padding(interpret):
    q, k, v = make_qkv(**dict(SHAPE, T=200, S=200, N=2, K=2, dtype=jnp.bfloat16))
    _assert_matches_reference("pallas_gpu", q, k, v, is_causal=True)


def test_tpu_causal_window(interpret):
    q, k, v = make_qkv(**dict(SHAPE, N=2, K=1))
    _assert_matches_reference("pallas_tpu", q, k, v, is_causal=True, local_window_size=(40, 0))


def test_tpu_key_and_query_lengths_bottom_right_causal(interpret):
    # T < S (bottom-right causal), both padded to 128 multiples, a zero key length.
    q, k, v = make_qkv(**dict(SHAPE, B=2, T=100, S=200, N=2, K=2))
    lengths = {
        "query_seq_lengths": jnp.array([100, 60], jnp.int32),
        "key_value_seq_lengths": jnp.array([150, 0], jnp.int32),
    }
    _assert_matches_reference("pallas_tpu", q, k, v, lengths, is_causal=True)


@pytest.mark.slow
def test_tpu_window_key_lengths_bfloat16(interpret):
    q, k, v = make_qkv(**dict(SHAPE, B=2, T=128, S=128, N=2, K=1, dtype=jnp.bfloat16))
    lengths = {"key_value_seq_lengths": jnp.array([128, 70], jnp.int32)}
    _assert_matches_reference("pallas_tpu", q, k, v, lengths, local_window_size=(20, 10))


@pytest.mark.slow
def test_tpu_empty_rows_causal_t_greater_than_s(interpret):
    # T > S, causal: the first T - S queries have no key (zero output, zero gradient).
    _assert_matches_reference(
        "pallas_tpu", *make_qkv(**dict(SHAPE, T=256, S=96, N=2, K=2)), is_causal=True
    )


def test_tpu_kernel_cache_leaks_nothing_into_later_traces(interpret):
    # The splash kernel is cached per shape: a second trace (here the gradient, compiled
    # ahead of time as jax-attn bench does) must not capture the first one's arrays.
    q, k, v = make_qkv(**dict(SHAPE, T=128, S=128, N=2, K=1, H=16))

    def f(q, k, v):
        return ja.dot_product_attention(q, k, v, is_causal=True, implementation="pallas_tpu")

    jax.eval_shape(f, q, k, v)
    grads = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2)))
    jax.block_until_ready(grads.lower(q, k, v).compile()(q, k, v))


# --- what they decline, and why --------------------------------------------------------


def _reason(implementation, T=64, S=64, K=2, H=32, dtype=jnp.float32, **kwargs):
    q, k, v = make_qkv(**dict(SHAPE, T=T, S=S, K=K, H=H, dtype=dtype))
    call = check_attention_args(q, k, v, **kwargs)
    return dispatch.unsupported_reason(implementation, call, "cpu")


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(T=32, S=64, is_causal=True), "T == S"),
        (dict(key_value_seq_lengths=jnp.array([3])), "key_value_seq_lengths"),
        (dict(mask=jnp.ones((64, 64), bool)), "mask"),
        (dict(local_window_size=(4, 0), is_causal=True), "window"),
        (dict(H=256), "H <= 128"),
        (dict(dtype=jnp.float16, dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
    ],
)
def test_gpu_declines(kwargs, expected, interpret):
    reason = _reason("pallas_gpu", **kwargs)
    assert reason is not None and expected in reason


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(bias=jnp.zeros((64, 64))), "bias"),
        (dict(dtype=jnp.float16), "float16"),
        (dict(T=0), "empty"),
    ],
)
def test_tpu_declines(kwargs, expected, interpret):
    reason = _reason("pallas_tpu", **kwargs)
    assert reason is not None and expected in reason


def test_gpu_float32_precision_beyond_tf32_is_noticed():
    # On a GPU, float32 is declined when full float32 matmuls are asked for: Triton's
    # dots in this kernel use TF32.
    with jax.default_matmul_precision("float32"):
        assert pallas_gpu._full_float32_matmuls()
    with jax.default_matmul_precision("tensorfloat32"):
        assert not pallas_gpu._full_float32_matmuls()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_compiled_bfloat16_causal_gqa():
    q, k, v = make_qkv(**dict(SHAPE, B=2, T=384, S=384, N=4, K=2, H=64, dtype=jnp.bfloat16))
    _assert_matches_reference("pallas_gpu", q, k, v, is_causal=True)
