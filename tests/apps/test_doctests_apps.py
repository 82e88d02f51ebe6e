"""The examples of ``jax_attn.apps.plots`` and of the docs pages that draw with it run and
print what they show (the library's own: ``tests/core/test_doctests.py``)."""

import pytest
from doc_examples import check_module_examples, check_page_examples

pytest.importorskip("matplotlib")


def test_plots_docstring_examples():
    check_module_examples("jax_attn.apps.plots")


@pytest.mark.parametrize("page", ["functional.md", "plots.md"])
def test_docs_page_examples(page):
    check_page_examples(page)
