"""One line per run, narrow enough for a 120-column terminal (``scripts/runs.py list``): model, method,
layers, perplexities, the run's own headline ± se, its difference to dense ± se, collapse/drift flags,
under the headline rule, printed first."""

from __future__ import annotations

from typing import Any

from layerfold.report.tables import common_tasks, experiments_table, final_metrics, fmt

# (header, width, right-aligned); widths and separators sum to 120 columns
COLUMNS = [("experiment", 20, False), ("model", 20, False), ("method", 12, False), ("L", 5, True), ("wiki2 PPL", 9, True),
           ("c4 PPL", 9, True), ("headline %", 12, True), ("Δ vs dense", 12, True), ("flags", 5, False)]
LEGEND = "headline: mean over the informative tasks ± se; Δ: final − dense ± se, * beyond 1.96 se; flags: C collapsed, D drift"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _acc(value: Any, se: Any) -> str:
    v = fmt(value, ".4f")
    return v if v == "—" else f"{100 * value:.2f}" + ("" if se is None else f"±{100 * se:.2f}")


def format_rows(runs: list[dict], headline_tasks: Any = "auto") -> list[str]:
    """The table as lines of at most 120 characters: the headline rule (decided from the first run's dense
    model, :mod:`layerfold.report.protocol`), header, rule, one line per run, legend."""
    from layerfold.report.protocol import collapsed, informative_tasks, rule_line, run_drift, wikitext2_ppl

    tasks = common_tasks(runs)
    decision = informative_tasks((runs[0].get("dense") or {}) if runs else {}, tasks, headline_tasks)
    rows = experiments_table(runs, setting=headline_tasks)  # each run's own headline: the report's numbers
    cells = []
    for run, r in zip(runs, rows):
        final = final_metrics(run)
        flags = ("C" if collapsed(wikitext2_ppl(final), wikitext2_ppl(run.get("dense"))) else "") + \
                ("D" if run_drift(run.get("dense"), final, tasks)["drifted"] else "")
        dense_layers = fmt(r["dense_layers"], ".0f")
        layers = fmt(r["layers"], ".0f") if dense_layers == "—" else f"{dense_layers}→{fmt(r['layers'], '.0f')}"
        diff = "—" if r["diff"] is None else f"{100 * r['diff']:+.2f}" + ("" if r["diff_se"] is None else f"±{100 * r['diff_se']:.2f}") + ("*" if r["significant"] else "")
        cells.append([r["experiment"], r.get("model") or "—", (r["method"] or "—") + ("+rec" if r.get("recovered") else ""), layers,
                      fmt(r["wikitext2_ppl"], ".4g"), fmt(r.get("c4_ppl"), ".4g"), _acc(r["average"], r.get("average_stderr")), diff, flags])
    line = lambda values: "  ".join(_cut(v, w).rjust(w) if right else _cut(v, w).ljust(w) for v, (_, w, right) in zip(values, COLUMNS)).rstrip()
    out = [rule_line(decision), line([h for h, _, _ in COLUMNS]), "  ".join("-" * w for _, w, _ in COLUMNS)]
    out += [line(c) for c in cells]
    out.append(LEGEND if len(LEGEND) <= 120 else LEGEND[:119] + "…")
    return out
