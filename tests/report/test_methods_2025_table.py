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
# each committed results folder with the docs section generated from it: (folder, marker, with parity and cost)
COMMITTED = [(REPO / "results" / "methods_2025" / "smollm2-135m-q4_1_cpu", "methods_2025_table", True),
             (REPO / "results" / "methods_2025" / "smollm2-135m-q4_1_cpu_protocol", "methods_2025_protocol_table", False),
             (REPO / "results" / "methods_2025" / "smollm2-135m-q4_1_h100_protocol", "methods_2025_gpu_table", False)]
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
    line = table.reading(rows)[-1]  # the baseline's line against dense comes first
    assert "ahead of gromov" in line and "+10.00" in line
    rows = _runs(tmp_path / "b", _metrics(40.0, 0.40, stderr=0.1), _metrics(30.0, 0.41, stderr=0.1))  # +1 point, se ~5 points
    line = table.reading(rows)[-1]  # the baseline's line against dense comes first
    assert "within noise of gromov" in line
    rows = _runs(tmp_path / "c", _metrics(30.0, 0.50), _metrics(40.0, 0.40))
    assert "behind gromov" in table.reading(rows)[-1]


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


def _bits(values: list[int]) -> list[str]:
    return ["".join(str(v) for v in values)]


def _task_result(correct: list[int], chance: float, majority: float) -> dict:
    """One two-choice task's aggregates and per-document results, as ``evaluate`` stores them (merged form); the gold
    answer is choice 0 on the first half of the documents, 1 on the second."""
    n, acc = len(correct), sum(correct) / len(correct)
    gold = [0] * (n // 2) + [1] * (n - n // 2)
    chosen = [g if c else 1 - g for g, c in zip(gold, correct)]
    return {"acc": acc, "acc_stderr": (acc * (1 - acc) / (n - 1)) ** 0.5, "n": n, "per_doc": {"acc": _bits(correct)},
            "doc_ids": {"t": list(range(n))},
            "answers": {"chosen": {"acc": _bits(chosen)}, "gold": _bits(gold), "choices": _bits([2] * n), "labels": None,
                        "floor": {"n": n, "chance": chance, "majority": majority, "majority_class": "A"}}}


def test_protocol_headline_counts_the_informative_tasks_and_pairs_the_differences(tmp_path: Path) -> None:
    """With per-document results: the headline averages only the tasks dense answers above their floor, the differences
    are paired over the same documents, and the table says the perplexity covers the full test set."""
    n = 200
    dense_good = [1] * 160 + [0] * 40  # 80 % on a task with a 50 % floor: informative
    dense_floor = [1] * 100 + [0] * 100  # 50 %: at its floor, excluded
    worse = [1] * 120 + [0] * 80  # 60 %: 20 points below dense, every lost document one dense got right

    def metrics(ppl: float, good: list[int], other: list[int], layers: int = 22) -> tuple[dict, dict]:
        m = _metrics(ppl, layers=layers)
        m["perplexity"]["wikitext2"].update(windows=297, tokens_scored=304128, tokens_in_text=304986, seq_len=1024)
        lm = {"piqa": _task_result(good, 0.5, 0.5), "boolq_notitle": _task_result(other, 0.5, 0.5)}
        m["lm_eval"] = {t: {k: v for k, v in r.items() if k in ("acc", "acc_stderr", "n")} for t, r in lm.items()}
        m["lm_eval_settings"] = {"sampling": "seeded random subset", "limit": n, "seed": 0}
        documents = {"lm_eval": {t: {k: v for k, v in r.items() if k in ("per_doc", "doc_ids", "answers")} for t, r in lm.items()}}
        return m, documents

    params = {"eval": {"lm_eval": {"tasks": ["piqa", "boolq_notitle"]}, "headline": {"tasks": "auto"},
                       "perplexity": {"max_windows": None}}}
    for name, (m, docs), run_params, plan in (
            ("dense", metrics(10.0, dense_good, dense_floor, layers=30), {**params, "method": {"name": "gromov"}}, None),
            ("gromov", metrics(40.0, worse, dense_floor), {**params, "method": {"name": "gromov"}}, {"removed": [3], "merged": []}),
            ("gromov_compensateprune_comp", metrics(30.0, dense_good, [1] * 200),
             {**params, "method": {"name": "gromov"}, "compensate": {"name": "prune_comp"}}, {"removed": [3], "merged": []})):
        _write(tmp_path, name, m, run_params, plan)
        (tmp_path / name / "documents.json").write_text(json.dumps(docs))
    built = table.build(table.load(tmp_path))
    assert built["protocol"]["tasks"] == ["piqa"] and [e["task"] for e in built["protocol"]["excluded"]] == ["boolq_notitle"]
    rows = {r["run"]: r for r in built["rows"]}
    gromov = rows["gromov"]["protocol"]
    assert gromov["headline"] == pytest.approx(0.6)
    # paired: 40 documents lost, none gained -> se = sd(d) / sqrt(n) with d = -1 on 40 of 200 documents
    d = [-1] * 40 + [0] * 160
    mean = sum(d) / n
    assert gromov["vs_dense"]["diff"] == pytest.approx(-0.2)
    assert gromov["vs_dense"]["se"] == pytest.approx((sum((x - mean) ** 2 for x in d) / (n - 1) / n) ** 0.5)
    assert gromov["vs_dense"]["paired"] and gromov["vs_dense"]["verdict"] == "behind"
    compensated = rows["gromov_compensateprune_comp"]["protocol"]
    # BoolQ's answers went from all "A" to half "B" (every document right): excluded from the headline, flagged as drift
    assert compensated["vs_dense"]["verdict"] == "within noise" and compensated["vs_baseline"]["verdict"] == "ahead"
    assert compensated["drift"].startswith("drift: boolq_notitle")
    baseline_line, line = table.reading(built["rows"])
    assert baseline_line.startswith("- **gromov** is behind dense on the headline: -20.00 ± ") and "retains 75.0 %" in baseline_line
    assert "is ahead of gromov on the headline: +20.00" in line and "paired" in line and "x0.750" in line
    text = table.markdown(built, tmp_path)
    assert "the full test set: every non-overlapping 1024-token window (297 windows" in text
    assert "not the full test set" in table.markdown({**built, "perplexity_max_windows": 32}, tmp_path)
    assert "| gromov | gromov | 22 | 40.00 | 4.00 | 60.00 ± " in text and "| behind |" in text


@pytest.mark.parametrize(("results", "marker", "extras"), COMMITTED, ids=[c[0].name for c in COMMITTED])
def test_committed_table_and_docs_are_generated_from_the_committed_results(monkeypatch: pytest.MonkeyPatch, results: Path,
                                                                          marker: str, extras: bool) -> None:
    built = table.from_folder(results)
    assert json.loads((results / "table.json").read_text()) == json.loads(json.dumps(built))
    assert (results / "table.md").read_text() == table.markdown(built, results)
    docs = (REPO / "docs" / "methods_2025.md").read_text(encoding="utf-8")
    monkeypatch.chdir(REPO)  # the section names its sources relative to the repository
    section = table.docs_section(built, *((Path("results/parity"), Path("benchmarks/results")) if extras else (None, None)),
                                 marker=marker)
    assert section in docs, f"docs/methods_2025.md is stale: rerun scripts/methods_2025_table.py {results.name} ... --docs"
    # every run of the table is a 30 -> 22 comparison on one protocol: the same calibration and evaluation settings
    params = [yaml.safe_load((path / "params.yaml").read_text()) for path in results.iterdir() if (path / "params.yaml").exists()]
    assert {json.dumps([p["data"], p["eval"]], sort_keys=True) for p in params} == {json.dumps([params[0]["data"], params[0]["eval"]], sort_keys=True)}
    assert {r["layers"] for r in built["rows"] if r["run"] != "dense"} == {22}


def _seeded(accuracy: float, seed: int, ppl: float) -> dict:
    metrics = _metrics(ppl, accuracy)
    metrics["lm_eval_settings"] = {"sampling": "seeded", "limit": 10, "seed": seed}
    return metrics


def test_healed_runs_pair_with_their_compressed_model_and_seeds_give_a_spread(tmp_path: Path) -> None:
    """A recovery folder gives a compressed and a healed run; the healed one is paired with the compressed model before
    healing, seed folders (``_seed<k>``) join it, and the spread over seeds names a document sample that moved."""
    _write(tmp_path, "dense", _metrics(10.0, 0.6, layers=30), {"method": {"name": "drop_last"}})
    healed_params = {"method": {"name": "drop_last"}, "recovery": {"name": "lm", "trainable": "last", "last_layers": 3,
                                                                   "end_to_end": {"lm_weight": 1.0, "kd_weight": 0.0}}}
    plan = {"removed": [3, 4], "merged": []}
    _write(tmp_path, "recipe", _metrics(1e6, 0.30), {**healed_params, "runtime": {"seed": 0}}, plan)
    (tmp_path / "recipe" / "recovered.json").write_text(json.dumps(_seeded(0.40, 0, 30.0)))
    for seed, accuracy in ((1, 0.44), (2, 0.42)):
        folder = tmp_path / f"recipe_seed{seed}"
        folder.mkdir()
        (folder / "params.yaml").write_text(yaml.safe_dump({**healed_params, "runtime": {"seed": seed}}))
        (folder / "plan.json").write_text(json.dumps(plan))
        (folder / "recovered.json").write_text(json.dumps(_seeded(accuracy, seed, 31.0)))
    built = table.build(table.load(tmp_path))
    rows = {r["run"]: r for r in built["rows"]}
    assert set(rows) == {"dense", "recipe", "recipe (healed)", "recipe_seed1 (healed)", "recipe_seed2 (healed)"}
    assert rows["recipe_seed2 (healed)"]["protocol"]["vs_baseline"]["against"] == "recipe"
    assert abs(rows["recipe (healed)"]["protocol"]["vs_baseline"]["diff"] - 0.10) < 1e-9
    assert "healed (lm: lm_head + last 3 layers, LM loss, seed 1)" in rows["recipe_seed1 (healed)"]["label"]
    [group] = built["seeds"]
    assert group["n"] == 3 and group["seeds"] == [0, 1, 2]
    assert abs(group["headline_mean"] - 0.42) < 1e-9 and abs(group["headline_sd"] - 0.02) < 1e-9
    text = table.markdown(built, tmp_path)
    assert "different document samples (sample seeds 0, 1, 2)" in text


def test_replaceme_stability_sentence_matches_its_results() -> None:
    """The docs' sentence on ReplaceMe over calibration draws cites its generated results."""
    summary = json.loads((REPO / "results" / "calibration_stability" / "smollm2-135m-q4_1_cpu_2025" / "replaceme.json").read_text())["summary"]
    docs = " ".join((REPO / "docs" / "methods_2025.md").read_text(encoding="utf-8").split())
    assert summary["draws"] == 5 and summary["distinct_sets"] == 1
    assert f"mean Jaccard {summary['mean_jaccard']:.2f} against a chance of {summary['chance_jaccard']:.2f}" in docs
