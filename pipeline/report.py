"""Stage `report`: dense-vs-compressed tables, figures, a Markdown report and the run's summary metric.

    dvc repro report    # params: report, eval.headline  ->  metrics/summary.json, reports/report.md,
                        #                                    reports/plots/*.png, reports/tables/*.json

Inputs are the JSON files of earlier stages (metrics/{dense,compressed,compress}.json with their
per-document outputs metrics/documents/*.json, artifacts/capture/stats.json,
artifacts/compressed/plan.json, and metrics/recovered.json and metrics/recover.json when a recovery
ran); nothing is recomputed. Every accuracy difference carries its standard error. The headline is the
mean over the informative tasks (:mod:`layerfold.report.protocol`, ``eval.headline.tasks``), and
``metrics/summary.json`` holds it for ``dvc exp show``. Timings and the device (the evaluate stages'
git-ignored ``metrics/timings/`` files) go to ``reports/timings.md``, git-ignored too, so that the
committed report does not change when only the clock does.

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
from typing import Any

from layerfold.io import atomic_dir, atomic_file, read_json, write_json
from layerfold.report import (
    accuracy_points,
    accuracy_vs_params,
    archive_run,
    collect_experiments,
    common_tasks,
    comparison_table,
    experiment_name,
    experiments_table,
    layer_importance,
    load_run,
    markdown_report,
    similarity_heatmap,
)
from layerfold.report.protocol import run_drift, summary, wikitext2_ppl
from layerfold.report.reader import run_headline
from layerfold.report.screen import last_screen
from layerfold.report.reported import markdown_section as reported_section
from layerfold.report.tables import COMPRESS_TIMINGS, RUN_FILES, compression_line, efficiency_section, final_metrics
from layerfold.stage import METRICS, REPORTS, start

TIMINGS_DIR = METRICS / "timings"  # written by the evaluate stages (pipeline/evaluate.py)
SUMMARY = METRICS / "summary.json"  # the run's headline numbers: a DVC metric (dvc exp show, --sort-by)
TIMINGS_REPORT = REPORTS / "timings.md"  # machine-local (git-ignored): efficiency, device, wall times

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
               protocol: Mapping | None = None, headline_tasks: Any = "auto") -> dict:
    """Archive the run under ``root`` into ``experiments_dir``, then write ``root/reports/`` and
    ``root/metrics/summary.json``.

    ``protocol`` is a paper preset's ``protocol`` block: the report then ends with measured beside reported.
    ``headline_tasks`` is ``eval.headline.tasks`` (``auto`` or a list of task names).

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
    final = final_metrics(run)
    evaluated = common_tasks([run])
    decision = run_headline(run, headline_tasks)["decision"]
    drift = {label: run_drift(run["dense"], run[label], evaluated) for label in ("compressed", "recovered") if run.get(label)}
    write_json(root / SUMMARY, summary(run["dense"], final, decision, run.get("recover"), drift.get("recovered") or drift.get("compressed")))

    reports = root / REPORTS
    with atomic_dir(reports / "plots") as tmp:
        similarity_heatmap(stats["cosine"], tmp / PLOTS["Mean cosine between layer boundaries"])
        layer_importance(stats["block_influence"], plan.get("removed", []), tmp / PLOTS["Block influence per layer"], merged=plan.get("merged"))
        tasks = [t for t in common_tasks(runs) if t in decision["tasks"]]
        title = f"Headline accuracy over {len(tasks)} informative task(s) vs size, {len(runs)} experiment(s)" if tasks else None
        accuracy_vs_params(accuracy_points(runs, tasks=decision["tasks"]), tmp / PLOTS["Accuracy vs parameters across experiments"],
                           title=title)

    removed, merged = set(plan.get("removed", [])), {i for g in plan.get("merged", []) for i in g}
    importance = [
        {"layer": i, "block_influence": float(v), "status": "removed" if i in removed else "merged" if i in merged else "kept"}
        for i, v in enumerate(stats["block_influence"])
    ]
    experiments = experiments_table(runs, setting=headline_tasks)  # each run's own headline (layerfold.report.reader)
    with atomic_dir(reports / "tables") as tmp:
        write_json(tmp / "layer_importance.json", importance)
        write_json(tmp / "comparison.json", {
            "headline": {k: decision[k] for k in ("rule", "text", "tasks", "excluded", "decisions")},
            "drift": drift,
            "comparison": comparison_table(run["dense"], run["compressed"], decision["tasks"]),
            **({"recovered": comparison_table(run["dense"], run["recovered"], decision["tasks"])} if run.get("recovered") else {}),
            "experiments": experiments,
        })
    _timings_report(root, reports, run)

    text = markdown_report(
        run["dense"], run["compressed"], run["compress"], plan, stats, model_name,
        plots={caption: f"plots/{file}" for caption, file in PLOTS.items()}, experiments=experiments,
        recovered=run.get("recovered"), decision=decision, drift=drift,
    )
    preset = reported_section(protocol, run["dense"], run.get("recovered") or run["compressed"], plan)
    if preset:
        text = text.rstrip("\n") + "\n\n" + "\n".join(preset)
    with atomic_file(reports / "report.md") as handle:
        handle.write(text)
    logging.info("wrote %s; archived as %s/%s (%d experiments)", reports / "report.md", experiments_dir, run["name"], len(runs))
    return run


def _timings_report(root: Path, reports: Path, run: dict) -> None:
    """``reports/timings.md`` from the evaluate stages' machine-local files (when they are there): the
    efficiency tables, the device, library versions and wall times, kept out of the committed report."""
    experiment = os.environ.get("DVC_EXP_NAME")  # as layerfold.checkpoint_evaluation.timings_file places them
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


def print_last_screen(root: Path, run: dict, model_name: str | None) -> None:
    """The run in a few lines on stdout, read back from ``metrics/summary.json`` (the numbers dvc exp show lists)."""
    dense = run.get("dense") or {}
    lines = last_screen(read_json(root / SUMMARY), model_name, (run.get("compress") or {}).get("method"),
                        (dense.get("model") or {}).get("num_layers"), wikitext2_ppl(dense),
                        report=str(REPORTS / "report.md"), summary_path=str(SUMMARY))
    print("\n".join(["", *lines]), flush=True)


def main() -> None:
    stage = start("report")
    root = Path.cwd()
    run = run_report(root, experiments_root(stage.params.report.experiments_dir, root), stage.params.model.name,
                     protocol=stage.params.get("protocol"), headline_tasks=_plain(stage.params.eval.headline.tasks))
    print_last_screen(root, run, stage.params.model.name)


def _plain(value: Any) -> Any:
    """An OmegaConf value as plain Python (a ListConfig of task names -> list)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


if __name__ == "__main__":
    main()
