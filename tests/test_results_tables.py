"""The tables of measured numbers in README.md and docs/ equal the committed benchmark
JSON they cite (rendered by ``scripts/results_tables.py``, which rewrites them)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "results_tables", ROOT / "scripts" / "results_tables.py"
)
results_tables = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("results_tables", results_tables)  # dataclasses look the module up
_spec.loader.exec_module(results_tables)


@pytest.mark.parametrize("table", results_tables.TABLES, ids=lambda t: f"{t.markdown}:{t.results}")
def test_table_equals_its_committed_results(table):
    have, want = results_tables.rendered(table)
    assert have == want, f"{table.markdown} is stale: python scripts/results_tables.py"


def test_each_table_cites_its_results_file():
    for table in results_tables.TABLES:
        text = (ROOT / table.markdown).read_text()
        assert f"benchmarks/results/{table.results}" in text, table.markdown


def test_a_changed_number_is_caught(tmp_path):
    table = results_tables.TABLES[0]
    for name in (table.markdown, f"benchmarks/results/{table.results}"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    markdown = tmp_path / table.markdown
    have, _ = results_tables.rendered(table, tmp_path)
    markdown.write_text(markdown.read_text().replace(have[0], have[0].replace("MiB", "GiB")))
    have, want = results_tables.rendered(table, tmp_path)
    assert have != want
    assert results_tables.write(table, tmp_path)
    assert results_tables.rendered(table, tmp_path)[0] == want
