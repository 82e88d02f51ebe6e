"""The examples in the docstrings and docs pages of the library run and print what they show.

Only modules whose API is stable are listed; add a module here once its examples are
final. A module that does not exist (yet) fails with a clear message rather than
silently. The apps' examples (and pages that draw with them) are in
``tests/apps/test_doctests_apps.py``.
"""

import pkgutil

import pytest
from doc_examples import check_module_examples, check_page_examples

import jax_attn

DOCTESTED = (
    "jax_attn",
    "jax_attn.masks",
    "jax_attn.functional",
    "jax_attn.dispatch",
    "jax_attn.reference",
    "jax_attn.linen_modules",
    "jax_attn.nnx_modules",
    "jax_attn.shapes",
)
DOCTESTED_PAGES = (
    "masks.md",
    "reference.md",
    "attention.md",
    "modules.md",
    "flax_attention.md",
)

# Checked in the slow step: examples that build and compile whole Flax modules, and
# dispatch's example, whose two jax.random.normal draws compile ~3 s each on CPU (its path,
# the default implementation against the reference on a GQA causal call, stays in the fast
# set: tests/kernels/test_dispatch.py::test_default_picks_a_supporting_implementation...).
HEAVY = {
    "jax_attn.nnx_modules",
    "jax_attn.linen_modules",
    "modules.md",
    "flax_attention.md",
    "jax_attn.dispatch",
}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in sorted(names)]


@pytest.mark.parametrize("module_name", _params(DOCTESTED))
def test_docstring_examples(module_name):
    check_module_examples(module_name)


@pytest.mark.parametrize("page", _params(DOCTESTED_PAGES))
def test_docs_page_examples(page):
    """The ``>>>`` examples in the Markdown pages (code fences read as blank lines)."""
    check_page_examples(page)


def test_listed_modules_exist():
    present = {"jax_attn"} | {
        info.name for info in pkgutil.walk_packages(jax_attn.__path__, prefix="jax_attn.")
    }
    assert set(DOCTESTED) <= present, sorted(set(DOCTESTED) - present)
