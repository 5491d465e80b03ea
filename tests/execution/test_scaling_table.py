"""docs/scaling.md's method x stage table is what validate decides today (layerfold.layer_major_coverage)."""

from __future__ import annotations

from conftest import REPO

from layerfold.layer_major_coverage import BEGIN, END, outcome, table


def test_the_docs_table_is_the_generated_one():
    text = (REPO / "docs" / "scaling.md").read_text()
    documented = text[text.index(BEGIN): text.index(END) + len(END)]
    assert documented == table(), "docs/scaling.md is out of date: python -m layerfold.layer_major_coverage docs/scaling.md"


def test_cells_follow_validate():
    assert outcome(["method=come"], None) is None  # compress: CoMe runs layer by layer
    assert outcome(["method=shortgpt"], ["recovery=distill", "eval.efficiency.enabled=false"]) is None
    assert "end_to_end.enabled=true" in outcome(["method=shortgpt"], ["recovery=lora", "eval.efficiency.enabled=false"])
    assert "side file" in outcome(["method=streamline", "method.replacement=mlp"], ["recovery=none"])
