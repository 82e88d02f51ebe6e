"""Package data: the values the book prints in chapter 3, kept once and read everywhere."""

import functools
import json
from importlib import resources


@functools.cache
def book_values() -> dict:
    """The book's chapter-3 inputs, printed values and seeded weights (``book_ch03_values.json``).

    One entry per section (``"3.3.1"`` ... ``"3.6.2"``), plus ``"shapes"`` and
    ``"exercise_3.3"``; each section's ``"note"`` says what the book prints there. ``null``
    stands for the book's ``-inf`` (the masked scores of 3.5.1). Cached: do not modify.
    """
    text = resources.files(__package__).joinpath("book_ch03_values.json").read_text()
    return json.loads(text)
