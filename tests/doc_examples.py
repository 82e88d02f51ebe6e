"""Runs the ``>>>`` examples of a module's docstrings or of a Markdown page (a helper of
``tests/core/test_doctests.py`` and ``tests/apps/test_doctests_apps.py``)."""

import doctest
import importlib
import re
from pathlib import Path

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
DOCS = Path(__file__).resolve().parents[1] / "docs"


def check_module_examples(module_name: str) -> None:
    """Every docstring example of ``module_name`` prints what it shows; it has some."""
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    tests = finder.find(module, module_name, globs=vars(module).copy())
    for test in sorted(tests, key=lambda t: t.name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0, f"{module_name} has no examples"
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed"


def check_page_examples(page: str) -> None:
    """The examples of ``docs/<page>`` (code fences read as blank lines) print what they
    show; it has some."""
    path = DOCS / page
    text = re.sub(r"^\s*```.*$", "", path.read_text(), flags=re.MULTILINE)
    test = doctest.DocTestParser().get_doctest(text, {}, page, str(path), 0)
    assert test.examples, f"{page} has no examples"
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed"
