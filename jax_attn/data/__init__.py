"""Package data: the values the book prints in chapter 3, kept once and read everywhere."""

import functools
import json
from importlib import resources


@functools.cache
def book_values() -> dict:
    """The book's chapter-3 inputs and printed values (``book_ch03_values.json``)."""
    text = resources.files(__package__).joinpath("book_ch03_values.json").read_text()
    return json.loads(text)
