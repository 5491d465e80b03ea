"""Stage `report`: dense-vs-compressed tables, figures and a Markdown report of the current run.

    dvc repro report    # params: report  ->  reports/report.md, reports/plots/*.png, reports/tables/*.json

Inputs are the JSON files of earlier stages (metrics/{dense,compressed,compress}.json,
artifacts/capture/stats.json, artifacts/compressed/plan.json, and metrics/recovered.json when a
recovery ran); nothing is recomputed. Every accuracy difference carries its standard error.

Experiment archive (``report.experiments_dir``, default reports/experiments/): every run copies its
small JSON files (metrics + plan, a few KB) to ``<experiments_dir>/<name>/``, where ``name`` is
``$DVC_EXP_NAME`` under ``dvc exp run`` and ``<method>-<layers>L`` otherwise (a rerun with the same
name replaces its copy). The accuracy-vs-parameters plot and the "Experiments" table read every run
archived there, so results accumulate across ``dvc exp run``s. The folder is deliberately *not* a DVC
out (DVC deletes outs before a stage runs, and each experiment would own only its own copy): it is a
plain folder meant to be committed to git like any small results file. A relative path is resolved
against ``$DVC_ROOT``, which DVC sets to the main workspace even for ``--temp``/``--queue`` runs, so
queued experiments archive into the same folder. It is not a declared dep either, so the report only
refreshes its cross-experiment plot when this stage reruns (``dvc repro -f report``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from layerfold.io import atomic_dir, atomic_file, write_json
from layerfold.report import (
    accuracy_points,
    accuracy_vs_params,
    archive_run,
    collect_experiments,
    common_tasks,
    comparison_table,
    efficiency_speedup_rows,
    efficiency_table,
    experiment_name,
    experiments_table,
    layer_importance,
    load_run,
    markdown_report,
    similarity_heatmap,
)
from layerfold.report.reported import markdown_section as reported_section
from layerfold.report.tables import RUN_FILES
from layerfold.stage import REPORTS, start

PLOTS = {
    "Mean cosine between layer boundaries": "similarity_heatmap.png",
    "Block influence per layer": "layer_importance.png",
    "Accuracy vs parameters across experiments": "accuracy_vs_params.png",
}
PRODUCED_BY = {"dense": "evaluate@dense", "compressed": "evaluate@compressed", "compress": "compress", "plan": "compress", "stats": "capture"}


def experiments_root(configured: str | Path, root: Path) -> Path:
    """``report.experiments_dir``; a relative path is taken from ``$DVC_ROOT`` (else ``root``)."""
    path = Path(configured)
    return path if path.is_absolute() else Path(os.environ.get("DVC_ROOT") or root) / path


def run_report(root: str | Path, experiments_dir: str | Path, model_name: str | None = None, exp_name: str | None = None,
               protocol: Mapping | None = None) -> dict:
    """Archive the run under ``root`` into ``experiments_dir``, then write ``root/reports/``.

    ``protocol`` is a paper preset's ``protocol`` block: the report then ends with measured beside reported.

    Returns the loaded run (``layerfold.report.load_run``) with ``name`` set to the archive name.
    """
    root = Path(root)
    run = load_run(root)
    missing = [f"{RUN_FILES[k]} (dvc repro {PRODUCED_BY[k]})" for k in RUN_FILES if run[k] is None]
    if missing:
        raise FileNotFoundError("report needs the outputs of earlier stages; missing: " + ", ".join(missing))
    run["name"] = exp_name or experiment_name(run)
    run["meta"] = {"model": model_name}
    archive_run(run, experiments_dir, run["name"])
    runs = collect_experiments(experiments_dir, current=run)
    plan, stats = run["plan"], run["stats"]

    reports = root / REPORTS
    with atomic_dir(reports / "plots") as tmp:
        similarity_heatmap(stats["cosine"], tmp / PLOTS["Mean cosine between layer boundaries"])
        layer_importance(stats["block_influence"], plan.get("removed", []), tmp / PLOTS["Block influence per layer"], merged=plan.get("merged"))
        tasks = common_tasks(runs)
        title = f"Average accuracy over {len(tasks)} task(s) vs size, {len(runs)} experiment(s)" if tasks else None
        accuracy_vs_params(accuracy_points(runs), tmp / PLOTS["Accuracy vs parameters across experiments"], title=title)

    removed, merged = set(plan.get("removed", [])), {i for g in plan.get("merged", []) for i in g}
    importance = [
        {"layer": i, "block_influence": float(v), "status": "removed" if i in removed else "merged" if i in merged else "kept"}
        for i, v in enumerate(stats["block_influence"])
    ]
    experiments = experiments_table(runs)
    with atomic_dir(reports / "tables") as tmp:
        write_json(tmp / "layer_importance.json", importance)
        write_json(tmp / "comparison.json", {
            "comparison": comparison_table(run["dense"], run["compressed"]),
            **({"recovered": comparison_table(run["dense"], run["recovered"])} if run.get("recovered") else {}),
            "efficiency": efficiency_table(run["dense"], run["compressed"]),
            "efficiency_speedups": efficiency_speedup_rows(run["dense"], run["compressed"]),  # unpaired: separate runs
            "experiments": experiments,
        })

    text = markdown_report(
        run["dense"], run["compressed"], run["compress"], plan, stats, model_name,
        plots={caption: f"plots/{file}" for caption, file in PLOTS.items()}, experiments=experiments,
        recovered=run.get("recovered"),
    )
    preset = reported_section(protocol, run["dense"], run.get("recovered") or run["compressed"], plan)
    if preset:
        text = text.rstrip("\n") + "\n\n" + "\n".join(preset)
    with atomic_file(reports / "report.md") as handle:
        handle.write(text)
    logging.info("wrote %s; archived as %s/%s (%d experiments)", reports / "report.md", experiments_dir, run["name"], len(runs))
    return run


def main() -> None:
    stage = start("report")
    root = Path.cwd()
    run_report(root, experiments_root(stage.params.report.experiments_dir, root), stage.params.model.name,
               protocol=stage.params.get("protocol"))


if __name__ == "__main__":
    main()
