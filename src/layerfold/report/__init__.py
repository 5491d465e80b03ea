"""Report of a run (dense vs compressed tables, Markdown, figures) and the archive of finished experiments."""

from layerfold.report.plots import accuracy_vs_params, layer_importance, save_png, similarity_heatmap
from layerfold.report.tables import (
    REPORTED_METRIC,
    TASK_ORDER,
    accuracy_points,
    archive_run,
    average_accuracy,
    collect_experiments,
    common_tasks,
    comparison_table,
    efficiency_speedup_rows,
    efficiency_table,
    experiment_name,
    experiments_table,
    load_run,
    markdown_report,
    reported_metric,
)

__all__ = [
    "REPORTED_METRIC",
    "TASK_ORDER",
    "accuracy_points",
    "accuracy_vs_params",
    "archive_run",
    "average_accuracy",
    "collect_experiments",
    "common_tasks",
    "comparison_table",
    "efficiency_speedup_rows",
    "efficiency_table",
    "experiment_name",
    "experiments_table",
    "layer_importance",
    "load_run",
    "markdown_report",
    "reported_metric",
    "save_png",
    "similarity_heatmap",
]
