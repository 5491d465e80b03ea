"""The library stands alone: nothing under src/layerfold imports the research tooling (benchmarks/, parity/),
the stages (pipeline/) or the scripts (scripts/), and the README's layout says which folders are research
tooling that using layerfold does not need."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTSIDE = ("benchmarks", "parity", "pipeline", "scripts")  # top-level folders the library must never import


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import``/``from ... import`` in ``path`` names (relative imports resolved within the package)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_the_library_never_imports_research_tooling_stages_or_scripts() -> None:
    files = sorted((REPO / "src" / "layerfold").rglob("*.py"))
    assert len(files) > 50  # the scan reads the library, not an empty folder
    offending = [f"{path.relative_to(REPO)}:{line} imports {module}" for path in files for line, module in imported_modules(path)
                 if module.split(".")[0] in OUTSIDE]
    assert not offending, "the library imports research tooling or entry points:\n" + "\n".join(offending)


def test_the_scan_sees_an_import_of_the_tooling(tmp_path: Path) -> None:
    """The scan can fail: an import of parity or benchmarks, plain or from, is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom parity.compare import verdict\nimport benchmarks.common as common\n")
    assert [m for _, m in imported_modules(sample) if m.split(".")[0] in OUTSIDE] == ["parity.compare", "benchmarks.common"]


def test_readme_layout_marks_the_research_tooling() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for folder in ("benchmarks/", "parity/"):
        line = next((line for line in layout.splitlines() if f"`{folder}`" in line), "")
        assert "research tooling" in line and "not needed to use layerfold" in line, f"README layout: {folder} line is {line!r}"
