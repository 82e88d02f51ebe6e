"""``plot_mask_fns`` draws each mask_fn as its [T, T] 0/1 mask."""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from jax_attn.apps.plots import plot_mask_fns  # noqa: E402


def test_plot_mask_fns_draws_each_function():
    segment_ids = jnp.array([[0, 0, 1, 1, 1]], jnp.int32)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def document(b, h, q_idx, kv_idx):
        return (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (q_idx >= kv_idx)

    fig = plot_mask_fns({"causal": causal, "document": document}, 5)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    np.testing.assert_array_equal(images[0], np.tril(np.ones((5, 5))))
    expected = np.tril(np.ones((5, 5)))
    expected[2:, :2] = 0
    np.testing.assert_array_equal(images[1], expected)
