"""The chapter's pure functions, each checked against the reference or a direct formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_qkv

import jax_attn as ja
from jax_attn import functional as F


def _inputs(T=6, D=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((T, D)), jnp.float32)


def test_softmax_stable_where_naive_overflows():
    x = jnp.array([1000.0, 0.0])
    assert jnp.isnan(F.naive_softmax(x)).any()
    np.testing.assert_allclose(F.softmax(x), [1.0, 0.0])
    small = jnp.array([0.1, 0.5, -0.3])
    np.testing.assert_allclose(F.naive_softmax(small), F.softmax(small), rtol=1e-6)


def test_one_query_equals_all_queries_row():
    x = _inputs()
    scores_2 = F.attention_scores_for_query(x[1], x)
    scores = F.attention_scores(x, x)
    np.testing.assert_allclose(scores_2, scores[1], rtol=1e-6)
    context_2 = F.context_vector(F.softmax(scores_2), x)
    np.testing.assert_allclose(context_2, F.simplified_self_attention(x)[1], rtol=1e-6)
    np.testing.assert_allclose(F.normalize_by_sum(scores_2).sum(), 1.0, rtol=1e-6)


def test_simplified_self_attention_equals_reference_with_unit_scale():
    x = _inputs()
    # one head, q = k = v = x, scale 1
    want = ja.reference.dot_product_attention(x[:, None], x[:, None], x[:, None], scale=1.0)
    np.testing.assert_allclose(F.simplified_self_attention(x), want[:, 0], rtol=1e-5)


def _head_params(d_in, d_out, seed, bias=False):
    rng = np.random.default_rng(seed)
    params = {}
    for name in ["W_query", "W_key", "W_value"]:
        p = {"kernel": jnp.asarray(rng.standard_normal((d_in, d_out)), jnp.float32)}
        if bias:
            p["bias"] = jnp.asarray(rng.standard_normal(d_out), jnp.float32)
        params[name] = p
    return params


@pytest.mark.parametrize("is_causal", [False, True])
def test_single_head_attention_equals_reference(is_causal):
    x = _inputs(T=5, D=4)
    params = _head_params(4, 3, 1, bias=True)

    @jax.jit  # one compiled program, not one per eager op
    def both(x, params):
        q, k, v = (F.dense(x, params[n])[:, None] for n in ["W_query", "W_key", "W_value"])
        want = ja.reference.dot_product_attention(q, k, v, is_causal=is_causal)[:, 0]
        got = F.single_head_attention(x, params, is_causal=is_causal)
        return got, want, F.self_attention(x, params), F.single_head_attention(x, params)

    got, want, self_attention, single_head = both(x, params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(self_attention, single_head, rtol=1e-6)


def test_two_causal_mask_ways_agree():
    scores = F.scaled_attention_scores(_inputs(seed=1), _inputs(seed=2))
    a = F.causal_weights_by_renormalizing(scores)
    b = F.causal_weights_by_masking(scores)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert (jnp.triu(a, 1) == 0).all()
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-6)


def test_masked_softmax_zero_rows_and_gradients_finite():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
    mask = jnp.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)

    @jax.jit  # one compiled program, not one per eager op
    def weights_and_grad(logits):
        w = F.masked_softmax(logits, mask)
        loss = lambda x: (F.masked_softmax(x, mask) * jnp.arange(4.0)[None, :]).sum()  # noqa: E731
        return w, jax.grad(loss)(logits)

    w, grad = (np.asarray(x) for x in weights_and_grad(logits))
    assert (w[1] == 0).all() and (w[0, 2:] == 0).all()
    assert np.isfinite(grad).all()
    assert (grad[~np.asarray(mask)] == 0).all()


def test_dropout_on_weights_scales_kept_values():
    weights = jnp.ones((6, 6)) / 6
    dropped = F.dropout(weights, 0.5, jax.random.key(123))
    values = np.unique(np.asarray(dropped))
    np.testing.assert_allclose(values, [0.0, 2 / 6], rtol=1e-6)
    np.testing.assert_array_equal(dropped, F.dropout(weights, 0.5, jax.random.key(123)))
    assert F.dropout(weights, 0.0, None) is weights


def test_split_and_merge_heads_round_trip():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 12)), jnp.float32)
    heads = F.split_heads(x, 3)
    assert heads.shape == (2, 5, 3, 4)
    np.testing.assert_array_equal(F.merge_heads(heads), x)
    with pytest.raises(ValueError, match="num_heads"):
        F.split_heads(x, 5)


def test_stacked_heads_equal_vmapped_single_heads_and_split_projection():
    """3.6.1 (stacked heads) and 3.6.2 (one projection split) agree when the weights do."""
    d_in, H, N = 4, 2, 3
    x = _inputs(T=5, D=d_in)
    heads = [_head_params(d_in, H, seed) for seed in range(N)]

    @jax.jit  # the three ways in one compiled program, not one per eager op
    def three_ways(x, heads):
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *heads)
        by_stacking = F.multi_head_attention_stacked(x, stacked)
        single = jnp.concatenate(
            [F.single_head_attention(x, p, is_causal=True) for p in heads], axis=-1
        )
        # The same heads as one wide projection; out_proj = identity.
        wide = {
            name: {"kernel": jnp.concatenate([p[name]["kernel"] for p in heads], axis=1)}
            for name in ["W_query", "W_key", "W_value"]
        }
        wide["out_proj"] = {"kernel": jnp.eye(N * H), "bias": jnp.zeros(N * H)}
        by_split = F.multi_head_attention(x, wide, N)
        batched = F.multi_head_attention(jnp.stack([x, x]), wide, N)
        return by_stacking, single, by_split, batched

    by_stacking, single, by_split, batched = three_ways(x, heads)
    np.testing.assert_allclose(by_stacking, single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_split, by_stacking, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1], by_split, rtol=1e-5, atol=1e-6)


def test_vmapped_single_head_equals_batched_einsum():
    """The single-sequence, single-head function lifted with vmap over batch and heads."""
    B, T, N, H = 2, 5, 3, 4
    q, k, v = make_qkv(B, T, T, N, N, H, seed=3)

    def one_head(q1, k1, v1):  # [T, H] each
        weights = F.causal_weights_by_masking(F.scaled_attention_scores(q1, k1))
        return F.context_vectors(weights, v1)

    over_heads = jax.vmap(one_head, in_axes=1, out_axes=1)
    lifted = jax.jit(jax.vmap(over_heads))(q, k, v)
    np.testing.assert_allclose(
        lifted, ja.reference.dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6
    )
