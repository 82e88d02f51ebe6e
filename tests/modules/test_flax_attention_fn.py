"""``ja.flax_attention_fn`` inside Flax's own attention modules, against Flax's default."""

import functools
import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_attn as ja

B, T, D, N = 2, 8, 16, 4
TOL = dict(rtol=1e-5, atol=1e-5)
# Flax APIs newer than the library's minimum flax (0.12.4; .ci/run's minimum-versions step
# runs this file there): nnx.capture and Flax's own GQA arrived in flax 0.12.6, the dev
# extra's floor.
NEEDS_NNX_CAPTURE = pytest.mark.skipif(
    not hasattr(nnx, "capture"), reason="nnx.capture needs flax>=0.12.6"
)
NEEDS_FLAX_GQA = pytest.mark.skipif(
    "num_kv_heads" not in inspect.signature(nnx.MultiHeadAttention.__init__).parameters,
    reason="nnx.MultiHeadAttention(num_kv_heads=) needs flax>=0.12.6",
)


def _inputs(shape=(B, T, D), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _linen_pair(**options):
    """Flax's default module, the same with ``attention_fn=ja.flax_attention_fn``, params."""
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=D, **options)
    ours = flax_mha.clone(attention_fn=ja.flax_attention_fn)
    params = flax_mha.init(jax.random.key(0), _inputs(), deterministic=True)["params"]
    return flax_mha, ours, params


def _apply(module, params, x, **kwargs):
    return module.apply({"params": params}, x, **kwargs)


def test_linen_no_mask_with_extra_batch_dims():
    flax_mha, ours, params = _linen_pair()
    x = _inputs((1, B, T, D))
    chex.assert_trees_all_close(_apply(ours, params, x), _apply(flax_mha, params, x), **TOL)


# float32 (Flax's default mask dtype) fast; a bool mask (slow here) runs fast in
# test_linen_bias_and_cross_attention_direct_call
@pytest.mark.parametrize(
    "mask_dtype", [jnp.float32, pytest.param(jnp.bool_, marks=pytest.mark.slow)]
)
def test_linen_causal_mask_as_flax_makes_it(mask_dtype):
    flax_mha, ours, params = _linen_pair()
    x = _inputs()
    mask = nn.make_causal_mask(jnp.ones((B, T)), dtype=mask_dtype)
    chex.assert_trees_all_close(
        _apply(ours, params, x, mask=mask), _apply(flax_mha, params, x, mask=mask), **TOL
    )


# slow: is_causal=True through flax_attention_fn runs fast in
# test_nnx_gqa_causal_mask_and_is_causal, and a functools.partial of it inside the Linen
# module in test_partial_with_implementation
@pytest.mark.slow
def test_linen_is_causal_through_partial_equals_flax_causal_mask():
    flax_mha, _, params = _linen_pair()
    ours = flax_mha.clone(attention_fn=functools.partial(ja.flax_attention_fn, is_causal=True))
    x = _inputs()
    mask = nn.make_causal_mask(jnp.ones((B, T)))
    chex.assert_trees_all_close(
        _apply(ours, params, x), _apply(flax_mha, params, x, mask=mask), **TOL
    )


def test_linen_padding_mask_on_valid_rows():
    flax_mha, ours, params = _linen_pair()
    x = _inputs()
    lengths = np.array([T, 5])
    valid = jnp.arange(T)[None, :] < jnp.asarray(lengths)[:, None]
    mask = nn.combine_masks(nn.make_attention_mask(valid, valid), nn.make_causal_mask(valid))
    got = _apply(ours, params, x, mask=mask)
    want = _apply(flax_mha, params, x, mask=mask)
    for b, length in enumerate(lengths):
        chex.assert_trees_all_close(got[b, :length], want[b, :length], **TOL)


def test_linen_bias_and_cross_attention_direct_call():
    q = _inputs((B, T, N, 4), seed=1)
    k = _inputs((B, 6, N, 4), seed=2)
    v = _inputs((B, 6, N, 5), seed=3)
    bias = _inputs((1, N, T, 6), seed=4)
    mask = _inputs((B, 1, T, 6), seed=5) > -0.5
    got = ja.flax_attention_fn(q, k, v, bias=bias, mask=mask, deterministic=True)
    want = nn.dot_product_attention(q, k, v, bias=bias, mask=mask, deterministic=True)
    rows = np.asarray(mask.any(-1))[:, 0]  # [B, T]: rows with a key to attend
    chex.assert_trees_all_close(np.asarray(got)[rows], np.asarray(want)[rows], **TOL)


@pytest.mark.parametrize("S", [pytest.param(6, marks=pytest.mark.slow), 11])
def test_is_causal_top_left_as_flax_when_lengths_differ(S):
    q = _inputs((B, 8, N, 4), seed=1)
    k = _inputs((B, S, N, 4), seed=2)
    v = _inputs((B, S, N, 4), seed=3)
    # key 0 stays visible: no query row is left with nothing to attend
    mask = (_inputs((B, 1, 8, S), seed=4) > -1.0).at[..., 0].set(True)
    # both sides jitted: one compile each instead of op-by-op dispatch
    ours = jax.jit(lambda q, k, v, kw: ja.flax_attention_fn(q, k, v, is_causal=True, **kw))
    flax = jax.jit(lambda q, k, v, kw: nnx.dot_product_attention(q, k, v, is_causal=True, **kw))
    for kwargs in ({}, {"mask": mask}):
        chex.assert_trees_all_close(ours(q, k, v, kwargs), flax(q, k, v, kwargs), **TOL)


# slow: test_nnx_dropout_deterministic_and_sow_weights runs a dropout_rate=0.3 module with
# deterministic=True and a causal mask through flax_attention_fn in the fast set
@pytest.mark.slow
def test_linen_dropout_module_deterministic_equals_flax():
    flax_mha, ours, params = _linen_pair(dropout_rate=0.3)
    x = _inputs()
    mask = nn.make_causal_mask(jnp.ones((B, T)))
    chex.assert_trees_all_close(
        _apply(ours, params, x, mask=mask, deterministic=True),
        _apply(flax_mha, params, x, mask=mask, deterministic=True),
        **TOL,
    )


@pytest.mark.parametrize("implementation", ["xla"])
def test_partial_with_implementation(implementation):
    flax_mha, _, params = _linen_pair()
    fn = functools.partial(ja.flax_attention_fn, implementation=implementation)
    ours = flax_mha.clone(attention_fn=fn)
    x = _inputs()
    mask = nn.make_causal_mask(jnp.ones((B, T)))
    chex.assert_trees_all_close(
        _apply(ours, params, x, mask=mask), _apply(flax_mha, params, x, mask=mask), **TOL
    )


@pytest.mark.slow
def test_linen_gradients_equal_flax():
    flax_mha, ours, params = _linen_pair()
    x = _inputs()
    mask = nn.make_causal_mask(jnp.ones((B, T)))

    def grads(module):
        def loss(p, x):
            return jnp.sum(module.apply({"params": p}, x, mask=mask) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    chex.assert_trees_all_close(grads(ours), grads(flax_mha), rtol=1e-5, atol=1e-5)


# slow: test_nnx_decode_token_by_token_equals_full_pass decodes through flax_attention_fn
# token by token in the fast set (the same function on the same cached keys/values)
@pytest.mark.slow
def test_linen_decode_token_by_token_equals_full_pass():
    flax_mha, ours, params = _linen_pair()
    x = _inputs()
    mask = nn.make_causal_mask(jnp.ones((B, T)))
    full = _apply(flax_mha, params, x, mask=mask)
    decoder = ours.clone(decode=True)
    cache = decoder.init(jax.random.key(1), x)["cache"]

    def step(cache, x_t):
        y, state = decoder.apply(
            {"params": params, "cache": cache}, x_t[:, None], mutable=["cache"]
        )
        return state["cache"], y[:, 0]

    _, ys = jax.jit(lambda c, xs: jax.lax.scan(step, c, xs))(cache, jnp.swapaxes(x, 0, 1))
    chex.assert_trees_all_close(jnp.swapaxes(ys, 0, 1), full, **TOL)


# slow: test_nnx_dropout_deterministic_and_sow_weights checks the sown weights of
# flax_attention_fn against Flax's in the fast set
@pytest.mark.slow
def test_linen_sow_weights():
    flax_mha, ours, params = _linen_pair()
    x = _inputs()
    mask = nn.make_causal_mask(jnp.ones((B, T)))

    def sown(module):
        _, state = module.apply(
            {"params": params}, x, mask=mask, sow_weights=True, mutable=["intermediates"]
        )
        return state["intermediates"]["attention_weights"]

    chex.assert_trees_all_close(sown(ours), sown(flax_mha), **TOL)


def _nnx_pair(**options):
    def make(**fn):
        return nnx.MultiHeadAttention(
            N, D, qkv_features=D, decode=False, rngs=nnx.Rngs(0), **options, **fn
        )

    return make(), make(attention_fn=ja.flax_attention_fn)


@NEEDS_FLAX_GQA
def test_nnx_gqa_causal_mask_and_is_causal():
    flax_mha, ours = _nnx_pair(num_kv_heads=2)
    x = _inputs()
    mask = nn.make_causal_mask(jnp.ones((B, T)))
    want = flax_mha(x, mask=mask)
    chex.assert_trees_all_close(ours(x, mask=mask), want, **TOL)
    chex.assert_trees_all_close(ours(x, is_causal=True), want, **TOL)


@NEEDS_NNX_CAPTURE
def test_nnx_dropout_deterministic_and_sow_weights():
    flax_mha, ours = _nnx_pair(dropout_rate=0.3)
    x = _inputs()
    mask = nn.make_causal_mask(jnp.ones((B, T)))

    def forward(m, x):
        return m(x, mask=mask, deterministic=True, sow_weights=True)

    want, want_sown = nnx.capture(forward, nnx.Intermediate)(flax_mha, x)
    got, got_sown = nnx.capture(forward, nnx.Intermediate)(ours, x)
    chex.assert_trees_all_close(got, want, **TOL)
    chex.assert_trees_all_close(got_sown, want_sown, **TOL)
    assert jax.tree.leaves(got_sown)[0].shape == (B, N, T, T)


def test_nnx_decode_token_by_token_equals_full_pass():
    flax_mha, ours = _nnx_pair()
    x = _inputs()
    full = flax_mha(x, mask=nn.make_causal_mask(jnp.ones((B, T))))
    ours.init_cache(x.shape)
    step = nnx.jit(lambda m, x_t: m(x_t, decode=True))
    ys = [step(ours, x[:, t : t + 1]) for t in range(T)]
    chex.assert_trees_all_close(jnp.concatenate(ys, axis=1), full, **TOL)


def test_dropout_same_key_same_output_and_mean_preserved():
    rate, S = 0.5, 256
    q = jnp.zeros((2, 64, N, 8))  # zero logits: every weight is 1 / S
    k = jnp.zeros((2, S, N, 8))
    v = jnp.ones((2, S, N, 8))
    fn = jax.jit(
        lambda rng: ja.flax_attention_fn(
            q, k, v, dropout_rng=rng, dropout_rate=rate, deterministic=False
        )
    )
    first = fn(jax.random.key(3))
    chex.assert_trees_all_equal(fn(jax.random.key(3)), first)
    assert not np.array_equal(np.asarray(fn(jax.random.key(4))), np.asarray(first))
    # each output is (kept weights) / (S * (1 - rate)): mean 1 over 2 * 64 * 4 * 256 draws
    # (standard deviation of the mean 0.003)
    np.testing.assert_allclose(float(first.mean()), 1.0, atol=0.02)
    assert float(first.std()) > 0.01  # something was dropped


def test_linen_dropout_through_module_rngs():
    _, ours, params = _linen_pair(dropout_rate=0.3)
    x = _inputs()

    @jax.jit
    def run(rng):
        return ours.apply({"params": params}, x, deterministic=False, rngs={"dropout": rng})

    plain = ours.apply({"params": params}, x, deterministic=True)
    first = run(jax.random.key(5))
    chex.assert_trees_all_equal(run(jax.random.key(5)), first)
    assert not np.allclose(first, plain, atol=1e-3)


@pytest.mark.slow
def test_precision_and_dtype():
    q, k, v = (_inputs((B, 4, N, 4), seed=seed) for seed in (1, 2, 3))
    highest = jax.lax.Precision.HIGHEST
    chex.assert_trees_all_close(
        ja.flax_attention_fn(q, k, v, precision=highest),
        nn.dot_product_attention(q, k, v, precision=highest),
        **TOL,
    )
    got = ja.flax_attention_fn(q, k, v, dtype=jnp.bfloat16)
    want = nn.dot_product_attention(q, k, v, dtype=jnp.bfloat16)
    assert got.dtype == want.dtype == jnp.bfloat16
    chex.assert_trees_all_close(
        got.astype(jnp.float32), want.astype(jnp.float32), rtol=2e-2, atol=2e-2
    )


def test_errors_name_the_argument():
    q = k = v = jnp.ones((B, T, N, 4))
    with pytest.raises(ValueError, match="dropout_rng"):
        ja.flax_attention_fn(q, k, v, dropout_rate=0.1, deterministic=False)
    with pytest.raises(ValueError, match="qk_attn_weights_einsum"):
        ja.flax_attention_fn(q, k, v, qk_attn_weights_einsum=jnp.einsum)
    with pytest.raises(ValueError, match="mask batch dims"):
        ja.flax_attention_fn(q, k, v, mask=jnp.ones((3, 1, T, T), bool))
    with pytest.raises(ValueError, match="batch dims must match"):
        ja.flax_attention_fn(q, jnp.ones((3, T, N, 4)), v)


def _temp_bytes(module, params, x, mask, grad):
    def loss(p, x, mask):
        return jnp.sum(module.apply({"params": p}, x, mask=mask) ** 2)

    f = jax.grad(loss) if grad else loss
    compiled = jax.jit(f).lower(params, x, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="a CPU claim: on a GPU the default for a dense mask at this size materialises the "
    "logits as Flax does (dispatch.PREFERENCE; ratio 1.0 on an H200)",
)
@pytest.mark.parametrize("grad", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_temporary_memory_ten_times_below_flax_default(grad):
    # B 1, T 4096, D 256, 4 heads, Flax's causal mask passed as Flax users pass it
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=256)
    ours = flax_mha.clone(attention_fn=ja.flax_attention_fn)
    x = jax.ShapeDtypeStruct((1, 4096, 256), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 1, 4096, 4096), jnp.float32)
    params = jax.eval_shape(flax_mha.init, jax.random.key(0), x, x)["params"]
    ratio = _temp_bytes(flax_mha, params, x, mask, grad) / _temp_bytes(ours, params, x, mask, grad)
    assert ratio >= 10, ratio
