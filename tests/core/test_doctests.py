"""The examples in the docstrings run and print what they show.

Only modules whose API is stable are listed; add a module here once its examples are
final. Modules that need an optional dependency are skipped when it is missing, and a
module that does not exist (yet) fails with a clear message rather than silently.
"""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import jax_attn

DOCTESTED = {
    "jax_attn": (),
    "jax_attn.masks": (),
    "jax_attn.functional": (),
    "jax_attn.dispatch": (),
    "jax_attn.reference": (),
    "jax_attn.linen_modules": (),
    "jax_attn.nnx_modules": (),
    "jax_attn.apps.plots": ("matplotlib",),
    "jax_attn.shapes": (),
}
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
DOCS = Path(__file__).resolve().parents[2] / "docs"
DOCTESTED_PAGES = {
    "masks.md": (),
    "functional.md": ("matplotlib",),
    "reference.md": (),
    "attention.md": (),
    "modules.md": (),
    "plots.md": ("matplotlib",),
    "flax_attention.md": (),
}


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
    for dependency in DOCTESTED[module_name]:
        pytest.importorskip(dependency)
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    tests = finder.find(module, module_name, globs=vars(module).copy())
    for test in sorted(tests, key=lambda t: t.name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0, f"{module_name} has no examples"
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed"


@pytest.mark.parametrize("page", _params(DOCTESTED_PAGES))
def test_docs_page_examples(page):
    """The ``>>>`` examples in the Markdown pages (code fences read as blank lines)."""
    for dependency in DOCTESTED_PAGES[page]:
        pytest.importorskip(dependency)
    path = DOCS / page
    text = re.sub(r"^\s*```.*$", "", path.read_text(), flags=re.MULTILINE)
    test = doctest.DocTestParser().get_doctest(text, {}, page, str(path), 0)
    assert test.examples, f"{page} has no examples"
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed"


def test_listed_modules_exist():
    present = {"jax_attn"} | {
        info.name for info in pkgutil.walk_packages(jax_attn.__path__, prefix="jax_attn.")
    }
    assert set(DOCTESTED) <= present, sorted(set(DOCTESTED) - present)
