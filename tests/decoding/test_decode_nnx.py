"""NNX MultiHeadAttention(decode=True) under nnx.jit, nnx.scan, nnx.fori_loop,
nnx.while_loop and a plain jax.jit over nnx.split state, against the reference."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jax_attn import reference
from jax_attn.functional import merge_heads, split_heads
from jax_attn.nnx_modules import MultiHeadAttention

B, D, CONTEXT, N, K = 2, 16, 8, 4, 2


@functools.cache
def _split_model():
    """The module's graph and numpy-drawn weights (an eager or jitted random init costs
    more compile time than all the decoding below)."""
    abstract = nnx.eval_shape(
        lambda: MultiHeadAttention(
            D, D, CONTEXT, 0.0, N, num_kv_heads=K, decode=True, rngs=nnx.Rngs(0)
        )
    )
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) / np.sqrt(s.shape[0])),
        state,
    )
    return graphdef, state


def _model():
    model = nnx.merge(*_split_model())
    model.init_cache(B)
    return model


def _inputs(T=CONTEXT, seed=0):
    """numpy ``[B, T, D]`` (slicing it compiles nothing)."""
    return np.random.default_rng(seed).standard_normal((B, T, D)).astype(np.float32)


def _weights(model):
    return {
        name: getattr(model, name).kernel[...]
        for name in ("W_query", "W_key", "W_value", "out_proj")
    } | {"bias": model.out_proj.bias[...]}


@jax.jit
def _reference_forward(weights, x):
    """The module's computation written out with the reference attention, causal."""
    q = split_heads(x @ weights["W_query"], N)
    k, v = split_heads(x @ weights["W_key"], K), split_heads(x @ weights["W_value"], K)
    context = reference.dot_product_attention(q, k, v, is_causal=True)
    return merge_heads(context) @ weights["out_proj"] + weights["bias"].reshape(1, 1, -1)


@nnx.jit
def decode_step(model, x, lengths=None):
    """A user's jitted decode step: any number of new tokens ``x [B, T, D]``."""
    return model(x, lengths=lengths)


@nnx.jit
@nnx.scan(in_axes=(nnx.Carry, 1), out_axes=(nnx.Carry, 1))
def generate(model, x_t):
    """One token at a time through the jitted step; ``x [B, T, D]`` scanned over T."""
    return model, decode_step(model, x_t[:, None])[:, 0]


def test_nnx_jit_step_in_chunks_equals_full_causal_pass():
    model, x = _model(), _inputs()
    outs = [decode_step(model, x[:, a:b]) for a, b in ((0, 3), (3, 4), (4, 7), (7, 8))]
    expected = _reference_forward(_weights(model), x)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.cache_index[...], [CONTEXT, CONTEXT])


def test_nnx_scan_past_the_end_never_overwrites_and_gives_nan():
    model, x = _model(), _inputs()
    _, out = generate(model, np.concatenate([x, x[:, :2]], axis=1))
    weights = _weights(model)
    np.testing.assert_allclose(out[:, :CONTEXT], _reference_forward(weights, x), atol=1e-5)
    assert np.isnan(out[:, CONTEXT:]).all()
    keys = split_heads(x @ weights["W_key"], K)
    np.testing.assert_allclose(model.cached_key[...], keys, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model.cache_index[...], [CONTEXT, CONTEXT])
    # One more step on the full cache: NaN out, the cache bit for bit as it was.
    before = nnx.state(model, nnx.Cache)
    assert np.isnan(decode_step(model, x[:, :1])).all()
    chex.assert_trees_all_equal(nnx.state(model, nnx.Cache), before)


def _fori_loop(model, x):
    def body(t, carry):
        model, ys = carry
        y = decode_step(model, lax.dynamic_slice_in_dim(x, t, 1, axis=1))
        return model, lax.dynamic_update_slice_in_dim(ys, y, t, axis=1)

    return nnx.fori_loop(0, x.shape[1], body, (model, jnp.zeros_like(x)))[1]


def _while_loop(model, x):
    def body(carry):
        t, model, ys = carry
        y = decode_step(model, lax.dynamic_slice_in_dim(x, t, 1, axis=1))
        return t + 1, model, lax.dynamic_update_slice_in_dim(ys, y, t, axis=1)

    init = (jnp.int32(0), model, jnp.zeros_like(x))
    return nnx.while_loop(lambda carry: carry[0] < x.shape[1], body, init)[2]


@pytest.mark.parametrize("loop", [_fori_loop, pytest.param(_while_loop, marks=pytest.mark.slow)])
def test_nnx_jit_step_inside_fori_and_while_loop(loop):
    model, x = _model(), _inputs()
    out = nnx.jit(loop)(model, x)
    np.testing.assert_allclose(out, _reference_forward(_weights(model), x), atol=1e-5)
    np.testing.assert_array_equal(model.cache_index[...], [CONTEXT, CONTEXT])


def test_plain_jax_jit_and_scan_over_split_state():
    model, x = _model(), _inputs()
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, x_t):
        model = nnx.merge(graphdef, state)
        y = model(x_t[:, None])
        return nnx.state(model), y[:, 0]

    # scan over T: [T, B, D]
    state, ys = jax.jit(lambda s, x: lax.scan(step, s, jnp.swapaxes(x, 0, 1)))(state, x)
    nnx.update(model, state)
    expected = _reference_forward(_weights(model), x)
    np.testing.assert_allclose(jnp.swapaxes(ys, 0, 1), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.cache_index[...], [CONTEXT, CONTEXT])


def test_mixed_prompt_lengths_under_nnx_jit():
    model, x = _model(), _inputs()
    lengths = [2, 3]
    prompt = decode_step(model, x[:, :3], jnp.array(lengths))
    np.testing.assert_array_equal(model.cache_index[...], lengths)
    y = decode_step(model, np.stack([x[b, lengths[b]] for b in range(B)])[:, None])
    full = np.asarray(_reference_forward(_weights(model), x))
    for b in range(B):
        np.testing.assert_allclose(prompt[b, : lengths[b]], full[b, : lengths[b]], atol=1e-5)
        np.testing.assert_allclose(y[b, 0], full[b, lengths[b]], atol=1e-5)


def test_eager_decode_errors_name_the_call():
    model, x = _model(), _inputs()
    model.cache_index[...] = jnp.full((B,), CONTEXT - 2, jnp.int32)
    overflow = "MultiHeadAttention.__call__: KV cache overflow: writing 3 new tokens at index 6"
    with pytest.raises(ValueError, match=overflow):
        model(x[:, :3])
    batch = r"MultiHeadAttention.__call__: x has batch 3, .* init_cache\(batch_size=2\)"
    with pytest.raises(ValueError, match=batch):
        model(np.zeros((3, 1, D), np.float32))
    bad_lengths = r"MultiHeadAttention.__call__: lengths must lie in \[0, T=2\], got \[3, 1\]"
    with pytest.raises(ValueError, match=bad_lengths):
        model(x[:, :2], lengths=jnp.array([3, 1]))
    np.testing.assert_array_equal(model.cache_index[...], [CONTEXT - 2] * B)


def test_nnx_checkify_turns_overflow_into_an_error():
    model, x = _model(), _inputs()
    model.cache_index[...] = jnp.full((B,), CONTEXT - 2, jnp.int32)
    checked_step = nnx.checkify(decode_step)
    error, _ = checked_step(model, x[:, :3])
    with pytest.raises(ValueError, match="KV cache overflow: writing 3 new tokens at index 6"):
        error.throw()


@pytest.mark.slow
def test_nnx_scan_with_x64_enabled():
    model, x = _model(), _inputs()
    with jax.enable_x64(True):
        _, out = generate(model, x)
        expected = _reference_forward(_weights(model), x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.cache_index[...], [CONTEXT, CONTEXT])
    assert model.cache_index[...].dtype == jnp.int32
