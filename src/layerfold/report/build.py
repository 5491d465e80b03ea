"""The report stage's work in one call: read the earlier stages' JSON, write ``reports/`` (the Markdown
report, its plots and tables), ``metrics/summary.json`` and the machine-local ``reports/timings.md``.

Only the stage's declared outputs are written (and the git-ignored timings report): a run lives in DVC's
experiments (or a ``scripts/run_methods.py`` folder), and ``scripts/runs.py`` reads them side by side.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerfold.io import atomic_dir, atomic_file, read_json, write_json
from layerfold.report.markdown import COMPRESS_TIMINGS, compression_line, efficiency_section, markdown_report
from layerfold.report.plots import accuracy_vs_params, layer_importance, loss_curve, perplexity_bars, similarity_heatmap
from layerfold.report.protocol import run_drift, summary, wikitext2_ppl
from layerfold.report.reader import run_headline
from layerfold.report.reported import markdown_section as reported_section
from layerfold.report.screen import last_screen
from layerfold.report.tables import (
    RUN_FILES, accuracy_points, common_tasks, comparison_table, experiment_name, experiments_table, final_metrics, load_run,
)
from layerfold.stage import METRICS, REPORTS

TIMINGS_DIR = METRICS / "timings"  # written by the evaluate stages (pipeline/evaluate.py)
SUMMARY = METRICS / "summary.json"  # the run's headline numbers: a DVC metric (dvc exp show, --sort-by)
REPORT = REPORTS / "report.md"
TIMINGS_REPORT = REPORTS / "timings.md"  # machine-local (git-ignored): efficiency, device, wall times

PLOTS = {
    "Mean cosine between layer boundaries": "similarity_heatmap.png",
    "Block influence per layer": "layer_importance.png",
    "Accuracy vs parameters across experiments": "accuracy_vs_params.png",
    "Perplexity per model": "perplexity.png",
    "Recovery loss per step": "recovery_curve.png",
}
RECOVER_CURVE = METRICS / "recover_curve.csv"  # written by recover (a header only with recovery=none)
PRODUCED_BY = {"dense": "evaluate@dense", "compressed": "evaluate@compressed", "compress": "compress", "plan": "compress", "stats": "capture"}


def write_report(root: str | Path, model_name: str | None = None, exp_name: str | None = None, protocol: Mapping | None = None,
                 headline_tasks: Any = "auto") -> dict:
    """Write ``root/reports/`` and ``root/metrics/summary.json`` from the stage outputs under ``root``.

    ``protocol`` is a paper preset's ``protocol`` block: the report then ends with measured beside reported.
    ``headline_tasks`` is ``eval.headline.tasks`` (``auto`` or a list of task names). ``exp_name`` names the
    run in the report's experiment row (default :func:`layerfold.report.tables.experiment_name`).

    Returns the loaded run (:func:`layerfold.report.tables.load_run`) with ``name`` set.
    """
    root = Path(root)
    run = load_run(root)
    missing = [f"{RUN_FILES[k]} (dvc repro {PRODUCED_BY[k]})" for k in RUN_FILES if run[k] is None]
    if missing:
        raise FileNotFoundError("report needs the outputs of earlier stages; missing: " + ", ".join(missing))
    run["name"] = exp_name or experiment_name(run)
    run["meta"] = {"model": model_name}
    plan, stats = run["plan"], run["stats"]
    decision = run_headline(run, headline_tasks)["decision"]
    drift = {label: run_drift(run["dense"], run[label], common_tasks([run])) for label in ("compressed", "recovered") if run.get(label)}
    write_json(root / SUMMARY, summary(run["dense"], final_metrics(run), decision, run.get("recover"),
                                       drift.get("recovered") or drift.get("compressed")))

    reports = root / REPORTS
    with atomic_dir(reports / "plots") as tmp:
        similarity_heatmap(stats["cosine"], tmp / PLOTS["Mean cosine between layer boundaries"])
        layer_importance(stats["block_influence"], plan.get("removed", []), tmp / PLOTS["Block influence per layer"], merged=plan.get("merged"))
        tasks = [t for t in common_tasks([run]) if t in decision["tasks"]]
        title = f"Headline accuracy over {len(tasks)} informative task(s) vs size, 1 experiment(s)" if tasks else None
        accuracy_vs_params(accuracy_points([run], tasks=decision["tasks"]), tmp / PLOTS["Accuracy vs parameters across experiments"],
                           title=title)
        perplexity_bars({label: {d: v["perplexity"] for d, v in (run[label] or {}).get("perplexity", {}).items()}
                         for label in ("dense", "compressed", "recovered") if run.get(label)},
                        tmp / PLOTS["Perplexity per model"])
        curve = root / RECOVER_CURVE
        loss_curve(list(csv.DictReader(curve.open())) if curve.exists() else [], tmp / PLOTS["Recovery loss per step"])

    experiments = experiments_table([run], setting=headline_tasks)  # the run's own headline (layerfold.report.reader)
    with atomic_dir(reports / "tables") as tmp:
        write_json(tmp / "layer_importance.json", layer_rows(plan, stats))
        write_json(tmp / "comparison.json", {
            "headline": {k: decision[k] for k in ("rule", "text", "tasks", "excluded", "decisions")},
            "drift": drift,
            "comparison": comparison_table(run["dense"], run["compressed"], decision["tasks"]),
            **({"recovered": comparison_table(run["dense"], run["recovered"], decision["tasks"])} if run.get("recovered") else {}),
            "experiments": experiments,
        })
    write_timings_report(root, run)

    text = markdown_report(
        run["dense"], run["compressed"], run["compress"], plan, stats, model_name,
        plots={caption: f"plots/{file}" for caption, file in PLOTS.items()}, experiments=experiments,
        recovered=run.get("recovered"), decision=decision, drift=drift,
    )
    preset = reported_section(protocol, run["dense"], run.get("recovered") or run["compressed"], plan)
    if preset:
        text = text.rstrip("\n") + "\n\n" + "\n".join(preset)
    with atomic_file(root / REPORT) as handle:
        handle.write(text)
    logging.info("wrote %s", root / REPORT)
    return run


def layer_rows(plan: Mapping[str, Any], stats: Mapping[str, Any]) -> list[dict]:
    """``reports/tables/layer_importance.json``: each original layer's block influence and what the plan did with it."""
    removed, merged = set(plan.get("removed", [])), {i for g in plan.get("merged", []) for i in g}
    return [{"layer": i, "block_influence": float(v), "status": "removed" if i in removed else "merged" if i in merged else "kept"}
            for i, v in enumerate(stats["block_influence"])]


def write_timings_report(root: Path, run: dict) -> None:
    """``reports/timings.md`` from the evaluate stages' machine-local files (when they are there): the
    efficiency tables, the device, library versions and wall times, kept out of the committed report."""
    experiment = os.environ.get("DVC_EXP_NAME")  # as pipeline.evaluate.timings_file places them
    folder = Path(os.environ.get("DVC_ROOT") or root) / TIMINGS_DIR / experiment if experiment else root / TIMINGS_DIR
    machine = {k: read_json(folder / f"evaluate-{k}.json") for k in ("dense", "compressed", "recovered")
               if (folder / f"evaluate-{k}.json").is_file()}
    compress_time = read_json(root / COMPRESS_TIMINGS) if (root / COMPRESS_TIMINGS).is_file() else None
    if not machine and not compress_time:
        return
    dense, compressed = machine.get("dense") or {}, machine.get("compressed") or {}
    lines = ["# Timings and machine (machine-local, not committed)", ""]
    if compress_time:  # the compress stage's own file (the report's "Compression run" line points here)
        lines += [f"- **compress**: {compression_line({**(run.get('compress') or {}), **compress_time})}", ""]
    for name, facts in machine.items():
        lines.append(f"- **{name}**: {facts.get('device') or '—'}; versions {facts.get('versions') or '—'}; wall time (s) {facts.get('wall_time') or '—'}")
    lines.append("")
    lines += efficiency_section(dense, compressed)
    with atomic_file(root / TIMINGS_REPORT) as handle:
        handle.write("\n".join(lines))


def last_screen_lines(root: str | Path, run: dict, model_name: str | None) -> list[str]:
    """The run in a few lines, read back from ``metrics/summary.json`` (the numbers dvc exp show lists)."""
    dense = run.get("dense") or {}
    return last_screen(read_json(Path(root) / SUMMARY), model_name, (run.get("compress") or {}).get("method"),
                       (dense.get("model") or {}).get("num_layers"), wikitext2_ppl(dense),
                       report=str(REPORT), summary_path=str(SUMMARY))
