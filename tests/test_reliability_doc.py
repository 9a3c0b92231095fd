"""docs/reliability.md names real tests: every one it cites exists, and it lists at least 20 rows.

A bare ``test_name`` in a table cell refers to the last test file named before it in that cell.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
CITE = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`|`(test_\w+)`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def _rows() -> list[str]:
    return [line for line in DOC.read_text().splitlines() if re.match(r"\| [A-Z]\d+ \|", line)]


def test_every_cited_test_exists():
    missing = []
    for row in _rows():
        current = None
        for path, name, bare in CITE.findall(row):
            if path:
                current = path
                assert (REPO / path).is_file(), f"{path} (row {row[:12]})"
            name = name or bare
            if name:
                assert current, f"bare {name} before any file in row {row[:12]}"
                if name not in _tests_in(REPO / current):
                    missing.append(f"{current}::{name}")
    assert not missing, missing


def test_at_least_twenty_faults_and_bad_inputs_each_with_a_test():
    rows = _rows()
    assert len(rows) >= 20
    assert all(CITE.search(row.split("|")[-2]) for row in rows), "a row without a test"
