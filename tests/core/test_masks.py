import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn as ja
from jax_attn.masks import build_attention_mask, make_dropout_mask


def _loops_causal(T, S):
    return np.array([[s <= t + S - T for s in range(S)] for t in range(T)])


@pytest.mark.parametrize("T,S", [(5, 5), (3, 7), (7, 3), (1, 4)])
def test_causal_mask_is_bottom_right_aligned(T, S):
    np.testing.assert_array_equal(ja.make_causal_mask(T, S), _loops_causal(T, S))


def test_causal_mask_square_is_lower_triangle():
    np.testing.assert_array_equal(ja.make_causal_mask(6), np.tril(np.ones((6, 6), bool)))


@pytest.mark.parametrize("window", [2, (1, 0), (0, 3), (2, 1)])
@pytest.mark.parametrize("T,S", [(6, 6), (3, 6)])
def test_sliding_window_mask_matches_loops(window, T, S):
    left, right = (window, window) if isinstance(window, int) else window
    want = np.array(
        [[t + S - T - left <= s <= t + S - T + right for s in range(S)] for t in range(T)]
    )
    np.testing.assert_array_equal(ja.make_sliding_window_mask(T, window, S), want)


def test_padding_mask_from_lengths():
    mask = ja.make_padding_mask(jnp.array([2, 0]), jnp.array([3, 1]), 3, 4)
    assert mask.shape == (2, 1, 3, 4)
    want0 = np.zeros((3, 4), bool)
    want0[:2, :3] = True
    np.testing.assert_array_equal(mask[0, 0], want0)
    assert not mask[1].any()
    kv_only = ja.make_padding_mask(None, jnp.array([1]), 2, 3)
    np.testing.assert_array_equal(kv_only[0, 0], [[True, False, False]] * 2)


def test_combine_masks_ands_and_broadcasts():
    a = ja.make_causal_mask(4)
    b = jnp.array([True, True, False, True])
    combined = ja.combine_masks(a, None, b)
    np.testing.assert_array_equal(combined, np.asarray(a) & np.asarray(b))
    assert ja.combine_masks(None, None) is None


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: ja.make_causal_mask(-1), ValueError),
        (lambda: ja.make_causal_mask(2.5), TypeError),
        (lambda: ja.make_sliding_window_mask(4, (1, -1)), ValueError),
        (lambda: ja.make_sliding_window_mask(4, "wide"), TypeError),
        (lambda: ja.make_padding_mask(None, None, 2, 2), ValueError),
        (lambda: ja.combine_masks(jnp.ones((2, 3), bool), jnp.ones((4, 3), bool)), ValueError),
        (lambda: ja.combine_masks(jnp.ones((2, 2))), TypeError),
    ],
)
def test_mask_argument_errors(call, error):
    with pytest.raises(error):
        call()


def test_build_attention_mask_none_when_nothing_masks():
    assert build_attention_mask(3, 3) is None
    assert build_attention_mask(3, 4, is_causal=True).shape == (1, 1, 3, 4)


def test_dropout_mask_blocks_agree_with_whole_and_keep_rate():
    key = jax.random.key(7)
    whole = make_dropout_mask(key, 0.25, (2, 3, 64, 96))
    block = make_dropout_mask(key, 0.25, (1, 3, 16, 32), offsets=(1, 0, 32, 64))
    np.testing.assert_array_equal(block, whole[1:2, :, 32:48, 64:96])
    n = whole.size
    rate = float(whole.mean())
    assert abs(rate - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)
    other = make_dropout_mask(jax.random.key(8), 0.25, (2, 3, 64, 96))
    assert (np.asarray(other) != np.asarray(whole)).mean() > 0.2
