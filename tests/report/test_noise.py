"""Differences with standard errors: paired from per-document results, unpaired from stderrs, and
the report's recovered columns."""

from __future__ import annotations

import math

import pytest

from layerfold.evaluation.results import pack_bits, unpack_bits
from layerfold.report import comparison_table, markdown_report
from layerfold.report.noise import difference, mean_difference


def _task(bits: list[int], doc_ids: dict | None = None) -> dict:
    acc = sum(bits) / len(bits)
    se = math.sqrt(acc * (1 - acc) / (len(bits) - 1))
    return {"acc": acc, "acc_stderr": se, "n": len(bits), "per_doc": {"acc": pack_bits(bits, width=7)}, "doc_ids": doc_ids}


def test_pack_bits_round_trip():
    bits = [1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1]
    rows = pack_bits(bits, width=7)
    assert rows == ["1001110", "1001101", "1"]
    assert unpack_bits(rows) == bits


def test_paired_difference_by_hand():
    dense = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1]
    comp = [1, 0, 0, 1, 0, 1, 0, 0, 1, 1]  # loses docs 1 and 6, gains none
    d = difference(_task(dense), _task(comp), "acc")
    # per-doc differences: eight 0s and two -1s -> mean -0.2, sample variance (8*0.04 + 2*0.64)/9
    assert d["paired"] and d["diff"] == pytest.approx(-0.2)
    assert d["se"] == pytest.approx(math.sqrt((8 * 0.04 + 2 * 0.64) / 9 / 10))
    unpaired = math.sqrt(_task(dense)["acc_stderr"] ** 2 + _task(comp)["acc_stderr"] ** 2)
    assert d["se"] < unpaired  # pairing removes the shared per-question difficulty


def test_unpaired_when_documents_differ():
    a, b = _task([1, 0, 1, 1]), _task([1, 0, 0, 1], doc_ids={"piqa": [3, 5, 8, 13]})
    d = difference(a, b, "acc")
    assert not d["paired"]
    assert d["se"] == pytest.approx(math.sqrt(a["acc_stderr"] ** 2 + b["acc_stderr"] ** 2))


def test_significance_threshold():
    big = difference({"acc": 0.60, "acc_stderr": 0.01}, {"acc": 0.50, "acc_stderr": 0.01}, "acc")
    small = difference({"acc": 0.60, "acc_stderr": 0.05}, {"acc": 0.55, "acc_stderr": 0.05}, "acc")
    assert big["significant"] is True and small["significant"] is False
    assert difference({"acc": 0.6}, {"acc": 0.5}, "acc")["significant"] is None  # no stderr: unknown, not "significant"
    avg = mean_difference([big, small])
    assert avg["diff"] == pytest.approx(-0.075)
    assert avg["se"] == pytest.approx(math.sqrt(big["se"] ** 2 + small["se"] ** 2) / 2)


def _metrics(layers: int, lm_eval: dict) -> dict:
    return {"model": {"model_type": "llama", "num_layers": layers, "params_total": 100 * layers, "params_non_embedding": 50 * layers},
            "lm_eval": lm_eval, "perplexity": {"wikitext2": {"perplexity": 10.0 * (6 - layers), "seq_len": 8, "windows": 1}}}


def test_recovered_columns():
    dense = _metrics(5, {"piqa": _task([1] * 8 + [0] * 2)})
    comp = _metrics(3, {"piqa": _task([1] * 2 + [0] * 8)})
    rec = _metrics(3, {"piqa": _task([1] * 7 + [0] * 3)})
    text = markdown_report(dense, comp, recovered=rec)
    assert "| task | metric | n | dense | compressed | Δ compressed | retained % | recovered | Δ recovered | retained % (recovered) | note |" in text
    row = next(line for line in text.splitlines() if line.startswith("| piqa |"))
    # compressed loses 60 points (significant: plain retained %); recovered is within noise of dense
    assert "| -60.00 ± " in row and "| 25.0 |" in row and "| ≈87.5 (n.s.) |" in row
    assert "| perplexity wikitext2 (lower is better) | 10.000 | 30.000 | 30.000 |" in text
    rows = comparison_table(dense, rec)
    assert next(r for r in rows if r["name"] == "piqa")["paired"] is True
