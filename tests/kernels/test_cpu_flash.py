"""The compiled CPU kernel ("cpu_flash") against the reference: shapes that cross its
64-row tiles, every mask it serves, gradients, transformations, and its build."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allowed_error, attention_float64, make_qkv

import jax_attn as ja
from jax_attn import dispatch
from jax_attn.kernels import cpu_flash
from jax_attn.validation import check_attention_args

# A machine without a C++ compiler (or whose default device is not the CPU) skips; one
# with a compiler must build the kernel (test_it_builds_where_a_compiler_is).
pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu"
    or (cpu_flash.build_reason() is not None and cpu_flash._compiler() is None),
    reason=f"cpu_flash on {jax.default_backend()}: {cpu_flash.build_reason()}",
)

# T and S cross the 64-row tiles (two and three of them); H and H_v are not multiples of 16.
SHAPE = dict(B=2, T=70, S=130, N=4, K=2, H=24, H_v=40)
CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "window": {"local_window_size": (20, 3)},
    "causal_window": {"is_causal": True, "local_window_size": (33, 0)},
    "lengths": {
        "is_causal": True,
        "query_seq_lengths": jnp.array([70, 9]),
        "key_value_seq_lengths": jnp.array([0, 100]),
    },
    "scale": {"scale": 0.05},
}


def test_it_builds_where_a_compiler_is():
    assert cpu_flash.build_reason() is None
    assert "cpu_flash" in ja.available_implementations()


def _flash(q, k, v, **kwargs):
    return ja.dot_product_attention(q, k, v, implementation="cpu_flash", **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_equals_float64_reference(case):
    q, k, v = make_qkv(**SHAPE)
    kwargs = CASES[case]
    want = attention_float64(q, k, v, **kwargs)
    got = jax.jit(lambda q, k, v: _flash(q, k, v, **kwargs))(q, k, v)
    assert got.dtype == jnp.float32 and got.shape == (2, 70, 4, 40)
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want, **kwargs))


def test_buffers_kept_from_a_larger_call_leave_no_trace():
    # The packed keys and values come from a pool and are not zero-filled: a call with
    # padding (H 24 of 32, S 130 of 192) after one that filled the buffers with NaN must
    # still see zeros in its padding (0 * NaN is NaN).
    q, k, v = make_qkv(B=2, T=70, S=256, N=4, K=2, H=32, H_v=48, seed=3)
    jax.block_until_ready(_flash(q, k * jnp.nan, v * jnp.nan, is_causal=True))
    q, k, v = make_qkv(**SHAPE)
    want = attention_float64(q, k, v)
    got = _flash(q, k, v)
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want))
    grads = jax.grad(lambda q, k, v: _flash(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("T, K, H", [(1, 2, 24), (3, 2, 24), (1, 4, 20), (2, 4, 32)])
def test_few_queries_against_a_cache_equal_float64_reference(T, K, H):
    # A query tile of 1 or 3 rows multiplies only those rows (rounded up to 2, 4). With
    # G = 2 the keys are packed up to each sequence's length; with one query tile and
    # G = 1 (K = 4) one or two rows take their logits from k's rows as laid out (H 20:
    # eight keys at a time, then the last 4 of H), with the values copied (H_v 40) or
    # read in place (H_v 32, a multiple of 16).
    shape = dict(SHAPE, T=T, K=K, H=H, H_v=32 if H == 32 else 40)
    q, k, v = make_qkv(**shape)
    kwargs = {"is_causal": True, "key_value_seq_lengths": jnp.array([130, 77])}
    want = attention_float64(q, k, v, **kwargs)
    got = jax.jit(lambda q, k, v: _flash(q, k, v, **kwargs))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want, **kwargs))
    # the tangent packs the key tangents the same way
    directions = make_qkv(**shape, seed=1)

    def tangent(implementation):
        def attend(q, k, v):
            return ja.dot_product_attention(q, k, v, implementation=implementation, **kwargs)

        return jax.jit(lambda p, d: jax.jvp(attend, p, d)[1])((q, k, v), directions)

    want_tangent = tangent("reference")
    scale = float(jnp.abs(want_tangent).max())
    np.testing.assert_allclose(tangent("cpu_flash"), want_tangent, rtol=0, atol=2e-6 * scale)


# T = 1 runs the same rows code (3 rows); test_few_queries_against_a_cache's T = 1, G = 2
# case takes it by default
@pytest.mark.parametrize("T", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_few_queries_with_gqa_take_a_kv_heads_query_heads_as_rows(T):
    # G = 3: one item per (batch, kv head) reads its keys once for the T queries of its
    # three query heads (3 or 9 rows, padded to 4 or 10), each row with its own keys
    # (causal, bottom-right). Output, lse (through the gradients) and the rows with no key
    # (a zero key length, a zero query length) against the reference.
    q, k, v = make_qkv(B=2, T=T, S=130, N=6, K=2, H=24, H_v=40)
    cases = [
        {"key_value_seq_lengths": jnp.array([0, 77]), "query_seq_lengths": jnp.array([T, 1])},
        {"key_value_seq_lengths": jnp.array([130, 100]), "query_seq_lengths": jnp.array([0, T])},
        {"is_causal": True, "local_window_size": (70, 0)},
    ]
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((2, T, 6, 40)), jnp.float32)
    for kwargs in cases:
        want = attention_float64(q, k, v, **kwargs)
        got = jax.jit(lambda q, k, v, kwargs=kwargs: _flash(q, k, v, **kwargs))(q, k, v)
        np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want, **kwargs))

        def grads(implementation, kwargs=kwargs):
            def loss(q, k, v):
                out = ja.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
                return jnp.sum(out * weights)

            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

        for got_grad, want_grad in zip(grads("cpu_flash"), grads("reference"), strict=True):
            scale = max(float(jnp.abs(want_grad).max()), 1e-6)
            np.testing.assert_allclose(got_grad, want_grad, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize(
    "case, shape",
    [
        ("causal", SHAPE),
        ("window", SHAPE),
        ("lengths", SHAPE),
        # one (batch, kv head) pair: the backward splits its four key tiles over items
        ("causal", dict(B=1, T=200, S=200, N=3, K=1, H=16, H_v=16)),
    ],
)
def test_gradients_equal_the_references(case, shape):
    q, k, v = make_qkv(**shape)
    kwargs = CASES[case]
    # a loss that weighs every output element differently
    out_shape = (shape["B"], shape["T"], shape["N"], shape["H_v"])
    weights = jnp.asarray(np.random.default_rng(7).standard_normal(out_shape), jnp.float32)

    def grads(implementation):
        def loss(q, k, v):
            out = ja.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
            return jnp.sum(out * weights)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, got, want in zip("qkv", grads("cpu_flash"), grads("reference"), strict=True):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale, err_msg=f"d{name}")


def test_mqa_and_t_longer_than_s():
    q, k, v = make_qkv(B=1, T=130, S=65, N=3, K=1, H=16)
    want = attention_float64(q, k, v, is_causal=True)  # bottom-right: early rows see nothing
    got = _flash(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want))
    assert not jnp.any(got[:, : 130 - 65]), "rows before the first key must be zero"


def test_vmap_and_unbatched_calls():
    q, k, v = make_qkv(B=3, T=20, S=20, N=2, K=2, H=8)
    per_row = jax.vmap(lambda q, k, v: _flash(q, k, v, is_causal=True))(q, k, v)
    batched = _flash(q, k, v, is_causal=True)
    np.testing.assert_allclose(per_row, batched, rtol=0, atol=1e-6)
    # vmap over a batch of batches: the leading axes fold into the kernel's batch
    stacked = jax.vmap(lambda q: _flash(q, k, v, is_causal=True))(jnp.stack([q, 2 * q]))
    np.testing.assert_allclose(stacked[0], batched, rtol=0, atol=1e-6)


def test_x64_mode_with_float32_inputs():
    with jax.enable_x64(True):
        q, k, v = make_qkv(B=1, T=9, S=9, N=2, K=1, H=8)
        lengths = jnp.array([5], jnp.int64)
        got = _flash(q, k, v, key_value_seq_lengths=lengths)
        want = attention_float64(q, k, v, key_value_seq_lengths=lengths)
        np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want))


def test_declines_what_it_does_not_serve():
    q, k, v = make_qkv(B=1, T=8, S=8, N=2, K=1, H=8)
    declined = {
        "score_fn": ({"score_fn": lambda s, b, h, i, j: 2.0 * s}, "takes no score_fn"),
    }
    for options, reason in declined.values():
        call = check_attention_args(q, k, v, **options)
        assert reason in dispatch.unsupported_reason("cpu_flash", call, "cpu")
    # dropout is served (tests/kernels/test_cpu_flash_dropout.py)
    dropout = check_attention_args(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    assert dispatch.unsupported_reason("cpu_flash", dropout, "cpu") == cpu_flash.build_reason()
    with jax.enable_x64(True):
        wide = check_attention_args(*(x.astype(jnp.float64) for x in (q, k, v)))
        assert "float64" in dispatch.unsupported_reason("cpu_flash", wide, "cpu")
    call = check_attention_args(q, k, v)
    assert "cpu only" in dispatch.unsupported_reason("cpu_flash", call, "gpu")
    if len(jax.devices()) < 2:  # the multi-device case needs conftest's 8 CPU devices
        return
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    with jax.set_mesh(mesh):  # it splits over batch and heads (tests/sharding)
        assert dispatch.unsupported_reason("cpu_flash", call, "cpu") == cpu_flash.build_reason()


def test_build_errors_and_the_switch_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_flash.CACHE_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="failed"):
        cpu_flash._build("false")  # a "compiler" that always fails
    assert not list(tmp_path.glob("*.so"))
    monkeypatch.setenv(cpu_flash.ENABLE_ENV, "0")
    assert "turned off" in cpu_flash._load.__wrapped__()


@pytest.mark.slow  # compiles the kernel once more, in a fresh cache
def test_the_built_library_is_cached_by_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_flash.CACHE_ENV, str(tmp_path))
    compiler = cpu_flash._compiler()
    first = cpu_flash._build(compiler)
    built_at = os.stat(first).st_mtime_ns
    assert cpu_flash._build(compiler) == first and os.stat(first).st_mtime_ns == built_at
