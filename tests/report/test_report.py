"""The report stage and the comparison notebook on small, hand-computable metrics of a 5-layer model."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO
from layerfold.report import accuracy_points, accuracy_vs_params, comparison_table, markdown_report

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import pipeline.report as report_stage  # noqa: E402

NOTEBOOK = REPO / "notebooks" / "compare_experiments.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(layers: int, lm_eval: dict | None, ppl: float, latency: float) -> dict:
    per_layer = 100
    metrics = {
        "model": {"model_type": "llama", "num_layers": layers, "params_total": 1000 + per_layer * layers,
                  "params_non_embedding": 200 + per_layer * layers, "params_per_layer": [per_layer] * layers},
        "device": "cpu (test)",
        "dtype": "float32",
        "perplexity": {"wikitext2": {"perplexity": ppl, "seq_len": 128, "windows": 2, "tokens_scored": 254, "tokens_in_text": 999, "add_bos": False}},
        "efficiency": {"device": "cpu (test)", "batch_size": 1, "prompt_len": 16, "new_tokens": 4, "prefill_latency_ms": latency,
                       "decode_tokens_per_s": 1000.0 / latency, "peak_memory_mib": 100.0 + layers, "peak_memory_kind": "process max RSS"},
        "wall_time": {"perplexity_s": 1.0},
    }
    if lm_eval is not None:
        metrics["lm_eval"] = lm_eval
        metrics["lm_eval_settings"] = {"limit": 20, "num_fewshot": {"mmlu": 5}, "local_tasks": True}
    return metrics


def _task(acc: float, acc_norm: float | None = None, n: int = 20) -> dict:
    out = {"acc": acc, "acc_stderr": 0.1}
    if acc_norm is not None:
        out |= {"acc_norm": acc_norm, "acc_norm_stderr": 0.11}
    return out | {"n": n}


# hellaswag reports acc_norm: 0.30 / 0.40 = 75.0 % retained; average over hellaswag, piqa, boolq
# (winogrande is only in dense): dense (0.40 + 0.60 + 0.50) / 3 = 0.50, compressed (0.30 + 0.54 + 0.45) / 3 = 0.43 -> 86.0 %.
DENSE_EVAL = {"hellaswag": _task(0.35, 0.40), "piqa": _task(0.60, 0.62), "boolq": _task(0.50), "winogrande": _task(0.55)}
COMPRESSED_EVAL = {"hellaswag": _task(0.25, 0.30), "piqa": _task(0.54, 0.50), "boolq": _task(0.45)}

PLAN = {
    "method": {"name": "shortgpt", "num_remove": 2},
    "original_layers": 5,
    "layers": [{"index": 0, "stands_for": [0]}, {"index": 1, "stands_for": [1]}, {"index": 2, "stands_for": [3, 4]}],
    "merged": [[3, 4]],
    "removed": [2],
    "details": {},
}


def _write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def make_repo(root: Path) -> None:
    """A repository root holding only what the report stage reads."""
    _write(root / "metrics/dense.json", _metrics(5, DENSE_EVAL, 20.0, 50.0))
    _write(root / "metrics/compressed.json", _metrics(3, COMPRESSED_EVAL, 30.0, 30.0))
    _write(root / "metrics/compress.json", {"method": "shortgpt", "layers_before": 5, "layers_after": 3, "removed": [2], "merged": [[3, 4]],
                                            "seconds": 0.5, "peak_memory_mib": 123.4, "device": "cpu (test)", "params_total": 1300, "params_non_embedding": 500})
    _write(root / "artifacts/compressed/plan.json", PLAN)
    cosine = [[1.0 - 0.1 * abs(i - j) for j in range(6)] for i in range(6)]
    _write(root / "artifacts/capture/stats.json", {"num_layers": 5, "tokens": 512, "sequences": 8, "device": "cpu", "dtype": "float32",
                                                   "block_influence": [0.9, 0.1, 0.02, 0.05, 0.3], "cosine": cosine, "last_token_angular": cosine})
    (root / "params.yaml").write_text(
        "runtime: {device: cpu, dtype: auto, seed: 0}\n"
        "model: {name: tiny-test}\nmethod: {name: shortgpt, num_remove: 2}\n"
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    make_repo(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("DVC_ROOT", raising=False)
        mp.delenv("DVC_EXP_NAME", raising=False)
        report_stage.main()
    return root


def test_report_markdown(repo):
    text = (repo / "reports/report.md").read_text()
    assert "# tiny-test: shortgpt" in text
    # no per-document results here, so the difference's stderr is the unpaired sqrt(0.11^2 + 0.11^2);
    # -10 points is inside 1.96 of them: the retained % is marked as noise
    assert "| hellaswag | acc_norm | 20 | 40.00 ± 11.00 | 30.00 ± 11.00 | -10.00 ± 15.56 | ≈75.0 (n.s.) |" in text
    # no per-document answers, so no task's floor is known: the headline counts the 3 tasks present in both, and says why;
    # average stderr sqrt(.11^2 + .1^2 + .1^2) / 3; difference stderr sqrt(2 * .11^2 + 4 * .1^2) / 3
    assert "| **headline** | headline |  | 50.00 ± 5.97 | 43.00 ± 5.97 | -7.00 ± 8.45 | ≈86.0 (n.s.) |" in text
    assert "over the 3 informative task(s)" in text and "no task's floor is known here, so every task counts" in text
    assert "- counted (3): boolq, piqa, hellaswag" in text
    assert "| winogrande | acc | 20 | 55.00 ± 10.00 | — | — | — |" in text  # never made up
    assert "| perplexity wikitext2 (lower is better) | 20.000 | 30.000 | 1.500 | — |" in text
    assert "| parameters (total) | 1,500 | 1,300 | 0.867 | 86.7 |" in text
    assert "**Removed** (no new layer stands for them): 2" in text and "**Merged**: {3, 4}" in text
    assert "| 2 | 3–4 | merged |" in text
    assert "| prefill latency (ms) (lower is better) | 50.0 | 30.0 | 0.600 |" in text
    assert "in 0.50 s, peak memory 123.4 MiB" in text
    # the run's own row, nothing archived beside it (runs side by side: scripts/runs.py)
    experiments = text.split("## Experiments")[1].split("## Plots")[0]
    assert "| shortgpt-3L | tiny-test | shortgpt | 3 |" in experiments and experiments.count("\n| ") == 2


def test_summary_metric(repo):
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert summary["headline"] == 43.0 and summary["dense"] == 50.0 and summary["delta"] == -7.0 and summary["delta_se"] == 8.45
    assert summary["verdict"] == "within noise" and summary["retained"] == 86.0 and summary["n_tasks"] == 3
    assert (summary["retained_lo"], summary["retained_hi"]) == (round(100 * (1 + (-0.07 - 1.96 * 0.0845) / 0.5), 1),
                                                                  round(100 * (1 + (-0.07 + 1.96 * 0.0845) / 0.5), 1))
    assert summary["wiki2_ppl"] == 30.0 and summary["layers"] == 3 and summary["collapsed"] is False and summary["drift"] is None
    assert summary["tasks"] == ["boolq", "piqa", "hellaswag"] and summary["rule"] == "auto"


def test_plots_and_tables(repo):
    for name in ("similarity_heatmap", "layer_importance", "accuracy_vs_params"):
        data = (repo / f"reports/plots/{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    rows = json.loads((repo / "reports/tables/layer_importance.json").read_text())
    assert [(r["layer"], r["block_influence"], r["status"]) for r in rows] == [
        (0, 0.9, "kept"), (1, 0.1, "kept"), (2, 0.02, "removed"), (3, 0.05, "merged"), (4, 0.3, "merged")
    ]
    comparison = json.loads((repo / "reports/tables/comparison.json").read_text())["comparison"]
    hellaswag = next(r for r in comparison if r["name"] == "hellaswag")
    assert hellaswag["metric"] == "acc_norm" and hellaswag["retained_pct"] == pytest.approx(75.0)
    assert hellaswag["dense_acc"] == 0.35 and hellaswag["compressed_acc_norm"] == 0.30


def test_the_stage_writes_only_its_declared_outputs(repo):
    """Everything the stage wrote is a declared output (metric or out) of the report stage in dvc.yaml, or the
    git-ignored machine-local reports/timings.md; no archive of runs beside them."""
    import yaml

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]
    declared = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage["outs"] + stage["metrics"]]
    written = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
    inputs = [p for p in written if p in stage["deps"] or p == "params.yaml"]
    outside = [p for p in written if p not in inputs and p != "reports/timings.md"
               and not any(p == d or p.startswith(d + "/") for d in declared)]
    assert not outside, f"the report stage wrote files outside its declared outputs: {outside}"
    assert not (repo / "reports/experiments").exists()


def test_accuracy_points_dedupe_dense():
    run = {"dense": _metrics(5, DENSE_EVAL, 20.0, 50.0), "compressed": _metrics(3, COMPRESSED_EVAL, 30.0, 30.0)}
    points = accuracy_points([{"name": "a", **run}, {"name": "b", **copy.deepcopy(run)}])
    assert [p["name"] for p in points] == ["dense", "a", "b"]
    assert points[1]["average_acc"] == pytest.approx(0.43)  # tasks common to all: hellaswag, piqa, boolq


def test_without_lm_eval(tmp_path):
    dense, compressed = _metrics(5, None, 20.0, 50.0), _metrics(3, None, 30.0, 30.0)
    rows = comparison_table(dense, compressed)
    assert not [r for r in rows if r["section"] == "accuracy"]
    text = markdown_report(dense, compressed)
    assert "not run (no tasks configured)" in text and "No lm-eval results" in text
    accuracy_vs_params(accuracy_points([{"name": "x", "dense": dense, "compressed": compressed}]), tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC)


def test_committed_notebooks_carry_their_outputs():
    """Both notebooks are committed run (``python notebooks/execute.py``): every code cell executed, none failed, the
    plots in place."""
    for path, images in ((NOTEBOOK, 3), (REPO / "notebooks" / "reproduction.ipynb", 1)):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.execution_count is not None for c in code), f"{path.name}: run python notebooks/execute.py"
        outputs = [o for c in code for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], path.name
        assert sum("image/png" in o.get("data", {}) for o in outputs) >= images, path.name


def test_notebook_runs(repo, monkeypatch):
    monkeypatch.setenv("LAYERFOLD_ROOT", str(repo))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(repo)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    text = "".join(o.get("text", "") for o in outputs)
    # no DVC repository around the test's folder: the workspace run alone, and the notebook says why
    assert "1 run(s): ['workspace']" in text and "DVC lists no runs here" in text


def test_report_counts_only_informative_tasks_and_says_why(tmp_path, monkeypatch):
    """With the per-document outputs beside the metrics (each task's floor, each document's answers), the
    report and metrics/summary.json count only the tasks dense answers above chance and the majority class."""
    make_repo(tmp_path)
    strong = {"piqa": {"acc": 0.60, "acc_stderr": 0.01, "n": 2000}, "boolq": {"acc": 0.50, "acc_stderr": 0.01, "n": 2000}}
    weaker = {"piqa": {"acc": 0.55, "acc_stderr": 0.01, "n": 2000}, "boolq": {"acc": 0.62, "acc_stderr": 0.01, "n": 2000}}
    _write(tmp_path / "metrics/dense.json", _metrics(5, strong, 20.0, 50.0))
    _write(tmp_path / "metrics/compressed.json", _metrics(3, weaker, 300.0, 30.0))
    floors = {"piqa": {"n": 2000, "chance": 0.5, "majority": 0.51, "majority_class": "B"},
              "boolq": {"n": 2000, "chance": 0.5, "majority": 0.62, "majority_class": "yes"}}
    for name in ("dense", "compressed"):
        _write(tmp_path / f"metrics/documents/{name}.json", {"lm_eval": {t: {"answers": {"floor": f}} for t, f in floors.items()}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    report_stage.main()
    text = (tmp_path / "reports/report.md").read_text()
    assert "- counted (1): piqa" in text
    assert "- excluded: boolq: dense acc 50.00 % ± 1.00 % is not above its floor 62.00 % (majority class (yes);" in text
    assert "| **headline** | headline |  | 60.00 ± 1.00 | 55.00 ± 1.00 |" in text and "| boolq |" in text  # every task stays in the table
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert summary["tasks"] == ["piqa"] and summary["headline"] == 55.0 and summary["verdict"] == "behind"
    assert summary["collapsed"] is True  # WikiText-2 perplexity 300 > 10 x 20


def test_the_stage_ends_with_a_readable_last_screen(tmp_path, monkeypatch, capsys):
    """The last lines the report stage prints: model, method, layers, headline ± se and Δ ± se vs dense with the
    verdict, perplexities and where the report is, read from the metrics/summary.json it wrote, ≤ 100 columns."""
    make_repo(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    report_stage.main()
    screen = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert all(len(line) <= 100 for line in screen) and len(screen) <= 8
    assert screen[0] == "tiny-test · shortgpt · 5 → 3 layers (0.0 M parameters)"  # 1,300 parameters
    assert screen[1] == f"headline    {summary['headline']:.2f} ± {summary['se']:.2f} % (dense {summary['dense']:.2f} %)" \
        == "headline    43.00 ± 5.97 % (dense 50.00 %)"
    assert screen[2] == "vs dense    Δ -7.00 ± 8.45 points, within noise; retained 86.0 % " \
        f"[{summary['retained_lo']:.1f}, {summary['retained_hi']:.1f}]"
    assert screen[3] == "tasks       3 informative (auto rule): boolq, piqa, hellaswag"
    assert screen[4] == "perplexity  WikiText-2 30.00 (dense 20.00) · C4 —"
    assert screen[-1].startswith("report      reports/report.md (summary metrics/summary.json")


def test_last_screen_flags_collapse_and_drift_and_cuts_long_lines():
    from layerfold.report.screen import last_screen

    summary = {"headline": 30.0, "se": 1.0, "dense": 60.0, "delta": -30.0, "delta_se": 1.5, "verdict": "behind", "retained": 50.0,
               "retained_lo": 45.1, "retained_hi": 54.9, "rule": "fixed", "n_tasks": 9, "tasks": [f"task_number_{i}" for i in range(9)],
               "wiki2_ppl": 900.0, "c4_ppl": 800.0, "layers": 12, "params_m": 1.5, "train_tokens": 1000000, "collapsed": True, "drift": "boolq→yes"}
    screen = last_screen(summary, "m", "laco", 24, 20.0)
    assert all(len(line) <= 100 for line in screen) and screen[3].endswith("…")
    assert screen[0] == "m · laco · 24 → 12 layers (1.5 M parameters), recovered on 1,000,000 tokens"
    assert screen[2] == "vs dense    Δ -30.00 ± 1.50 points, behind; retained 50.0 % [45.1, 54.9]"
    assert "collapsed" in screen[5] and "answer drift boolq→yes" in screen[5]


def test_compression_line_says_where_machine_local_timings_are(tmp_path, monkeypatch):
    """compress.json without timings (they live in the git-ignored compress_time.json): no dashes, the file named."""
    from layerfold.report.markdown import compression_line

    plain = {"method": "shortgpt", "layers_before": 30, "layers_after": 22}
    line = compression_line(plain)
    assert line.startswith("shortgpt: 30 → 22 layers.") and "—" not in line and "`metrics/compress_time.json` (git-ignored)" in line
    partial = compression_line({**plain, "seconds": 12.345})
    assert partial.startswith("shortgpt: 30 → 22 layers in 12.35 s.") and "—" not in partial and "compress_time.json" in partial
    full = compression_line({**plain, "seconds": 1.0, "peak_memory_mib": 2.0, "device": "cpu"})
    assert full == "shortgpt: 30 → 22 layers in 1.00 s, peak memory 2.0 MiB on cpu."
    assert compression_line(None) == "metrics/compress.json not available."

    # the report stage: the committed report names the file, the machine-local timings.md holds its numbers
    make_repo(tmp_path)
    compress = json.loads((tmp_path / "metrics/compress.json").read_text())
    _write(tmp_path / "metrics/compress.json", {k: v for k, v in compress.items() if k not in ("seconds", "peak_memory_mib", "device")})
    _write(tmp_path / "metrics/compress_time.json", {"seconds": 0.5, "peak_memory_mib": 123.4, "device": "cpu (test)"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    report_stage.main()
    report = (tmp_path / "reports/report.md").read_text()
    assert "shortgpt: 5 → 3 layers. Wall time, peak memory and device are machine-local" in report and "— s" not in report
    assert "- **compress**: shortgpt: 5 → 3 layers in 0.50 s, peak memory 123.4 MiB on cpu (test)." in (tmp_path / "reports/timings.md").read_text()
