"""`scripts/runs.py list`'s table (layerfold.report.listing): one line per experiment, model column, at most 120 columns."""

from __future__ import annotations

import json
from pathlib import Path

from layerfold.report.listing import format_rows
from layerfold.runs.sources import load_runs, runs_from_dvc_exp_show


def _metrics(layers: int, acc: float, ppl: float, stderr: float = 0.01) -> dict:
    return {"model": {"model_type": "llama", "num_layers": layers, "params_total": 1e6 * layers},
            "perplexity": {"wikitext2": {"perplexity": ppl}, "c4": {"perplexity": 2 * ppl}},
            "lm_eval": {"piqa": {"acc": acc, "acc_stderr": stderr, "n": 100}, "boolq": {"acc": acc, "acc_stderr": stderr, "n": 100}}}


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_methods_dir_rows_fit_120_columns(tmp_path: Path) -> None:
    _write(tmp_path / "dense/metrics.json", _metrics(30, 0.60, 20.0))
    _write(tmp_path / "shortgpt_with_a_very_long_experiment_name/metrics.json", _metrics(22, 0.50, 100.0))
    (tmp_path / "shortgpt_with_a_very_long_experiment_name/params.yaml").write_text("model: {name: smollm2-135m-instruct-q4_1}\n")
    _write(tmp_path / "shortgpt_with_a_very_long_experiment_name/plan.json", {"method": {"name": "shortgpt"}})
    _write(tmp_path / "laco/metrics.json", _metrics(30, 0.595, 20.0, stderr=0.05))
    lines = format_rows(load_runs(methods_dirs=[tmp_path]))
    assert all(len(line) <= 120 for line in lines)
    assert lines[0].startswith("headline: auto over boolq, piqa")  # no answers recorded: every task counts
    assert lines[1].split()[:3] == ["experiment", "model", "method"]
    row = next(line for line in lines if line.startswith("shortgpt_with"))
    # 10 points down with stderr sqrt(2 * 0.01^2) / sqrt(2) per task average: far outside the noise -> starred
    assert "smollm2-135m-instru…" in row and "30→22" in row and "-10.00±1.00*" in row and "50.00±0.71" in row
    laco = next(line for line in lines if line.startswith("laco"))
    assert "-0.50±" in laco and not laco.endswith("*")  # inside the noise: no star


def test_dvc_exp_show_payload() -> None:
    payload = [{"rev": "workspace", "name": None, "data": {"rev": "workspace", "metrics": {
        "metrics/dense.json": {"data": _metrics(30, 0.6, 20.0)}, "metrics/compressed.json": {"data": _metrics(22, 0.55, 90.0)}},
        "params": {"params.yaml": {"data": {"model": {"name": "m"}, "method": {"name": "sleb"}}}}},
        "experiments": [{"revs": [{"rev": "abc1234", "name": "exp-1", "data": {"metrics": {
            "metrics/dense.json": {"data": _metrics(30, 0.6, 20.0)}, "metrics/compressed.json": {"data": _metrics(26, 0.58, 30.0)}},
            "params": {"params.yaml": {"data": {"model": {"name": "m"}, "method": {"name": "gromov"}}}}}}]}]}]
    runs = runs_from_dvc_exp_show(payload)
    assert [(r["name"], r["plan"]["method"]["name"], r["compressed"]["model"]["num_layers"]) for r in runs] == [
        ("workspace", "sleb", 22), ("exp-1", "gromov", 26)]
    lines = format_rows(runs)
    assert len(lines) == 1 + 2 + 2 + 1 and all(len(line) <= 120 for line in lines)  # rule, header, rule line, runs, legend
    assert format_rows(runs, ["piqa"])[0].startswith("headline: fixed over piqa; excluded: boolq")
