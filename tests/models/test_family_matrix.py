"""The families x methods contract: each family's row of docs/architectures.md equals a fresh run of
scripts/family_matrix.py (every cell through validate, then run and checked), and the removal methods run everywhere."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO
from layerfold.models.tiny import TINY_FAMILIES


def _matrix():
    if "family_matrix" not in sys.modules:
        spec = importlib.util.spec_from_file_location("family_matrix", REPO / "scripts" / "family_matrix.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["family_matrix"] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules["family_matrix"]


matrix = _matrix()
COMMITTED = matrix.parse(matrix.DOC.read_text())
REMOVALS = ("ShortGPT", "Gromov", "SLEB", "drop-last", "Streamline none", "sequential")


def test_the_committed_table_covers_every_family_and_column() -> None:
    assert list(COMMITTED) == list(TINY_FAMILIES)
    assert all(list(row) == [c.name for c in matrix.COLUMNS] for row in COMMITTED.values())
    # Round trip: the committed block is exactly what render() writes for its rows.
    text = matrix.DOC.read_text()
    assert matrix.render(COMMITTED) == text[text.index(matrix.BEGIN) : text.index(matrix.END) + len(matrix.END)]


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_row_matches_a_fresh_run(family: str, tmp_path, one_thread) -> None:
    row = matrix.run_row(family, tmp_path)
    assert all(row[name].runs for name in REMOVALS), {k: v.reason for k, v in row.items() if not v.runs}
    assert {name: matrix.comparable(cell) for name, cell in row.items()} == COMMITTED[family]


def test_a_cell_that_validate_accepts_must_run(tmp_path, monkeypatch) -> None:
    """The contract can fail: a method that breaks after validate accepted stops the matrix instead of becoming a refusal."""
    column = next(c for c in matrix.COLUMNS if c.name == "ShortGPT")

    def broken(*args, **kwargs):
        raise RuntimeError("mid-stage failure")

    monkeypatch.setattr(matrix, "_compress", broken)
    with pytest.raises(matrix.ContractBroken, match="validate accepted, then RuntimeError: mid-stage failure"):
        matrix.run_cell("llama", column, tmp_path)
