"""One run's headline numbers, the same wherever the run is read.

The report stage (``metrics/summary.json``, the report's "Experiments" row) and every subcommand of
``scripts/runs.py`` (``list``, ``table``, ``pairs``, ``collect``/``recompute``) take a run's
headline ± se and its difference to dense ± se from :func:`run_headline`: the informative tasks are
decided from *that run's* dense model over the tasks *that run* evaluated
(:func:`layerfold.report.protocol.informative_tasks`), so a run's numbers do not move with the other
runs listed beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layerfold.report.protocol import headline, headline_difference, informative_tasks
from layerfold.report.tables import common_tasks, final_metrics


def run_headline(run: Mapping[str, Any], setting: Any = "auto", facts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The headline of a run (``{dense, compressed, recovered}`` metrics dicts; the final model is the
    recovered one where a recovery ran) against its own dense model.

    ``setting`` is ``eval.headline.tasks`` (``"auto"`` or a list of task names); ``facts`` the per-task
    floors for results that carry no answers. Returns ``{decision, tasks, headline, se, dense, dense_se,
    diff, diff_se, paired, significant, verdict, retained_pct, low, high}`` (fractions, not percent).
    """
    dense, final = run.get("dense") or {}, final_metrics(dict(run))
    decision = informative_tasks(dense, common_tasks([dict(run)]), setting, facts)
    tasks = decision["tasks"]
    mine, base = headline(final, tasks), headline(dense, tasks)
    diff = headline_difference(final, dense, tasks)
    return {"decision": decision, "tasks": list(tasks), "headline": mine["value"], "se": mine["se"],
            "dense": base["value"], "dense_se": base["se"], "diff": diff["diff"], "diff_se": diff["se"],
            "paired": diff["paired"], "significant": diff["significant"], "verdict": diff["verdict"],
            "retained_pct": diff["retained_pct"], "low": diff["low"], "high": diff["high"]}
