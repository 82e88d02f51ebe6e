"""The chapter-3 notebooks in ``notebooks/`` run top to bottom in a fresh kernel.

Each notebook asserts its own results (the book's printed values to 4 decimals, exact zero
gradients on masked positions, ...), so executing it is the test: any cell error fails.
The notebooks are executed in memory; the committed files (with their outputs) are not
rewritten. The kernel inherits this process's environment, so the settings of
``tests/conftest.py`` (strict dtype and rank promotion, 8 virtual CPU devices, Agg backend)
apply inside it too.

Executing all of them takes minutes on a 2-core CPU: ``slow`` (``python -m pytest -m slow
tests/notebooks``). The check that the committed copies carry their outputs is quick.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 900  # the training cell of 04 takes about a minute alone, several when shared
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
