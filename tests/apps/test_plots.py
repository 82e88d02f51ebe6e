"""Attention heatmaps: sizes, tick labels, drawn values, the ``jax-attn plot`` command."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from jax_attn import functional, reference  # noqa: E402
from jax_attn.apps import plots  # noqa: E402
from jax_attn.apps.cli import main as cli_main  # noqa: E402
from jax_attn.data import book_values  # noqa: E402

TOKENS = ["Your", "journey", "starts", "with"]


def reference_weights(q, k, **kwargs):
    """Weights ``[B, N, T, S]`` from the reference: attention over one-hot values."""
    B, S, K, _ = k.shape
    # [B, S, K, S]
    one_hot = jnp.broadcast_to(jnp.eye(S, dtype=q.dtype)[None, :, None, :], (B, S, K, S))
    # [B, T, N, S] -> [B, N, T, S]
    return jnp.einsum("BTNS->BNTS", reference.dot_product_attention(q, k, one_hot, **kwargs))


def weights_for(tokens, heads=None, seed=0):
    """Causal softmax weights ``[T, T]`` (or ``[N, T, T]``) of random scores, in numpy:
    the drawing tests only need some weights to compare the drawn image with."""
    T, N = len(tokens), heads or 1
    scores = np.random.default_rng(seed).normal(size=(N, T, T))
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights = (weights / weights.sum(-1, keepdims=True)).astype(np.float32)
    return weights if heads else weights[0]


def tick_texts(labels):
    return [label.get_text() for label in labels]


@pytest.mark.parametrize("figsize", [None, (6.0, 5.0)])
def test_plot_attention_size_ticks_labels_and_values(figsize):
    weights = weights_for(TOKENS)
    fig = plots.plot_attention(weights, TOKENS, title="causal", figsize=figsize)
    ax, colorbar = fig.axes
    if figsize is not None:
        np.testing.assert_allclose(fig.get_size_inches(), figsize)
    else:
        width, height = fig.get_size_inches()
        assert 3.0 < width < 8.0 and 2.5 < height < 7.0
    assert tick_texts(ax.get_xticklabels()) == TOKENS
    assert tick_texts(ax.get_yticklabels()) == TOKENS
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "key token",
        "query token",
        "causal",
    )
    assert colorbar.get_ylabel() == "attention weight"
    np.testing.assert_array_equal(ax.images[0].get_array(), np.asarray(weights))
    assert [t.get_text() for t in ax.texts] == [f"{w:.2f}" for w in np.asarray(weights).ravel()]


def test_plot_attention_cross_attention_and_no_annotation():
    weights = jnp.full((2, 3), 1 / 3)
    fig = plots.plot_attention(weights, ["a", "b"], key_tokens=["x", "y", "z"], annotate=False)
    ax = fig.axes[0]
    assert tick_texts(ax.get_xticklabels()) == ["x", "y", "z"]
    assert tick_texts(ax.get_yticklabels()) == ["a", "b"]
    assert len(ax.texts) == 0


def test_long_sequences_are_not_annotated():
    tokens = [f"t{i}" for i in range(plots.ANNOTATE_UP_TO + 1)]
    fig = plots.plot_attention(weights_for(tokens), tokens)
    assert len(fig.axes[0].texts) == 0


@pytest.mark.parametrize(("heads", "ncols", "grid"), [(4, None, (2, 2)), (3, 3, (1, 3))])
def test_plot_heads_grid(heads, ncols, grid):
    weights = weights_for(TOKENS, heads=heads)
    fig = plots.plot_heads(weights, TOKENS, ncols=ncols, figsize=(8.0, 6.0))
    np.testing.assert_allclose(fig.get_size_inches(), (8.0, 6.0))
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == [f"head {n}" for n in range(heads)]
    for n, ax in enumerate(panels):
        assert tick_texts(ax.get_xticklabels()) == TOKENS
        np.testing.assert_array_equal(ax.images[0].get_array(), np.asarray(weights[n]))
    rows, cols = grid
    assert len(fig.axes) == rows * cols + 1  # the grid and one shared colorbar
    assert panels[0].get_subplotspec().get_geometry()[:2] == grid


def test_panels_share_one_color_scale():
    causal = jnp.asarray(weights_for(TOKENS))
    dropped = functional.dropout(causal, 0.5, jax.random.key(0))
    fig = plots.plot_dropout(causal, dropped, TOKENS, 0.5)
    limits = {ax.images[0].get_clim() for ax in fig.axes if ax.images}
    assert limits == {(0.0, float(np.max(dropped)))}


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: plots.plot_attention(jnp.ones((3, 3)), ["a", "b"]), "tokens must have 3"),
        (lambda: plots.plot_attention(jnp.ones((2, 3, 3)), ["a"] * 3), r"\[T, S\]"),
        (lambda: plots.plot_heads(jnp.ones((3, 3)), ["a"] * 3), r"\[N, T, S\]"),
        (lambda: plots.plot_panels({}, ["a"]), "at least one"),
        (lambda: plots.plot_heads(jnp.ones((2, 3, 3)), ["a"] * 3, ncols=0), "ncols"),
    ],
)
def test_bad_arguments_name_what_was_expected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_embedding_is_fixed_per_word():
    first = plots.embed_tokens(["one", "step", "one"], dim=8, seed=3)
    again = plots.embed_tokens(["step"], dim=8, seed=3)
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_array_equal(first[1], again[0])
    assert not np.allclose(first[0], first[1])


def test_sentence_figures_for_the_book_sentence_show_the_books_weights():
    figures = plots.sentence_figures(num_heads=2)
    assert sorted(figures) == ["causal_vs_full", "dropout", "heads", "masks", "simplified"]
    x = jnp.asarray(book_values()["inputs"], jnp.float32)[None, :, None, :]
    expected = reference_weights(x, x, scale=1.0)[0, 0]
    drawn = figures["simplified"].axes[0].images[0].get_array()
    np.testing.assert_allclose(drawn, expected, rtol=1e-5, atol=1e-6)
    heads = [ax for ax in figures["heads"].axes if ax.images]
    assert len(heads) == 2
    for fig in figures.values():
        for ax in (ax for ax in fig.axes if ax.images):
            assert tick_texts(ax.get_xticklabels()) == book_values()["tokens"]


def test_sentence_weights_are_what_the_modules_sow():
    from jax_attn import linen_modules as linen

    # [T, d_in] = [6, 3]; the static arguments sentence_figures(num_heads=2) uses (cached)
    x, key = jnp.asarray(book_values()["inputs"], jnp.float32), jax.random.key(0)
    w = plots._sentence_weights(
        x, key, d_out=2, width=4, num_heads=2, dropout_rate=0.5, window=2, padded_length=4
    )
    # the book's step-by-step weights on SelfAttentionV1's projections
    params = linen.SelfAttentionV1(3, 2).init(key, x)["params"]
    scores = functional.scaled_attention_scores(x @ params["W_query"], x @ params["W_key"])
    close = {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(w["full"], functional.attention_weights(scores), **close)
    np.testing.assert_allclose(w["causal"], functional.causal_weights_by_masking(scores), **close)
    # [N, T, S]: what MultiHeadAttention sows
    mha = linen.MultiHeadAttention(3, 4, 6, 0.0, 2)
    variables = mha.init(key, x, deterministic=True)
    _, state = mha.apply(variables, x, sow_weights=True, mutable=["intermediates"])
    (sown,) = state["intermediates"]["attention_weights"]
    np.testing.assert_allclose(w["heads"], sown[0], **close)


@pytest.mark.slow
def test_cli_writes_pngs(tmp_path):
    code = cli_main(["plot", "the cat sat", "--out", str(tmp_path), "--heads", "2", "--dim", "8"])
    assert code == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [
        "causal_vs_full.png",
        "dropout.png",
        "heads.png",
        "masks.png",
        "simplified.png",
    ]
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in written)


@pytest.mark.parametrize(
    "argv", [["", "--out", "x"], ["a b", "--heads", "0"], ["a", "--dropout", "1"]]
)
def test_cli_rejects_bad_arguments(argv, tmp_path, capsys):
    assert plots.main(argv) == 2
    assert "jax-attn plot:" in capsys.readouterr().err
