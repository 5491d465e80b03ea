"""Report of a run: dense vs compressed tables (``tables``), the Markdown report (``markdown`` and its
template), figures (``plots``), and the report stage's work as one call (``build``)."""

from layerfold.report.markdown import markdown_report
from layerfold.report.plots import accuracy_vs_params, layer_importance, save_png, similarity_heatmap
from layerfold.report.tables import (
    REPORTED_METRIC,
    TASK_ORDER,
    accuracy_points,
    average_accuracy,
    common_tasks,
    comparison_table,
    efficiency_speedup_rows,
    efficiency_table,
    experiment_name,
    experiments_table,
    load_run,
    reported_metric,
)

__all__ = [
    "REPORTED_METRIC",
    "TASK_ORDER",
    "accuracy_points",
    "accuracy_vs_params",
    "average_accuracy",
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
