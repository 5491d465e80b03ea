"""The documentation: a short README, a docs site that builds strictly, and relative links that resolve."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250
# [text](target) and ![alt](target), outside code; a target with a scheme, a mail address or only an anchor is not a file
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _relative_links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text()))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move the detail to a page under docs/")


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path):
    missing = []
    for target in _relative_links(page):
        path = target.split("#", 1)[0]
        if path and not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO)}: links to files that do not exist: {missing}"


def test_link_finder_sees_links_and_skips_code(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("[a](x.md) ![b](img/p.png \"t\") [c](https://e.org) [d](#here) `[e](code.md)`\n"
                    "```\n[f](fenced.md)\n```\n")
    assert _relative_links(page) == ["x.md", "img/p.png"]


def test_readme_report_excerpt_is_from_the_committed_report():
    """The Quickstart's report excerpt quotes reports/report.md line for line: refresh it when the report changes."""
    readme = (REPO / "README.md").read_text()
    excerpt = readme.split("<!-- report-excerpt", 1)[1].split("<!-- /report-excerpt -->", 1)[0]
    lines = [line for line in excerpt.splitlines()[1:] if line.strip()]
    assert len(lines) >= 5
    report = set((REPO / "reports" / "report.md").read_text().splitlines())
    stale = [line for line in lines if line not in report]
    assert not stale, f"README report excerpt lines not in reports/report.md (copy them again): {stale}"


def test_every_docs_page_is_in_the_nav():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    listed = set(re.findall(r":\s*([\w.-]+\.md)\s*$", nav, re.M))
    assert pages == listed, f"docs pages not in mkdocs.yml nav: {sorted(pages - listed)}; nav without a page: {sorted(listed - pages)}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (it is in the dev extra: requirements/cpu.txt)")
def test_mkdocs_strict_build(tmp_path: Path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                             "--site-dir", str(site)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (site / "index.html").is_file() and (site / "results" / "index.html").is_file()
    assert "One protocol, every method" in (site / "results" / "index.html").read_text()
