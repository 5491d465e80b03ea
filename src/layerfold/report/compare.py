"""One line per experiment, narrow enough for a 120-column terminal.

Runs come from the report stage's experiment archive (``reports/experiments/<name>/``), from
``scripts/run_methods.py`` output folders (``<out>/<name>/metrics.json`` beside ``<out>/dense/``),
or from ``dvc exp show --json`` (DVC drops per-document lists from metrics, so differences there
use unpaired standard errors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerfold.evaluation.results import merge_documents
from layerfold.io import read_json
from layerfold.report.tables import collect_experiments, common_tasks, experiments_table, final_metrics, fmt

# (header, width, right-aligned); widths and separators sum to 120 columns
COLUMNS = [("experiment", 20, False), ("model", 20, False), ("method", 12, False), ("L", 5, True), ("wiki2 PPL", 9, True),
           ("c4 PPL", 9, True), ("headline %", 12, True), ("Δ vs dense", 12, True), ("flags", 5, False)]
LEGEND = "headline: mean over the informative tasks ± se; Δ: final − dense ± se, * beyond 1.96 se; flags: C collapsed, D drift"


def _optional_json(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def runs_from_methods_dir(out: str | Path) -> list[dict]:
    """Runs written by ``scripts/run_methods.py --out``: ``<out>/<name>/metrics.json`` (+ ``plan.json``,
    ``recovered.json``, ``params.yaml``), each compared with ``<out>/dense/metrics.json``; the per-document
    results beside them (``documents.json``, ``recovered_documents.json``) are merged in."""
    import yaml

    out = Path(out)
    dense_path = out / "dense" / "metrics.json"
    dense = merge_documents(read_json(dense_path), _optional_json(out / "dense" / "documents.json")) if dense_path.is_file() else None
    runs = []
    # a run scored only after recovery (run_methods.py --final-only) has recovered.json but no metrics.json
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "dense"
                         and ((p / "metrics.json").is_file() or (p / "recovered.json").is_file())):
        params = yaml.safe_load((folder / "params.yaml").read_text()) if (folder / "params.yaml").is_file() else {}
        runs.append({
            "name": folder.name, "path": str(folder), "dense": dense,
            "compressed": merge_documents(_optional_json(folder / "metrics.json"), _optional_json(folder / "documents.json")),
            "recovered": merge_documents(_optional_json(folder / "recovered.json"), _optional_json(folder / "recovered_documents.json")),
            "plan": _optional_json(folder / "plan.json"),
            "compress": _optional_json(folder / "compress.json"),
            "compress_time": _optional_json(folder / "compress_time.json"),
            "recover": _optional_json(folder / "recover.json"),
            "recover_time": _optional_json(folder / "recover_time.json"),
            "params": params,
            "meta": {"model": (params.get("model") or {}).get("name")},
        })
    return runs


def _short_rev(rev: str) -> str:
    return rev[:7] if len(rev) == 40 else rev  # a commit sha, or "workspace"


FINISHED = "success"


def _unfinished(group: dict[str, Any], revision: dict[str, Any]) -> str | None:
    """Why an experiment of ``dvc exp show`` holds no result of its own, or None when it finished.

    DVC lists a failed queued run with the files of the commit it was queued from (the metrics of
    another run), a queued one with those too, and a running one with its temporary workspace: only an
    experiment whose executor succeeded (or, run without the queue, has no executor) and has no error
    holds its own results."""
    state = (group.get("executor") or {}).get("state")
    if state not in (None, FINISHED):
        return state
    if revision.get("error"):
        return "failed"
    if (revision.get("data") or {}).get("rev") == "workspace":
        return "running"
    return None


def experiment_states(payload: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{name, state, reason}`` for every experiment of a ``dvc exp show --json`` payload that holds no
    result of its own (failed, queued, running); see :func:`_unfinished`."""
    states = []
    for entry in payload:
        for group in entry.get("experiments") or []:
            for revision in group.get("revs") or [group]:
                state = _unfinished(group, revision)
                if state is not None:
                    error = (revision.get("error") or {}).get("msg")
                    states.append({"name": group.get("name") or revision.get("name"), "state": state,
                                   "reason": error or f"dvc exp show lists it as {state}"})
    return states


def runs_from_dvc_exp_show(payload: list[dict[str, Any]]) -> list[dict]:
    """Runs from ``dvc exp show --json``: the workspace, each commit and every *finished* experiment under
    it (failed, queued and running ones are left out: :func:`experiment_states` lists them).

    Each run also carries ``rev`` and ``timestamp`` (None for the workspace), its ``params`` and
    ``metric_files`` (metrics file stem -> path, to read the whole file from ``rev`` with git, since
    DVC drops lists). ``recovered`` is None where it only points at the compressed model (recovery=none).
    """
    runs = []

    def visit(entry: dict[str, Any]) -> None:
        data = entry.get("data") or {}
        files = data.get("metrics") or {}
        metrics = {Path(path).stem: (m or {}).get("data") for path, m in files.items()}
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        recovered = metrics.get("recovered")
        if metrics.get("compressed"):
            runs.append({
                "name": entry.get("name") or _short_rev(data.get("rev") or entry.get("rev") or "?"),
                "rev": data.get("rev") or entry.get("rev"), "timestamp": data.get("timestamp"),
                "dense": metrics.get("dense"), "compressed": metrics["compressed"],
                "recovered": None if recovered and "same_model_as" in recovered else recovered,
                "compress": metrics.get("compress"),
                "compress_time": metrics.get("compress_time"), "recover": metrics.get("recover"),
                "recover_time": metrics.get("recover_time"),
                "params": params, "metric_files": {Path(path).stem: path for path in files},
                "plan": {"method": {"name": (params.get("method") or {}).get("name")}},
                "meta": {"model": (params.get("model") or {}).get("name")},
            })
        for child in entry.get("experiments") or []:
            for revision in child.get("revs") or [child]:
                if _unfinished(child, revision) is None:
                    visit(revision)

    for entry in payload:
        visit(entry)
    return runs


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


def load_runs(archive: str | Path | None = None, methods_dirs: list[str | Path] = (), dvc_json: str | None = None) -> list[dict]:
    """Runs from any mix of the three sources, in that order."""
    runs = collect_experiments(archive) if archive is not None else []
    for folder in methods_dirs:
        runs += runs_from_methods_dir(folder)
    if dvc_json is not None:
        runs += runs_from_dvc_exp_show(json.loads(dvc_json))
    return runs
