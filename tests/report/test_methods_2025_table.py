"""The 2025 methods' results table (``scripts/methods_2025_table.py``): its reading is generated from the numbers and
reads a difference only outside the noise, and the committed table, and the generated part of
``docs/methods_2025.md``, are what the committed results give."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "results" / "methods_2025" / "smollm2-135m-q4_1_cpu"
TASKS = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq_notitle", "openbookqa"]


def _load_script():
    spec = importlib.util.spec_from_file_location("methods_2025_table", REPO / "scripts" / "methods_2025_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


table = _load_script()


def _metrics(ppl: float, accuracy: float | None = None, stderr: float = 0.01, layers: int = 22) -> dict:
    metrics = {"model": {"name": "m", "file": "f", "quantization": "q", "num_layers": layers}, "device": "cpu", "dtype": "float32",
               "versions": {}, "perplexity": {"wikitext2": {"perplexity": ppl, "seq_len": 16, "windows": 2, "tokens_scored": 30,
                                                              "tokens_in_text": 100}}}
    if accuracy is not None:
        metrics["lm_eval"] = {t: {"acc": accuracy, "acc_stderr": stderr} for t in TASKS}
        metrics["lm_eval_settings"] = {"sampling": "seeded", "limit": 10, "seed": 0}
    return metrics


def _write(folder: Path, name: str, metrics: dict, params: dict, plan: dict | None = None) -> None:
    (folder / name).mkdir(parents=True)
    (folder / name / "metrics.json").write_text(json.dumps(metrics))
    (folder / name / "params.yaml").write_text(yaml.safe_dump(params))
    if plan is not None:
        (folder / name / "plan.json").write_text(json.dumps(plan))


def _runs(tmp_path: Path, gromov: dict, replaceme: dict) -> list[dict]:
    _write(tmp_path, "dense", _metrics(10.0, 0.6, layers=30), {"method": {"name": "gromov"}})
    _write(tmp_path, "gromov", gromov, {"method": {"name": "gromov"}}, {"removed": [3, 4], "merged": []})
    _write(tmp_path, "replaceme", replaceme, {"method": {"name": "replaceme", "objective": "lstsq"}},
           {"removed": [], "merged": [[2, 3, 4]]})
    return table.build(table.load(tmp_path))["rows"]


def test_a_gain_is_read_only_outside_the_noise(tmp_path: Path) -> None:
    rows = _runs(tmp_path / "a", _metrics(40.0, 0.40), _metrics(30.0, 0.50))  # +10 points, se of the mean ~0.5 points
    assert [r["run"] for r in rows] == ["dense", "gromov", "replaceme"]
    (line,) = table.reading(rows)
    assert "ahead of gromov" in line and "+10.00" in line
    rows = _runs(tmp_path / "b", _metrics(40.0, 0.40, stderr=0.1), _metrics(30.0, 0.41, stderr=0.1))  # +1 point, se ~5 points
    (line,) = table.reading(rows)
    assert "within noise of gromov" in line
    rows = _runs(tmp_path / "c", _metrics(30.0, 0.50), _metrics(40.0, 0.40))
    assert "behind gromov" in table.reading(rows)[0]


def test_perplexity_only_runs_read_the_ratio_and_leave_small_ones_unread(tmp_path: Path) -> None:
    rows = _runs(tmp_path / "a", _metrics(40.0), _metrics(30.0))
    assert rows[2]["ppl_ratio_vs_baseline"] == pytest.approx(0.75)
    (line,) = table.reading(rows)
    assert "lowers the WikiText-2 perplexity of gromov from 40.00 to 30.00 (x0.750)" in line
    (line,) = table.reading(_runs(tmp_path / "b", _metrics(40.0), _metrics(41.0)))
    assert "about where it was" in line and "raises" not in line
    (line,) = table.reading(_runs(tmp_path / "c", _metrics(40.0), _metrics(60.0)))
    assert "raises" in line
    text = table.markdown(table.build(table.load(tmp_path / "c")), tmp_path)
    assert "[3, 4] replaced by a linear map folded into layer 2" in text


def test_committed_table_and_docs_are_generated_from_the_committed_results(monkeypatch: pytest.MonkeyPatch) -> None:
    built = table.build(table.load(RESULTS))
    assert json.loads((RESULTS / "table.json").read_text()) == json.loads(json.dumps(built))
    assert (RESULTS / "table.md").read_text() == table.markdown(built, RESULTS)
    docs = (REPO / "docs" / "methods_2025.md").read_text(encoding="utf-8")
    monkeypatch.chdir(REPO)  # the section names its sources relative to the repository
    section = table.docs_section(built, Path("results/parity"), Path("benchmarks/results"))
    assert section in docs, "docs/methods_2025.md is stale: rerun scripts/methods_2025_table.py ... --docs docs/methods_2025.md"
    # every run of the table is a 30 -> 22 comparison on one protocol: the same calibration and evaluation settings
    params = [yaml.safe_load((path / "params.yaml").read_text()) for path in RESULTS.iterdir() if (path / "params.yaml").exists()]
    assert {json.dumps([p["data"], p["eval"]], sort_keys=True) for p in params} == {json.dumps([params[0]["data"], params[0]["eval"]], sort_keys=True)}
    assert {r["layers"] for r in built["rows"] if r["run"] != "dense"} == {22}
