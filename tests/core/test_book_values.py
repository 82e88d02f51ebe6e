"""The book's printed values (chapter 3, 4 decimals) reproduced through the public API.

``book_ch03_values.json`` is a copy of what the book's notebook prints; every value
follows from the literal inputs (and, in 3.4.1, from the listed weight matrices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn as ja
from jax_attn import functional as F
from jax_attn.data import book_values

BOOK = book_values()
INPUTS = jnp.asarray(BOOK["inputs"], jnp.float32)
ATOL = 5e-5  # printed with 4 decimals
W_341 = {
    name: jnp.asarray(BOOK["3.4.1"][name], jnp.float32) for name in ("W_query", "W_key", "W_value")
}


def assert_book(ours, printed):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(printed), rtol=0, atol=ATOL)


# --- 3.3.1 ---------------------------------------------------------------------------------


def _query_2():
    return INPUTS[BOOK["3.3.1"]["query_index"]]


def test_3_3_1_scores_of_query_2():
    assert_book(F.attention_scores_for_query(_query_2(), INPUTS), BOOK["3.3.1"]["attn_scores_2"])


@pytest.mark.parametrize(
    "normalize, printed",
    [
        (F.normalize_by_sum, "attn_weights_2_sum_normalized"),
        (F.naive_softmax, "attn_weights_2_softmax"),
        (F.softmax, "attn_weights_2_softmax"),
    ],
)
def test_3_3_1_weights_of_query_2(normalize, printed):
    weights = normalize(F.attention_scores_for_query(_query_2(), INPUTS))
    assert_book(weights, BOOK["3.3.1"][printed])
    np.testing.assert_allclose(float(weights.sum()), 1.0, atol=1e-6)


def test_3_3_1_context_vector_2():
    weights = F.softmax(F.attention_scores_for_query(_query_2(), INPUTS))
    assert_book(F.context_vector(weights, INPUTS), BOOK["3.3.1"]["context_vec_2"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_naive_softmax_overflows_where_the_stable_one_does_not(dtype):
    logits = jnp.asarray([1000.0, 0.0, -5.0], dtype)
    naive = np.asarray(F.naive_softmax(logits), np.float32)
    stable = np.asarray(F.softmax(logits), np.float32)
    assert np.isnan(naive[0])
    assert np.isfinite(stable).all()
    np.testing.assert_allclose(
        stable, np.asarray(jax.nn.softmax(logits.astype(jnp.float32))), atol=1e-6
    )


def test_naive_and_stable_softmax_agree_on_small_logits():
    scores = F.attention_scores(INPUTS, INPUTS)
    np.testing.assert_allclose(F.naive_softmax(scores), F.softmax(scores), atol=1e-6)


# --- 3.3.2 ---------------------------------------------------------------------------------


def test_3_3_2_all_scores_weights_and_context_vectors():
    scores = F.attention_scores(INPUTS, INPUTS)
    weights = F.attention_weights(scores)
    contexts = F.context_vectors(weights, INPUTS)
    assert_book(scores, BOOK["3.3.2"]["attn_scores"])
    assert_book(weights, BOOK["3.3.2"]["attn_weights"])
    assert_book(contexts, BOOK["3.3.2"]["all_context_vecs"])
    assert_book(F.simplified_self_attention(INPUTS), BOOK["3.3.2"]["all_context_vecs"])


def test_3_3_2_row_2_is_3_3_1():
    np.testing.assert_allclose(
        BOOK["3.3.2"]["attn_weights"][1], BOOK["3.3.1"]["attn_weights_2_softmax"]
    )
    np.testing.assert_allclose(BOOK["3.3.2"]["all_context_vecs"][1], BOOK["3.3.1"]["context_vec_2"])


# --- 3.4.1 ---------------------------------------------------------------------------------


def test_3_4_1_step_by_step_with_the_given_weights():
    book = BOOK["3.4.1"]
    query_2 = F.dense(_query_2(), W_341["W_query"])
    keys = F.dense(INPUTS, W_341["W_key"])
    values = F.dense(INPUTS, W_341["W_value"])
    scores_2 = F.attention_scores_for_query(query_2, keys)
    weights_2 = F.softmax(scores_2 / keys.shape[-1] ** 0.5)
    assert_book(query_2, book["query_2"])
    assert_book(scores_2[1], book["attn_score_22"])
    assert_book(scores_2, book["attn_scores_2"])
    assert_book(weights_2, book["attn_weights_2"])
    assert_book(F.context_vector(weights_2, values), book["context_vec_2"])


def test_3_4_1_scaled_scores_match_the_step_by_step_ones():
    queries = F.dense(INPUTS, W_341["W_query"])
    keys = F.dense(INPUTS, W_341["W_key"])
    weights = F.attention_weights(F.scaled_attention_scores(queries, keys))
    assert_book(weights[1], BOOK["3.4.1"]["attn_weights_2"])


def test_3_4_1_functional_self_attention():
    assert_book(F.self_attention(INPUTS, W_341), BOOK["3.4.1"]["self_attention_v1_output"])


@pytest.mark.parametrize("batched", [False, True])
def test_3_4_1_self_attention_v1_module_with_the_given_weights(batched):
    module = ja.SelfAttentionV1(d_in=3, d_out=2)
    shapes = jax.eval_shape(module.init, jax.random.key(0), INPUTS)["params"]
    assert {name: tuple(s.shape) for name, s in shapes.items()} == {
        name: w.shape for name, w in W_341.items()
    }
    x = jnp.stack([INPUTS, INPUTS]) if batched else INPUTS
    out = module.apply({"params": W_341}, x)
    expected = np.asarray(BOOK["3.4.1"]["self_attention_v1_output"])
    assert_book(out, np.stack([expected, expected]) if batched else expected)


# --- 3.5 -----------------------------------------------------------------------------------


def test_3_5_1_causal_mask_is_the_books_tril():
    np.testing.assert_array_equal(
        np.asarray(ja.make_causal_mask(6), np.int32), BOOK["3.5.1"]["mask_simple_tril"]
    )


def _book_scores():
    queries = F.dense(INPUTS, W_341["W_query"])
    keys = F.dense(INPUTS, W_341["W_key"])
    return F.scaled_attention_scores(queries, keys)


@pytest.mark.parametrize("scores", ["book", "random"])
def test_3_5_1_both_causal_ways_agree(scores):
    if scores == "book":
        scores = _book_scores()
    else:
        scores = np.random.default_rng(1).standard_normal((2, 3, 7, 7))
        scores = jnp.asarray(3.0 * scores, jnp.float32)
    by_renormalizing = jax.jit(F.causal_weights_by_renormalizing)(scores)
    by_masking = jax.jit(F.causal_weights_by_masking)(scores)
    np.testing.assert_allclose(by_renormalizing, by_masking, atol=1e-6)
    T = scores.shape[-1]
    assert not np.asarray(by_masking)[..., ~np.asarray(ja.make_causal_mask(T))].any()
    np.testing.assert_allclose(by_masking.sum(-1), 1.0, atol=1e-6)


def test_3_5_1_causal_weights_equal_the_reference_weights():
    scores = _book_scores()
    # [1, 1, T, S] from the library's batched path with the same logits as q . k
    queries = F.dense(INPUTS, W_341["W_query"])[None, :, None, :]
    keys = F.dense(INPUTS, W_341["W_key"])[None, :, None, :]
    weights = ja.dot_product_attention_weights(queries, keys, is_causal=True)
    np.testing.assert_allclose(weights[0, 0], F.causal_weights_by_masking(scores), atol=1e-6)


def test_3_5_2_dropout_example_keeps_values_scaled_to_two():
    dropped = np.asarray(F.dropout(jnp.ones((6, 6)), 0.5, jax.random.key(123)))
    assert set(np.unique(dropped).tolist()) == {0.0, 2.0}
    again = np.asarray(F.dropout(jnp.ones((6, 6)), 0.5, jax.random.key(123)))
    np.testing.assert_array_equal(dropped, again)


# --- exercise 3.3 ----------------------------------------------------------------------------


def _parameter_count(module, d_in):
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1, d_in)))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def test_exercise_3_3_parameter_count():
    ex = BOOK["exercise_3.3"]
    module = ja.MultiHeadAttention(
        ex["d_in"], ex["d_out"], ex["context_length"], 0.0, ex["num_heads"], qkv_bias=ex["qkv_bias"]
    )
    assert _parameter_count(module, ex["d_in"]) == ex["parameter_count"] == 2_360_064
