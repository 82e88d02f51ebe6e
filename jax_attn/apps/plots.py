"""Attention weights as heatmaps, tokens on both axes (``jax-attn plot``).

Every function returns a ``matplotlib.figure.Figure`` built without ``pyplot``, so it
works headless, in scripts and in notebooks (a returned figure displays inline); save it
with ``fig.savefig(path)``. matplotlib is imported only when a function draws
(``pip install "jax_attn[apps]"``).

>>> import jax.numpy as jnp
>>> from jax_attn.functional import causal_weights_by_masking
>>> tokens = ["Your", "journey", "starts"]
>>> fig = plot_attention(causal_weights_by_masking(jnp.zeros((3, 3))), tokens)
>>> [label.get_text() for label in fig.axes[0].get_xticklabels()]
['Your', 'journey', 'starts']

On the command line, ``jax-attn plot "Your journey starts with one step" --out DIR``
writes the figures of :func:`sentence_figures` as PNG files, and ``jax-attn plot --all``
regenerates the figures committed under ``docs/figures``; ``jax-attn plot --mask-fn
window:4 --mask-fn document:3 --length 12`` draws mask functions of the gallery instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn import functional, masks
from jax_attn.apps import mask_gallery
from jax_attn.apps.extras import require
from jax_attn.data import book_values
from jax_attn.mask_functions import evaluate_mask

if TYPE_CHECKING:
    from jax.typing import ArrayLike
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from jax_attn.shapes import Array, Float

__all__ = [
    "BOOK_SENTENCE",
    "BOOK_INPUTS",
    "plot_attention",
    "plot_heads",
    "plot_panels",
    "plot_causal_vs_full",
    "plot_dropout",
    "plot_masks",
    "plot_mask_fns",
    "tokenize",
    "embed_tokens",
    "sentence_figures",
    "save_figures",
    "main",
]

BOOK_SENTENCE = book_values()["sentence"]
# The book's 3-dimensional embeddings of BOOK_SENTENCE (section 3.3, the ``inputs`` tensor).
BOOK_INPUTS = tuple(tuple(row) for row in book_values()["inputs"])
ANNOTATE_UP_TO = 12  # annotate cell values when T and S are at most this
FIGURES_DIR = Path(__file__).resolve().parents[2] / "docs" / "figures"


def _as_matrix(name: str, weights, ndim: int) -> np.ndarray:
    array = np.asarray(weights, dtype=np.float32)
    if array.ndim != ndim:
        want = "[T, S]" if ndim == 2 else "[N, T, S]"
        raise ValueError(f"{name} must have shape {want}, got {list(array.shape)}")
    return array


def _check_tokens(name: str, tokens, size: int, axis: str) -> list[str]:
    tokens = [str(t) for t in tokens]
    if len(tokens) != size:
        raise ValueError(
            f"{name} must have {size} entries (the weights' {axis}), got {len(tokens)}"
        )
    return tokens


def _top(weights: np.ndarray) -> float:
    """The default top of the color scale: the largest value (1 when all are <= 0)."""
    top = float(np.nanmax(weights)) if weights.size else 0.0
    return top if top > 0.0 else 1.0


def _new_figure(width: float, height: float) -> Figure:
    return require("matplotlib.figure").Figure(figsize=(width, height), layout="constrained")


def _cell_size(T: int, S: int) -> float:
    """Inches per heatmap cell: roomy for a sentence, compact for long sequences."""
    return 0.62 if max(T, S) <= ANNOTATE_UP_TO else max(0.12, 7.0 / max(T, S))


@dataclasses.dataclass(frozen=True)
class _Style:
    """How a figure colors its heatmaps: ``cmap`` from ``vmin`` to ``vmax``; cell values
    written when ``annotate`` (``None``: when ``T, S <= ANNOTATE_UP_TO``)."""

    vmin: float
    vmax: float
    cmap: str
    annotate: bool | None


def _draw(
    ax: Axes,
    weights: np.ndarray,
    query_tokens: list[str],
    key_tokens: list[str],
    style: _Style,
    *,
    title: str | None,
    labels: bool = True,
):
    """One heatmap on ``ax``: rows are queries, columns keys; returns the image."""
    T, S = weights.shape
    vmin, vmax = style.vmin, style.vmax
    image = ax.imshow(weights, cmap=style.cmap, vmin=vmin, vmax=vmax, aspect="equal")
    long = max(T, S) > 2 * ANNOTATE_UP_TO
    fontsize = max(4.0, 240.0 / max(T, S)) if long else None
    ax.set_xticks(
        range(S),
        labels=key_tokens,
        rotation=90 if long else 45,
        ha="center" if long else "right",
        rotation_mode="anchor" if not long else "default",
        fontsize=fontsize,
    )
    ax.set_yticks(range(T), labels=query_tokens, fontsize=fontsize)
    if labels:
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
    if title:
        ax.set_title(title)
    annotate = max(T, S) <= ANNOTATE_UP_TO if style.annotate is None else style.annotate
    if annotate:
        threshold = vmin + 0.6 * (vmax - vmin)
        for t in range(T):
            for s in range(S):
                value = weights[t, s]
                color = "white" if value > threshold else "black"
                ax.text(s, t, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)
    return image


def plot_attention(
    weights: Float[ArrayLike, "T S"],
    tokens: Sequence[str],
    *,
    key_tokens: Sequence[str] | None = None,
    title: str | None = "Attention weights",
    annotate: bool | None = None,
    vmin: float = 0.0,
    vmax: float | None = None,
    cmap: str = "Blues",
    colorbar_label: str = "attention weight",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """One head's weights ``[T, S]`` as a heatmap: query tokens down, key tokens across.

    ``key_tokens`` defaults to ``tokens`` (self-attention). Cell values are written in
    the cells when ``T, S <= 12`` (``annotate`` forces it on or off). The color scale
    runs from ``vmin`` to ``vmax`` (default: the largest weight).
    """
    matrix = _as_matrix("weights", weights, 2)
    T, S = matrix.shape
    query_tokens = _check_tokens("tokens", tokens, T, "T")
    key_tokens = _check_tokens("key_tokens", tokens if key_tokens is None else key_tokens, S, "S")
    vmax = _top(matrix) if vmax is None else vmax
    style = _Style(vmin, vmax, cmap, annotate)
    cell = _cell_size(T, S)
    fig = _new_figure(*(figsize or (S * cell + 2.6, T * cell + 1.6)))
    ax = fig.add_subplot()
    image = _draw(ax, matrix, query_tokens, key_tokens, style, title=title)
    fig.colorbar(image, ax=ax, label=colorbar_label, shrink=0.9)
    return fig


def plot_panels(
    panels: Mapping[str, Float[ArrayLike, "T S"]],
    tokens: Sequence[str],
    *,
    title: str | None = None,
    ncols: int | None = None,
    annotate: bool | None = None,
    vmin: float = 0.0,
    vmax: float | None = None,
    cmap: str = "Blues",
    colorbar_label: str = "attention weight",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Several ``[T, S]`` heatmaps side by side, one shared color scale and colorbar.

    ``panels`` maps a subplot title to its weights; all share ``tokens``. ``vmax``
    defaults to the largest weight of all panels.
    """
    if not panels:
        raise ValueError("panels must hold at least one titled [T, S] array, got none")
    arrays = {name: _as_matrix(f"panels[{name!r}]", w, 2) for name, w in panels.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"panels must share one shape [T, S], got {sorted(shapes)}")
    T, S = shapes.pop()
    query_tokens = _check_tokens("tokens", tokens, T, "T")
    key_tokens = _check_tokens("tokens", tokens, S, "S")
    vmax = max(_top(a) for a in arrays.values()) if vmax is None else vmax
    style = _Style(vmin, vmax, cmap, annotate)
    count = len(arrays)
    ncols = math.ceil(math.sqrt(count)) if ncols is None else ncols
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols <= 0:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    nrows = math.ceil(count / ncols)
    cell = _cell_size(T, S)
    width = ncols * (S * cell + 1.4) + 1.4
    height = nrows * (T * cell + 1.5) + (0.5 if title else 0.0)
    fig = _new_figure(*(figsize or (width, height)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= count:
            ax.set_axis_off()
            continue
        name = list(arrays)[index]
        row, col = divmod(index, ncols)
        image = _draw(ax, arrays[name], query_tokens, key_tokens, style, title=name, labels=False)
        if row == nrows - 1 or index + ncols >= count:
            ax.set_xlabel("key token")
        if col == 0:
            ax.set_ylabel("query token")
    assert image is not None  # panels is not empty
    fig.colorbar(image, ax=axes, label=colorbar_label, shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def plot_heads(
    weights: Float[ArrayLike, "N T S"],
    tokens: Sequence[str],
    *,
    title: str | None = "Attention weights per head",
    ncols: int | None = None,
    annotate: bool | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Every head of ``weights [N, T, S]`` in a grid (``head 0`` ... ``head N-1``)."""
    heads = _as_matrix("weights", weights, 3)
    panels = {f"head {n}": w for n, w in enumerate(heads)}
    return plot_panels(panels, tokens, title=title, ncols=ncols, annotate=annotate, figsize=figsize)


def plot_causal_vs_full(
    full: Float[Array, "T S"],
    causal: Float[Array, "T S"],
    tokens: Sequence[str],
    *,
    title: str | None = "Full vs causal self-attention",
    annotate: bool | None = None,
) -> Figure:
    """The same scores without and with the causal mask, side by side."""
    return plot_panels(
        {"full: every token sees every token": full, "causal: no token sees a later one": causal},
        tokens,
        title=title,
        annotate=annotate,
    )


def plot_dropout(
    weights: Float[Array, "T S"],
    dropped: Float[Array, "T S"],
    tokens: Sequence[str],
    rate: float,
    *,
    title: str | None = None,
    annotate: bool | None = None,
) -> Figure:
    """Causal weights before and after dropout: kept weights scaled by ``1/(1-rate)``."""
    title = f"Dropout on the attention weights (rate {rate:g})" if title is None else title
    return plot_panels(
        {
            "without dropout": weights,
            f"with dropout: zeroed or x{1.0 / (1.0 - rate):g}": dropped,
        },
        tokens,
        title=title,
        annotate=annotate,
    )


def plot_masks(
    panels: Mapping[str, Float[ArrayLike, "T S"]],
    tokens: Sequence[str],
    *,
    title: str | None = "Attention masks (1 = may attend)",
) -> Figure:
    """Boolean masks ``[T, S]`` side by side as 0/1 heatmaps."""
    as_float = {name: np.asarray(m, np.float32) for name, m in panels.items()}
    return plot_panels(
        as_float,
        tokens,
        title=title,
        vmin=0.0,
        vmax=1.0,
        cmap="Greys",
        colorbar_label="may attend",
        annotate=False,
    )


def plot_mask_fns(
    panels: Mapping[str, Callable],
    T: int,
    *,
    b: int = 0,
    h: int = 0,
    title: str | None = "Masks as functions (1 = may attend)",
) -> Figure:
    """``mask_fn(b, h, q_idx, kv_idx) -> bool`` functions drawn as their ``[T, T]`` masks
    for batch ``b`` and query head ``h`` (see docs/masks.md)."""
    q_idx = kv_idx = jnp.arange(T, dtype=jnp.int32)
    drawn = {
        name: np.asarray(evaluate_mask(fn, b + 1, h + 1, q_idx, kv_idx, dims=(True, True)))[b, h]
        for name, fn in panels.items()
    }
    return plot_masks(drawn, [str(t) for t in range(T)], title=title)


# --- a sentence's attention -----------------------------------------------------------------


def tokenize(sentence: str) -> list[str]:
    """Whitespace tokens of ``sentence`` (what the book's figures show)."""
    tokens = sentence.split()
    if not tokens:
        raise ValueError(f"sentence must hold at least one word, got {sentence!r}")
    return tokens


def embed_tokens(tokens: Sequence[str], dim: int = 16, seed: int = 0) -> Float[Array, "T D"]:
    """A fixed random embedding ``[T, dim]``: each word's vector depends only on the word
    (lower-cased), ``dim`` and ``seed``, so the same word gets the same vector in every
    sentence. Rows are standard normal scaled by ``1/sqrt(dim)`` (unit-ish length)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    word_ids = np.asarray([zlib.crc32(t.lower().encode()) for t in tokens], np.uint32)
    return _embed(jax.random.key(seed), jnp.asarray(word_ids), dim)


@functools.partial(jax.jit, static_argnames="dim")
def _embed(root, word_ids, dim: int):
    def one(word_id):
        return jax.random.normal(jax.random.fold_in(root, word_id), (dim,))

    return jax.vmap(one)(word_ids) * dim**-0.5


def _sentence_inputs(tokens: list[str], dim: int, seed: int) -> tuple[jax.Array, str]:
    if [t.lower() for t in tokens] == [t.lower() for t in tokenize(BOOK_SENTENCE)]:
        return jnp.asarray(BOOK_INPUTS, jnp.float32), "the book's 3-d embeddings"
    return embed_tokens(tokens, dim, seed), f"fixed random {dim}-d embeddings, seed {seed}"


def sentence_figures(
    sentence: str = BOOK_SENTENCE,
    *,
    num_heads: int = 4,
    dropout_rate: float = 0.5,
    dim: int = 16,
    seed: int = 0,
) -> dict[str, Figure]:
    """The chapter's attention figures for ``sentence``, by file stem.

    Inputs are the book's embeddings for the book's sentence, else :func:`embed_tokens`.
    Projections come from freshly initialised :mod:`jax_attn.linen_modules` modules (key
    ``seed``), so the patterns show the mechanics, not anything learned:

    * ``simplified``: section 3.3, ``softmax(x x^T)`` with no trainable weights;
    * ``causal_vs_full``: section 3.5, the scaled scores of a ``SelfAttentionV1``
      (uniform ``[0, 1)`` weights as in the book) without and with the causal mask;
    * ``dropout``: section 3.5.2, the causal weights and what dropout keeps;
    * ``heads``: section 3.6, every head of a ``MultiHeadAttention``;
    * ``masks``: causal, sliding window and padding masks for the same tokens.
    """
    tokens = tokenize(sentence)
    x, source = _sentence_inputs(tokens, dim, seed)
    T, d_in = x.shape
    d_out = 2 if d_in < 8 else d_in
    width = num_heads * max(2, math.ceil(d_in / num_heads))
    window = max(1, T // 3)
    padded_length = max(1, T - 2)
    w = _sentence_weights(
        x,
        jax.random.key(seed),
        d_out=d_out,
        width=width,
        num_heads=num_heads,
        dropout_rate=float(dropout_rate),
        window=window,
        padded_length=padded_length,
    )
    return {
        "simplified": plot_attention(
            w["simplified"], tokens, title=f"Simplified self-attention, softmax(x xᵀ)\n({source})"
        ),
        "causal_vs_full": plot_causal_vs_full(
            w["full"],
            w["causal"],
            tokens,
            title=f"SelfAttentionV1 (untrained, d_out={d_out}): full vs causal weights",
        ),
        "dropout": plot_dropout(w["causal"], w["dropped"], tokens, dropout_rate),
        "heads": plot_heads(
            w["heads"],
            tokens,
            title=f"MultiHeadAttention (untrained): {num_heads} causal heads, "
            f"head dim {width // num_heads}",
        ),
        "masks": plot_masks(
            {
                "causal": w["causal_mask"],
                f"causal window of {window + 1}": w["window_mask"],
                f"padding: {padded_length} real tokens": w["padding_mask"],
            },
            tokens,
        ),
    }


@functools.partial(
    jax.jit,
    static_argnames=("d_out", "width", "num_heads", "dropout_rate", "window", "padded_length"),
)
def _sentence_weights(
    x, key, *, d_out, width, num_heads, dropout_rate, window, padded_length
) -> dict[str, jax.Array]:
    """Every array :func:`sentence_figures` draws, in one compiled function."""
    from jax_attn import linen_modules as linen

    T, d_in = x.shape
    simplified = functional.attention_weights(functional.attention_scores(x, x))

    # The modules' own weights, sown with sow_weights=True (nothing re-projected here)
    full_v1 = linen.SelfAttentionV1(d_in, d_out)
    variables = full_v1.init(key, x)
    # [T, S]: the same projections without and with the causal mask
    full = _sown_weights(full_v1, variables, x)[0]
    causal = _sown_weights(linen.SelfAttentionV1(d_in, d_out, is_causal=True), variables, x)[0]
    dropped = functional.dropout(causal, dropout_rate, jax.random.fold_in(key, 1))

    mha = linen.MultiHeadAttention(d_in, width, T, 0.0, num_heads)
    # [N, T, S]
    heads = _sown_weights(mha, mha.init(key, x, deterministic=True), x)

    lengths = jnp.asarray([padded_length])
    return {
        "simplified": simplified,
        "full": full,
        "causal": causal,
        "dropped": dropped,
        "heads": heads,
        "causal_mask": masks.make_causal_mask(T),
        "window_mask": masks.make_causal_mask(T) & masks.make_sliding_window_mask(T, (window, 0)),
        "padding_mask": masks.make_padding_mask(lengths, lengths, T, T)[0, 0],
    }


def _sown_weights(module, variables, x) -> jax.Array:
    """The attention weights ``module`` sows on ``x [T, d_in]``: ``[N, T, S]``."""
    _, state = module.apply(
        variables, x, deterministic=True, sow_weights=True, mutable=["intermediates"]
    )
    # [1, N, T, S]
    (weights,) = state["intermediates"]["attention_weights"]
    return weights[0]


def save_figures(figures: Mapping[str, Figure], out_dir, dpi: int = 110) -> list[Path]:
    """Writes ``out_dir/<name>.png`` for each figure; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def _mask_fn_help(name: str, spec: tuple) -> str:
    """``document[:N]`` (N: packed documents, causal in each; default 3)."""
    _, default, meaning = spec
    return name if default is None else f"{name}[:N] (N: {meaning}; default {default})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-attn plot",
        description="Attention heatmaps for a sentence: simplified, full vs causal, dropout, "
        "every head of a MultiHeadAttention, and the masks.",
    )
    parser.add_argument(
        "sentence",
        nargs="?",
        default=BOOK_SENTENCE,
        help="words to attend over (default: %(default)r)",
    )
    parser.add_argument(
        "--out", default="attention_plots", help="output folder for the PNGs (default %(default)s)"
    )
    parser.add_argument(
        "--heads", type=int, default=4, help="MultiHeadAttention heads (default %(default)s)"
    )
    parser.add_argument(
        "--dropout", type=float, default=0.5, help="dropout rate to show (default %(default)s)"
    )
    parser.add_argument(
        "--dim", type=int, default=16, help="random embedding width (default %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="embedding and weight seed (default %(default)s)"
    )
    parser.add_argument(
        "--mask-fn",
        action="append",
        metavar="NAME[:N]",
        help="draw this mask function instead, writes mask_fns.png (repeatable; docs/masks.md): "
        + "; ".join(_mask_fn_help(name, spec) for name, spec in mask_gallery.MASK_FNS.items()),
    )
    parser.add_argument(
        "--length", type=int, default=12, help="tokens for --mask-fn (default %(default)s)"
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="the documentation figures instead, into --out (the other options ignored); "
        "to regenerate a checkout's, pass --out docs/figures",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``jax-attn plot [SENTENCE] [--out DIR] ...``: writes the PNGs and lists them."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.all:
        paths = save_figures(sentence_figures(), args.out)
    elif args.mask_fn:
        if args.length <= 0:
            print(f"jax-attn plot: --length must be > 0, got {args.length}", file=sys.stderr)
            return 2
        try:
            panels = {spec: mask_gallery.mask_fn(spec, args.length) for spec in args.mask_fn}
        except ValueError as error:
            print(f"jax-attn plot: --mask-fn: {error}", file=sys.stderr)
            return 2
        paths = save_figures({"mask_fns": plot_mask_fns(panels, args.length)}, args.out)
    else:
        if args.heads <= 0:
            print(f"jax-attn plot: --heads must be > 0, got {args.heads}", file=sys.stderr)
            return 2
        if not 0.0 <= args.dropout < 1.0:
            print(
                f"jax-attn plot: --dropout must be in [0, 1), got {args.dropout}", file=sys.stderr
            )
            return 2
        try:
            figures = sentence_figures(
                args.sentence,
                num_heads=args.heads,
                dropout_rate=args.dropout,
                dim=args.dim,
                seed=args.seed,
            )
        except ValueError as error:
            print(f"jax-attn plot: {error}", file=sys.stderr)
            return 2
        paths = save_figures(figures, args.out)
    for path in paths:
        print(path)
    return 0
