"""Every reader gives a run the numbers its own report gives it, whatever other runs are listed beside it:
the report stage and every subcommand of scripts/runs.py (list, table, pairs, collect/recompute) take the
headline from layerfold.report.reader.run_headline."""

from __future__ import annotations

import json
from pathlib import Path

from layerfold.report.collected import summary_rows
from layerfold.report.folder_tables import quality_table
from layerfold.report.listing import format_rows
from layerfold.report.protocol import informative_tasks, summary
from layerfold.report.reader import run_headline
from layerfold.report.tables import experiments_table, final_metrics
from layerfold.runs.sources import load_runs, runs_from_dvc_exp_show

REPO = Path(__file__).resolve().parents[2]


def _metrics(layers: int, accs: dict[str, float], stderr: float = 0.013) -> dict:
    return {"model": {"model_type": "llama", "num_layers": layers, "params_total": 1e6 * layers},
            "perplexity": {"wikitext2": {"perplexity": 10.0 * (31 - layers)}},
            "lm_eval": {t: {"acc": a, "acc_stderr": stderr + i / 1000, "n": 200} for i, (t, a) in enumerate(accs.items())}}


DENSE = _metrics(30, {"piqa": 0.652, "boolq": 0.611, "arc_easy": 0.574})
# "deep" evaluated every task; "narrow" skipped arc_easy, so the tasks every listed run has are two, not three
DEEP = _metrics(24, {"piqa": 0.603, "boolq": 0.588, "arc_easy": 0.471})
NARROW = {**_metrics(26, {"piqa": 0.621, "boolq": 0.597}), "model": DEEP["model"] | {"num_layers": 26}}
NARROW_DENSE = {**DENSE, "lm_eval": {t: DENSE["lm_eval"][t] for t in ("piqa", "boolq")}}


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_the_same_run_gets_the_same_headline_from_every_reader(tmp_path: Path) -> None:
    deep = {"name": "deep", "dense": DENSE, "compressed": DEEP, "recovered": None, "plan": {"method": {"name": "shortgpt"}}}
    own = run_headline(deep)
    assert sorted(own["tasks"]) == ["arc_easy", "boolq", "piqa"]  # no answers recorded: every task the run evaluated counts
    expected = (own["headline"], own["se"], own["diff"], own["diff_se"])
    assert None not in expected

    # the report stage: metrics/summary.json of the run
    written = summary(DENSE, final_metrics(deep), informative_tasks(DENSE, own["tasks"]))
    assert (written["headline"], written["se"], written["delta"], written["delta_se"]) == tuple(round(100 * v, 2) for v in expected)

    # scripts/runs.py list on DVC experiments (dvc exp show --json), with another run beside it
    payload = [{"rev": "workspace", "data": {"rev": "workspace", "metrics": {}}, "experiments": [
        {"name": name, "revs": [{"name": name, "data": {"rev": f"{i}" * 40, "timestamp": "2026-12-05T00:00:00", "metrics": {
            "metrics/dense.json": {"data": dense}, "metrics/compressed.json": {"data": compressed}}}}]}
        for i, (name, dense, compressed) in enumerate((("narrow", NARROW_DENSE, NARROW), ("deep", DENSE, DEEP)))]}]
    dvc_runs = runs_from_dvc_exp_show(payload)
    assert [r["name"] for r in dvc_runs] == ["narrow", "deep"]
    rows = {r["experiment"]: r for r in experiments_table(dvc_runs, setting="auto")}
    assert (rows["deep"]["average"], rows["deep"]["average_stderr"], rows["deep"]["diff"], rows["deep"]["diff_se"]) == expected

    # scripts/runs.py list, table and pairs on a run_methods folder holding both runs
    methods = tmp_path / "methods"
    _write(methods / "dense/metrics.json", DENSE)
    _write(methods / "deep/metrics.json", DEEP)
    _write(methods / "deep/plan.json", {"method": {"name": "shortgpt"}})
    _write(methods / "narrow/metrics.json", NARROW)
    runs = load_runs(methods_dirs=[methods])
    rows = {r["experiment"]: r for r in experiments_table(runs, setting="auto")}
    assert (rows["deep"]["average"], rows["deep"]["average_stderr"], rows["deep"]["diff"], rows["deep"]["diff_se"]) == expected
    line = next(line for line in format_rows(runs) if line.startswith("deep"))
    assert f"{100 * own['headline']:.2f}±{100 * own['se']:.2f}" in line and f"{100 * own['diff']:+.2f}±{100 * own['diff_se']:.2f}" in line
    table = "\n".join(quality_table(methods))
    row = next(r for r in table.splitlines() if r.startswith("| deep "))
    assert f"{100 * own['headline']:.2f} ± {100 * own['se']:.2f}" in row and f"{100 * own['diff']:+.2f} ± {100 * own['diff_se']:.2f}" in row

    # scripts/runs.py collect/recompute: its records of the same two runs, the narrow one first
    records = [{"name": name, "remove": 30 - m["model"]["num_layers"], "timings": {}, "params": {"method": {"name": name}},
                "metrics": {"dense": dense, "compressed": m, "recovered": None}}
               for name, dense, m in (("narrow", NARROW_DENSE, NARROW), ("deep", DENSE, DEEP))]
    tasks = ["boolq", "piqa"]  # the tasks every record has
    row = next(r for r in summary_rows(records, tasks, informative_tasks(NARROW_DENSE, tasks)) if r["run"] == "deep")
    assert (row["headline"], row["headline_se"], row["diff"], row["diff_se"]) == expected


def test_without_the_shared_reader_the_listed_runs_would_move_the_numbers() -> None:
    """The plain average over the tasks every listed run has (what the readers did before) differs: the test
    above can fail."""
    deep = {"name": "deep", "dense": DENSE, "compressed": DEEP}
    narrow = {"name": "narrow", "dense": NARROW_DENSE, "compressed": NARROW}
    plain = {r["experiment"]: r for r in experiments_table([deep, narrow])}
    assert plain["deep"]["average"] != run_headline(deep)["headline"]
