"""The chapter-3 notebooks in ``notebooks/`` run top to bottom in a fresh kernel.

Each notebook asserts its own results (the book's printed values to 4 decimals, exact zero
gradients on masked positions, ...), so executing it is the test: any cell error fails.
The notebooks are executed in memory; the committed files (with their outputs) are not
rewritten. The kernel inherits this process's environment, so the settings of
``tests/conftest.py`` (strict dtype and rank promotion, 8 virtual CPU devices, Agg backend)
apply inside it too.

Executing all of them takes about two minutes of CPU (a few minutes of wall time on a
shared 2-core machine): ``slow`` (``python -m pytest -m slow tests/notebooks``). The checks of
the committed copies (run in order, with their outputs, no error, no stderr noise, no
machine paths, every book value agreeing) and that the book's values come only from the
package data are quick.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 900  # the training cell of 04 takes about 45 s of CPU; more wall when shared
MAX_PNG_BYTES = 200_000  # figures are saved at a modest dpi

# Appended to the in-memory copy: the kernel must run this checkout's jax_attn.
CHECKOUT_CELL = f"""
import pathlib, jax_attn
assert pathlib.Path(jax_attn.__file__).resolve().is_relative_to({str(ROOT)!r}), jax_attn.__file__
"""


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for module in ("matplotlib", "optax"):  # the apps extra, which the notebooks use
        pytest.importorskip(
            module, reason=f"the notebooks need {module} (pip install -e '.[apps]')"
        )

    # The kernel imports this checkout first even where jax_attn is not pip-installed.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(CHECKOUT_CELL))
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # cwd: imports chapter3.py
    )
    client.execute()  # raises CellExecutionError naming the cell on any error


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_with_outputs(path):
    """Every code cell of the committed copy ran, in order, without an error; figures are
    small PNGs (so the notebooks render on a code host)."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}: re-execute it top to bottom in a fresh "
        f"kernel and save it with its outputs"
    )
    for index, cell in enumerate(code):
        for output in cell.outputs:
            assert output.output_type != "error", f"{path.name}, code cell {index}: an error"
            png = output.get("data", {}).get("image/png")
            if png:
                size = len(base64.b64decode(png))
                assert size <= MAX_PNG_BYTES, f"{path.name}, code cell {index}: PNG of {size} B"


# A machine path in a committed output (a warning's file name, a temporary directory).
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:home|root|tmp|work|Users|private|var/folders)/")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_outputs_agree_with_the_book_and_are_clean(path):
    """The committed outputs print every book value as agreeing with the book, carry no
    stderr stream (warnings, progress bars) and no absolute path of the machine that ran them."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    calls = sum(len(_compare_calls(cell.source)) for cell in _code_cells(notebook))
    agreed = 0
    for index, cell in enumerate(_code_cells(notebook)):
        for output in cell.outputs:
            assert not (output.output_type == "stream" and output.name == "stderr"), (
                f"{path.name}, code cell {index}: stderr output {output.text[:200]!r}"
            )
            text = output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
            assert "DIFFERS FROM THE BOOK" not in text, f"{path.name}, code cell {index}"
            agreed += text.count("agrees with the book")
        found = MACHINE_PATH.search(
            json.dumps([o for o in cell.outputs if "image/png" not in o.get("data", {})])
        )
        assert found is None, f"{path.name}, code cell {index}: a machine path in the outputs"
    assert agreed >= calls, f"{path.name}: {agreed} values agree in the outputs, {calls} compares"


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _compare_calls(source: str) -> list[ast.Call]:
    tree = ast.parse(source)
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "compare"
    ]


def _is_float(node: ast.AST) -> bool:
    """A float literal, signed or not (``0.5``, ``-0.0739``)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        node = node.operand
    return isinstance(node, ast.Constant) and isinstance(node.value, float)


def _reads_book(node: ast.AST) -> bool:
    """Whether an expression reads the package data (a name ``BOOK``, or a loop variable
    bound from it, such as ``printed`` in 03's ``for ..., printed in CASES.items()``)."""
    return any(isinstance(n, ast.Name) and n.id in ("BOOK", "printed") for n in ast.walk(node))


def test_the_book_values_come_from_the_package_data():
    """One copy of the book's values: every ``compare`` in the notebooks takes the book's
    value from ``BOOK`` (``jax_attn.data.book_values()``), and neither the notebooks nor
    ``chapter3.py`` write out arrays of numbers of their own."""
    nbformat = pytest.importorskip("nbformat")
    sources = {
        f"{path.name}, code cell {index}": cell.source
        for path in NOTEBOOKS
        for index, cell in enumerate(_code_cells(nbformat.read(path, as_version=4)))
    }
    sources["chapter3.py"] = (NOTEBOOK_DIR / "chapter3.py").read_text()
    for where, source in sources.items():
        tree = ast.parse(source)
        for call in _compare_calls(source):
            book = call.args[2] if len(call.args) > 2 else None
            book = book or next((k.value for k in call.keywords if k.arg == "book"), None)
            assert book is not None and _reads_book(book), (
                f"{where}: compare(...) at line {call.lineno} does not read the book's value "
                f"from BOOK"
            )
        for node in ast.walk(tree):
            if isinstance(node, ast.List | ast.Tuple):
                floats = [e for e in node.elts if _is_float(e)]
                assert len(floats) < 3, (
                    f"{where}, line {node.lineno}: a literal array of numbers; the book's "
                    f"values belong in jax_attn/data/book_ch03_values.json"
                )
    import sys

    sys.path.insert(0, str(NOTEBOOK_DIR))
    try:
        import chapter3
    finally:
        sys.path.remove(str(NOTEBOOK_DIR))
    from jax_attn.data import book_values

    assert chapter3.BOOK is book_values()
