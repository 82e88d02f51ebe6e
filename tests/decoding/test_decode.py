"""MultiHeadAttention(decode=True, num_kv_heads=...) against the reference full pass."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_attn import kv_cache, reference
from jax_attn.functional import merge_heads, split_heads
from jax_attn.linen_modules import MultiHeadAttention

B, T, D, CONTEXT, N = 2, 6, 16, 8, 4


def _module(K=None, **kwargs):
    return MultiHeadAttention(D, D, CONTEXT, 0.0, N, num_kv_heads=K, **kwargs)


def _reference_forward(params, x, K):
    """The module's computation written out with the reference attention."""

    def project(name):
        return x @ params[name]["kernel"]

    q = split_heads(project("W_query"), N)
    k, v = split_heads(project("W_key"), K), split_heads(project("W_value"), K)
    context = reference.dot_product_attention(q, k, v, is_causal=True)
    return merge_heads(context) @ params["out_proj"]["kernel"] + params["out_proj"]["bias"]


def _setup(K, seed=0):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D)), jnp.float32)
    init = jax.jit(_module(K, decode=True).init)
    variables = init(jax.random.key(seed), jnp.zeros((B, CONTEXT, D)))
    return x, variables["params"], variables["cache"]


def _apply_decode(module):
    def apply(variables, x):
        return module.apply(variables, x, mutable=["cache"])

    return apply


def _decode(params, cache, x, chunks, K, apply=None):
    apply = apply or kv_cache.checked(_apply_decode(_module(K, decode=True)))
    outs, start = [], 0
    for size in chunks:
        y, updated = apply({"params": params, "cache": cache}, x[:, start : start + size])
        cache = updated["cache"]
        outs.append(y)
        start += size
    return jnp.concatenate(outs, axis=1), cache


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


@pytest.mark.parametrize("K, chunks", [(4, (1,) * 6), (2, (3, 1, 2)), (1, (2, 1, 3))])
def test_decoding_equals_full_causal_pass(K, chunks):
    x, params, cache = _setup(K)
    out, cache = _decode(params, cache, x, chunks, K)
    expected = jax.jit(_reference_forward, static_argnums=2)(params, x, K)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache["cache_index"], [T, T])


def test_gqa_full_pass_equals_reference():
    K = 2
    x, params, _ = _setup(K)
    full = jax.jit(_module(K).apply)({"params": params}, x)
    np.testing.assert_allclose(full, _reference_forward(params, x, K), rtol=1e-5, atol=1e-5)


def test_one_token_steps_inside_scan_equal_full_pass():
    K = 2
    x, params, cache = _setup(K)
    module = _module(K, decode=True)

    def one_token_at_a_time(params, cache, x):
        def step(cache, x_t):
            y, updated = module.apply(
                {"params": params, "cache": cache}, x_t[:, None], mutable=["cache"]
            )
            return updated["cache"], y[:, 0]

        cache, ys = jax.lax.scan(step, cache, jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(ys, 0, 1)

    out = kv_cache.checked(one_token_at_a_time)(params, cache, x)
    expected = jax.jit(_reference_forward, static_argnums=2)(params, x, K)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_overflow_raises():
    K = 2
    x, params, cache = _setup(K)
    _, cache = _decode(params, cache, x, (T,), K)
    module = _module(K, decode=True)
    with pytest.raises(ValueError, match="writing 3 new tokens at index 6 needs 9 slots"):
        module.apply({"params": params, "cache": cache}, x[:, :3], mutable=["cache"])
    apply = kv_cache.checked(_apply_decode(module))
    with pytest.raises(ValueError, match="KV cache overflow"):
        apply({"params": params, "cache": cache}, x[:, :3])
    with pytest.raises(ValueError, match="more than context_length=8"):
        module.apply({"params": params, "cache": cache}, jnp.zeros((B, 9, D)), mutable=["cache"])


def test_mixed_prompt_lengths_through_lengths():
    K = 2
    x, params, cache = _setup(K, seed=3)
    module = _module(K, decode=True)

    @kv_cache.checked
    def apply(variables, x, lengths=None):
        return module.apply(variables, x, lengths=lengths, mutable=["cache"])

    lengths = [2, 3]
    # One padded prompt block of 3, then each sequence continues with its own next token.
    prompt, updated = apply({"params": params, "cache": cache}, x[:, :3], jnp.array(lengths))
    np.testing.assert_array_equal(updated["cache"]["cache_index"], lengths)
    next_tokens = jnp.stack([x[b, lengths[b]] for b in range(B)])[:, None]
    step, _ = apply({"params": params, **updated}, next_tokens)
    reference_forward = jax.jit(_reference_forward, static_argnums=2)
    for b in range(B):
        expected = reference_forward(params, x[b : b + 1, : lengths[b] + 1], K)[0]
        np.testing.assert_allclose(prompt[b, : lengths[b]], expected[:-1], atol=1e-5)
        np.testing.assert_allclose(step[b, 0], expected[-1], atol=1e-5)


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
