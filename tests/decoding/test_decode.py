"""Linen MultiHeadAttention(decode=True) under jax.jit, lax.scan, fori_loop and while_loop,
against the reference's full causal pass."""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jax_attn import kv_cache, reference
from jax_attn.functional import merge_heads, split_heads
from jax_attn.linen_modules import MultiHeadAttention

B, D, CONTEXT, N = 2, 16, 8, 4


def _module(K=None, **kwargs):
    return MultiHeadAttention(D, D, CONTEXT, 0.0, N, num_kv_heads=K, **kwargs)


def _inputs(T=CONTEXT, seed=0):
    """numpy ``[B, T, D]`` (slicing it compiles nothing)."""
    return np.random.default_rng(seed).standard_normal((B, T, D)).astype(np.float32)


def _keys(params, x, K):
    """The keys the module caches for ``x``: ``[B, T, K, H]``."""
    return split_heads(x @ params["W_key"]["kernel"], K)


@functools.partial(jax.jit, static_argnums=2)
def _reference_forward(params, x, K):
    """The module's computation written out with the reference attention, causal."""

    def project(name):
        return x @ params[name]["kernel"]

    q = split_heads(project("W_query"), N)
    k, v = split_heads(project("W_key"), K), split_heads(project("W_value"), K)
    context = reference.dot_product_attention(q, k, v, is_causal=True)
    bias = params["out_proj"]["bias"].reshape(1, 1, -1)
    return merge_heads(context) @ params["out_proj"]["kernel"] + bias


@functools.cache
def _variables(K, seed=0):
    """Numpy-drawn params and the empty cache, in the shapes ``init`` gives (a random
    init costs more compile time than all the decoding below)."""
    x = jax.ShapeDtypeStruct((B, CONTEXT, D), jnp.float32)
    shapes = jax.eval_shape(_module(K, decode=True).init, jax.random.key(seed), x)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) / np.sqrt(s.shape[0])),
        shapes["params"],
    )
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
    return params, cache


def _setup(K, seed=0):
    return _inputs(seed=seed), *_variables(K, seed)


@functools.cache
def _decode_step(K):
    """A user's jitted decode step: any number of new tokens ``x [B, T, D]``."""
    model = _module(K, decode=True)

    @jax.jit
    def decode_step(params, cache, x, lengths=None):
        y, updated = model.apply(
            {"params": params, "cache": cache}, x, lengths=lengths, mutable=["cache"]
        )
        return y, updated["cache"]

    return decode_step


def _decode_chunks(params, cache, x, chunks, step):
    outs, start = [], 0
    for size in chunks:
        y, cache = step(params, cache, x[:, start : start + size])
        outs.append(y)
        start += size
    return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize(
    "K, chunks",
    [
        # default heads, in chunks: tests/modules/test_nnx.py's
        # test_nnx_decode_equals_full_pass_and_linen_decode[None] decodes them in chunks
        pytest.param(None, (3, 1, 4), marks=pytest.mark.slow),
        (2, (1,) * 5),
    ],
)
def test_jitted_step_equals_full_causal_pass(K, chunks):
    x, params, cache = _setup(K)
    out, cache = _decode_chunks(params, cache, x, chunks, _decode_step(K))
    T = sum(chunks)
    expected = _reference_forward(params, x, K or N)[:, :T]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache["cache_index"], [T, T])


@pytest.mark.slow
def test_full_pass_equals_reference():
    K = 2
    x, params, _ = _setup(K)
    full = jax.jit(_module(K).apply)({"params": params}, x)
    np.testing.assert_allclose(full, _reference_forward(params, x, K), rtol=1e-5, atol=1e-5)


@jax.jit
def _generate(params, cache, x):
    """Feeds ``x [B, T, D]`` one token at a time through the jitted step in ``lax.scan``."""
    decode_step = _decode_step(2)

    def body(cache, x_t):
        y, cache = decode_step(params, cache, x_t[:, None])
        return cache, y[:, 0]

    # scan over T: [T, B, D]
    cache, ys = lax.scan(body, cache, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache


def test_scan_past_the_end_never_overwrites_and_gives_nan():
    K = 2
    x, params, cache = _setup(K)
    out, cache = _generate(params, cache, np.concatenate([x, x[:, :2]], axis=1))
    expected = _reference_forward(params, x, K)
    np.testing.assert_allclose(out[:, :CONTEXT], expected, rtol=1e-5, atol=1e-5)
    assert np.isnan(out[:, CONTEXT:]).all()
    np.testing.assert_array_equal(cache["cache_index"], [CONTEXT, CONTEXT])
    np.testing.assert_allclose(cache["cached_key"], _keys(params, x, K), rtol=1e-6, atol=1e-6)
    # One more step on the full cache: NaN out, the cache bit for bit as it was.
    y, after = _decode_step(K)(params, cache, x[:, :1])
    assert np.isnan(y).all()
    chex.assert_trees_all_equal(after, cache)


def test_overflow_only_touches_the_overflowing_sequence():
    K = 2
    x, params, cache = _setup(K)
    _, cache = _generate(params, cache, np.concatenate([x, x[:, :2]], axis=1))
    # Sequence 0 is full; sequence 1 has room for its last token again.
    cache = {**cache, "cache_index": jnp.array([CONTEXT, CONTEXT - 1], jnp.int32)}
    y, after = _decode_step(K)(params, cache, x[:, -1:])
    assert np.isnan(y[0]).all()
    np.testing.assert_allclose(y[1, 0], _reference_forward(params, x, K)[1, -1], atol=1e-5)
    np.testing.assert_array_equal(after["cache_index"], [CONTEXT, CONTEXT])
    np.testing.assert_array_equal(after["cached_key"][0], cache["cached_key"][0])
    np.testing.assert_array_equal(after["cached_value"][0], cache["cached_value"][0])


def _decode_fori_loop(params, cache, x):
    decode_step = _decode_step(2)

    def body(t, carry):
        cache, ys = carry
        x_t = lax.dynamic_slice_in_dim(x, t, 1, axis=1)
        y, cache = decode_step(params, cache, x_t)
        return cache, lax.dynamic_update_slice_in_dim(ys, y, t, axis=1)

    return lax.fori_loop(0, x.shape[1], body, (cache, jnp.zeros_like(x)))


def _decode_while_loop(params, cache, x):
    decode_step = _decode_step(2)

    def cond(carry):
        return carry[0] < x.shape[1]

    def body(carry):
        t, cache, ys = carry
        x_t = lax.dynamic_slice_in_dim(x, t, 1, axis=1)
        y, cache = decode_step(params, cache, x_t)
        return t + 1, cache, lax.dynamic_update_slice_in_dim(ys, y, t, axis=1)

    _, cache, ys = lax.while_loop(cond, body, (jnp.int32(0), cache, jnp.zeros_like(x)))
    return cache, ys


@pytest.mark.parametrize(
    "loop",
    [
        # the same jitted step in a traced loop: test_scan_past_the_end_... (lax.scan) and
        # test_decode_nnx's fori_loop case stay fast
        pytest.param(_decode_fori_loop, marks=pytest.mark.slow),
        pytest.param(_decode_while_loop, marks=pytest.mark.slow),
    ],
)
def test_jitted_step_inside_fori_and_while_loop(loop):
    K = 2
    x, params, cache = _setup(K)
    cache, out = jax.jit(loop)(params, cache, x)
    np.testing.assert_allclose(out, _reference_forward(params, x, K), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache["cache_index"], [CONTEXT, CONTEXT])


def test_overflow_raises_eagerly_and_through_checked():
    K = 2
    x, params, cache = _setup(K)
    cache = {**cache, "cache_index": jnp.full((B,), 6, jnp.int32)}
    module = _module(K, decode=True)
    variables = {"params": params, "cache": cache}
    overflow = r"MultiHeadAttention.apply: KV cache overflow: writing 3 new tokens at index 6 "
    with pytest.raises(ValueError, match=overflow + "needs 9 slots"):
        module.apply(variables, x[:, :3], mutable=["cache"])
    with pytest.raises(ValueError, match="apply: x has 9 tokens, more than context_length=8"):
        module.apply(variables, jnp.zeros((B, 9, D)), mutable=["cache"])
    # Errors of a module decode name the module's entry point and its own argument x.
    batch = "MultiHeadAttention.apply: x has batch 3, but the cache was initialised with batch 2"
    with pytest.raises(ValueError, match=batch):
        module.apply(variables, jnp.zeros((3, 1, D)), mutable=["cache"])
    bad_lengths = r"MultiHeadAttention.apply: lengths must lie in \[0, T=2\], got \[3, 1\]"
    with pytest.raises(ValueError, match=bad_lengths):
        module.apply(variables, x[:, :2], lengths=jnp.array([3, 1]), mutable=["cache"])

    @kv_cache.checked
    def checked_step(params, cache, x):
        return module.apply({"params": params, "cache": cache}, x, mutable=["cache"])

    with pytest.raises(ValueError, match="KV cache overflow: writing 3 new tokens at index 6"):
        checked_step(params, cache, x[:, :3])


def test_mixed_prompt_lengths_under_jit():
    K = 2
    x, params, cache = _setup(K)
    step = _decode_step(K)
    lengths = [2, 3]
    # One padded prompt block of 3, then each sequence continues with its own next token.
    prompt, cache = step(params, cache, x[:, :3], jnp.array(lengths))
    np.testing.assert_array_equal(cache["cache_index"], lengths)
    next_tokens = np.stack([x[b, lengths[b]] for b in range(B)])[:, None]
    y, _ = step(params, cache, next_tokens)
    full = _reference_forward(params, x, K)
    for b in range(B):
        np.testing.assert_allclose(prompt[b, : lengths[b]], full[b, : lengths[b]], atol=1e-5)
        np.testing.assert_allclose(y[b, 0], full[b, lengths[b]], atol=1e-5)
    # a padded query row attends to nothing: zero context, so the output projection's bias
    np.testing.assert_array_equal(prompt[0, lengths[0] :], params["out_proj"]["bias"][None])


@pytest.mark.slow
def test_jitted_step_in_scan_with_x64_enabled():
    K = 2
    x, params, cache = _setup(K)
    with jax.enable_x64(True):
        out, cache = _generate(params, cache, x)
        expected = _reference_forward(params, x, K)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache["cache_index"], [CONTEXT, CONTEXT])
    assert cache["cache_index"].dtype == jnp.int32


@pytest.mark.parametrize("K", [4, 2, 1])
def test_init_allocates_cache_and_gqa_projections(K):
    variables = jax.eval_shape(
        _module(K, decode=True).init, jax.random.key(0), jnp.zeros((B, CONTEXT, D))
    )
    params, cache = variables["params"], variables["cache"]
    H = D // N
    assert cache["cached_key"].shape == (B, CONTEXT, K, H)
    assert cache["cached_value"].shape == (B, CONTEXT, K, H)
    assert cache["cache_index"].shape == (B,)
    assert params["W_key"]["kernel"].shape == (D, K * H)
    assert params["W_query"]["kernel"].shape == (D, D)


def test_book_parameter_count_unchanged():
    shapes = jax.eval_shape(
        MultiHeadAttention(768, 768, 1024, 0.0, 12).init,
        jax.random.key(0),
        jnp.zeros((1, 4, 768)),
    )
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 2_360_064


def test_decode_needs_mutable_cache():
    module = _module(2, decode=True)
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((B, CONTEXT, D)))
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        jax.eval_shape(module.apply, variables, jnp.zeros((B, 1, D)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_kv_heads=3), ValueError, "num_heads=4 must be divisible by num_kv_heads=3"),
        (dict(num_kv_heads=0), ValueError, "num_kv_heads must be > 0"),
        (dict(decode=1), TypeError, "decode must be a bool"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiHeadAttention(D, D, CONTEXT, 0.0, N, **kwargs)


def test_lengths_need_decode():
    module = _module(2)
    x = jnp.zeros((B, 3, D))
    with pytest.raises(ValueError, match="lengths .* needs decode=True"):
        jax.eval_shape(module.init, jax.random.key(0), x, lengths=jnp.array([1, 3]))
