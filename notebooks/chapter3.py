"""Shared by the chapter-3 notebooks: the book's values, and how to compare with them.

Everything the book gives or prints in chapter 3 lives once, in the package data
(``jax_attn/data/book_ch03_values.json``, read by ``jax_attn.data.book_values()``): the
sentence and its inputs, the values printed in sections 3.3 to 3.6, and the weights the book
draws from PyTorch seeds. Sections 3.4.2 to 3.6 print values that depend on ``nn.Linear``
weights (``torch.manual_seed(789)`` for ``SelfAttention_v2``, ``torch.manual_seed(123)`` for
``CausalAttention``, ``MultiHeadAttentionWrapper`` and ``MultiHeadAttention``); the data holds
each section's ``state_dict`` (PyTorch's ``[d_out, d_in]`` layout, exactly as the seeded draws
give them) so that the notebooks run without PyTorch. ``03_modules.ipynb`` draws them again
with PyTorch, when it is installed, and checks they are these.

Where the book prints ``-inf`` (the masked scores of 3.5.1) the data holds ``null``;
:func:`book_array` and :func:`compare` read it back as ``-inf``.
"""

from __future__ import annotations

import io

import numpy as np

from jax_attn.data import book_values

__all__ = [
    "BOOK",
    "BOOK_ATOL",
    "INPUTS",
    "TOKENS",
    "book_array",
    "compare",
    "kernel",
    "show",
    "state_dict",
]

BOOK = book_values()
INPUTS = np.asarray(BOOK["inputs"], np.float32)  # [T=6, D=3]
TOKENS = list(BOOK["tokens"])  # ["Your", "journey", ...]

#: The book prints 4 decimals: a correct value is within half a unit of the last one.
BOOK_ATOL = 5e-5


def book_array(value) -> np.ndarray:
    """A value of the package data as float64; ``null`` (the book's ``-inf``) as ``-inf``."""

    def restore(item):
        if isinstance(item, list):
            return [restore(x) for x in item]
        return -np.inf if item is None else item

    return np.asarray(restore(value), np.float64)


def kernel(torch_weight) -> np.ndarray:
    """An ``nn.Linear.weight [d_out, d_in]`` as a Flax kernel ``[d_in, d_out]``."""
    return np.asarray(torch_weight, np.float32).T


def state_dict(section: str) -> dict[str, np.ndarray]:
    """The ``state_dict()`` of the module the book seeds in ``section`` ("3.4.2", "3.5.3",
    "3.6.1", "3.6.2"), as float32 arrays in PyTorch's layout."""
    return {
        key: np.asarray(value, np.float32) for key, value in BOOK[section]["state_dict"].items()
    }


def compare(label: str, ours, book, atol: float = BOOK_ATOL) -> None:
    """Print ``ours`` (rounded to the book's 4 decimals) beside ``book``; assert they agree.

    ``-inf`` in the book's value (``null`` in the package data) must be ``-inf`` in ours at
    the same place.
    """
    ours = np.asarray(ours, np.float64)
    book = book_array(book)
    if ours.shape != book.shape:
        raise AssertionError(f"{label}: shape {ours.shape}, the book's is {book.shape}")
    finite = np.isfinite(book)
    same = np.array_equal(np.isfinite(ours), finite) and np.all(ours[~finite] == book[~finite])
    diff = float(np.max(np.abs(ours[finite] - book[finite]), initial=0.0))
    ok = same and diff <= atol
    with np.printoptions(precision=4, suppress=True, floatmode="fixed", linewidth=100):
        ours_lines = str(np.round(ours, 4)).splitlines()
        book_lines = str(book).splitlines()
    width = max(len(line) for line in ours_lines)
    print(
        f"{label}: {'agrees with the book' if ok else 'DIFFERS FROM THE BOOK'} "
        f"(max |diff| {diff:.1e})"
    )
    print(f"  {'jax_attn':<{width}}   book")
    for mine, theirs in zip(ours_lines, book_lines, strict=True):
        print(f"  {mine:<{width}}   {theirs}")
    assert ok, f"{label}: max |diff| {diff:.2e} > {atol} (or -inf placement differs)"


def show(fig, dpi: int = 72):
    """A matplotlib figure as a PNG (modest dpi) for the notebook; the figure is closed."""
    from IPython.display import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    try:
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception:  # figures built without pyplot need no closing
        pass
    return Image(data=buffer.getvalue(), format="png")
