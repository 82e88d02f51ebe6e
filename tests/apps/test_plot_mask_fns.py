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


def test_gallery_functions_equal_their_explicit_masks():
    from jax_attn.apps import mask_gallery
    from jax_attn.mask_functions import evaluate_mask

    T = 7
    q_idx, kv_idx = np.arange(T)[:, None], np.arange(T)[None, :]
    ids = mask_gallery.segment_ids(T, 3)
    np.testing.assert_array_equal(ids, [0, 0, 0, 1, 1, 2, 2])
    expected = {
        "causal": q_idx >= kv_idx,
        "window:3": (q_idx >= kv_idx) & (q_idx - kv_idx < 3),
        "document:3": (ids[:, None] == ids[None, :]) & (q_idx >= kv_idx),
        "prefix_lm:2": (kv_idx < 2) | (q_idx >= kv_idx),
    }
    index = jnp.arange(T, dtype=jnp.int32)
    for spec, mask in expected.items():
        drawn = evaluate_mask(mask_gallery.mask_fn(spec, T), 1, 1, index, index)
        np.testing.assert_array_equal(np.asarray(drawn)[0, 0], mask, err_msg=spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("diagonal", "mask_fn must be one of"),
        ("causal:2", "takes no argument"),
        ("window:0", "needs N >= 1"),
    ],
)
def test_gallery_rejects_unknown_names_and_arguments(spec, message):
    from jax_attn.apps import mask_gallery

    with pytest.raises(ValueError, match=message):
        mask_gallery.mask_fn(spec, 8)


def test_plot_command_draws_mask_fns(tmp_path, capsys):
    from jax_attn.apps import plots

    code = plots.main(
        [
            "--mask-fn",
            "window:3",
            "--mask-fn",
            "document:2",
            "--length",
            "6",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "mask_fns.png")]
    assert (tmp_path / "mask_fns.png").stat().st_size > 0
    assert plots.main(["--mask-fn", "stripes", "--out", str(tmp_path)]) == 2
    assert "--mask-fn: mask_fn must be one of" in capsys.readouterr().err
