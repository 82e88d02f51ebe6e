"""The Markdown tables of measured numbers, rendered from the committed benchmark JSON.

    python scripts/results_tables.py          # rewrite the tables in README.md and docs/
    python scripts/results_tables.py --check  # exit 1 and name each table that differs

Each table in ``TABLES`` lives in a Markdown file between its header line and the first
line that does not start with ``|``; its rows come from one file under
``benchmarks/results/``. After a benchmark writes a new JSON, run this script (the test
``tests/test_results_tables.py`` fails while a table and its JSON disagree).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20

# The Flax memory benchmark's contestants (keys of its JSON), in table order, with the
# short and the long label the README and docs/flax_attention.md give them.
FLAX_CONTESTANTS = (
    ("flax default, causal mask", "Flax default, causal mask", "Flax default, causal mask"),
    (
        "flax_attention_fn, causal mask",
        "`flax_attention_fn`, same mask",
        "`flax_attention_fn`, same mask",
    ),
    (
        "flax_attention_fn, is_causal (no mask)",
        "`flax_attention_fn`, `is_causal`",
        "`flax_attention_fn`, `is_causal`, no mask",
    ),
)


def ratio(x: float) -> str:
    """``15.5×``; a whole number without its ``.0`` (``1×``)."""
    return f"{x:.1f}".removesuffix(".0") + "×"


def milliseconds(row: dict) -> str:
    """``median (min–max)`` in whole milliseconds."""
    return f"{row['median_ms']:.0f} ({row['min_ms']:.0f}–{row['max_ms']:.0f})"


def flax_memory_rows(report: dict, long: bool) -> list[str]:
    """The rows of the Flax memory table: the README's short form, or docs' long one with a
    speed-up column."""
    lines = []
    for case, short_case in (("forward", "fwd"), ("forward+grad", "fwd+grad")):
        rows = report["cases"][case]
        for key, short_label, long_label in FLAX_CONTESTANTS:
            row = rows[key]
            cells = [
                case if long else short_case,
                long_label if long else short_label,
                f"{row['temp_bytes'] / MiB:.1f} MiB",
                ratio(row["temp_ratio_flax_over_this"]),
                milliseconds(row),
            ]
            if long:
                cells.append(ratio(row["speedup_vs_flax"]))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class Table:
    markdown: str  # the file, relative to the checkout
    header: str  # the table's first line, exactly
    results: str  # the JSON under benchmarks/results/
    rows: Callable[[dict], list[str]]  # the JSON's report -> the rows below the separator


FLAX_MEMORY = "flax_attention_memory-cpu-cpu.json"
TABLES = (
    Table(
        "README.md",
        "| case | attention | temp memory | Flax / this | time, ms |",
        FLAX_MEMORY,
        lambda report: flax_memory_rows(report, long=False),
    ),
    Table(
        "docs/flax_attention.md",
        "| case | attention | temp memory | Flax / this | time, ms | speed-up |",
        FLAX_MEMORY,
        lambda report: flax_memory_rows(report, long=True),
    ),
)


def table_span(lines: list[str], header: str, name: str) -> tuple[int, int]:
    """Indices of the first row after ``header``'s separator line and one past the last."""
    if lines.count(header) != 1:
        raise ValueError(f"{name}: expected the table header once, found {lines.count(header)}")
    start = lines.index(header) + 2
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return start, end


def rendered(table: Table, root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(rows in the Markdown file now, rows rendered from the JSON)."""
    lines = (root / table.markdown).read_text().splitlines()
    start, end = table_span(lines, table.header, table.markdown)
    report = json.loads((root / "benchmarks" / "results" / table.results).read_text())
    return lines[start:end], table.rows(report)


def write(table: Table, root: Path = ROOT) -> bool:
    """Rewrites ``table``'s rows from its JSON; whether anything changed."""
    path = root / table.markdown
    text = path.read_text()
    lines = text.splitlines()
    start, end = table_span(lines, table.header, table.markdown)
    want = table.rows(json.loads((root / "benchmarks" / "results" / table.results).read_text()))
    if lines[start:end] == want:
        return False
    lines[start:end] = want
    path.write_text("\n".join(lines) + ("\n" if text.endswith("\n") else ""))
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--check"]):
        print(__doc__, file=sys.stderr)
        return 2
    stale = []
    for table in TABLES:
        if argv == ["--check"]:
            have, want = rendered(table)
            if have != want:
                stale.append(table)
        elif write(table):
            print(f"rewrote {table.markdown}: {table.header}")
    for table in stale:
        print(f"stale: {table.markdown} ({table.header}) != {table.results}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
