"""Stage `report`: dense-vs-compressed tables, figures, a Markdown report and the run's summary metric.

    dvc repro report    # params: protocol, eval.headline  ->  metrics/summary.json, reports/report.md,
                        #                                      reports/plots/*.png, reports/tables/*.json

Inputs are the JSON files of earlier stages (metrics/{dense,compressed,compress}.json with their
per-document outputs metrics/documents/*.json, artifacts/capture/stats.json,
artifacts/compressed/plan.json, and metrics/recovered.json and metrics/recover.json when a recovery
ran); nothing is recomputed. Every accuracy difference carries its standard error. The headline is the
mean over the informative tasks (:mod:`layerfold.report.protocol`, ``eval.headline.tasks``), and
``metrics/summary.json`` holds it for ``dvc exp show``. Timings and the device (the evaluate stages'
git-ignored ``metrics/timings/`` files) go to ``reports/timings.md``, git-ignored too, so that the
committed report does not change when only the clock does.

The stage writes its declared outputs only; runs side by side: ``python scripts/runs.py list --dvc``.
The work is :func:`layerfold.report.build.write_report`; the report's layout is
``src/layerfold/report/templates/report.md.j2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerfold.report.build import last_screen_lines, write_report
from layerfold.stage import start


def main() -> None:
    stage = start("report")
    root = Path.cwd()
    run = write_report(root, stage.params.model.name, protocol=stage.params.get("protocol"),
                       headline_tasks=_plain(stage.params.eval.headline.tasks))
    print("\n".join(["", *last_screen_lines(root, run, stage.params.model.name)]), flush=True)


def _plain(value: Any) -> Any:
    """An OmegaConf value as plain Python (a ListConfig of task names -> list)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


if __name__ == "__main__":
    main()
