"""Where runs live, read into one shape: DVC experiments (``dvc exp show --json``; DVC drops per-document
lists from metrics, so differences there use unpaired standard errors unless the files are read from each
experiment's commit, as :mod:`layerfold.runs.collect` does) and ``scripts/run_methods.py`` output folders
(``<out>/<name>/metrics.json`` beside ``<out>/dense/``).

Each run is ``{name, dense, compressed, recovered, plan, compress, ...}``, the shape
:func:`layerfold.report.tables.experiments_table` and every reader of runs take.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from layerfold.evaluation.results import merge_documents
from layerfold.io import read_json



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

    Each run also carries ``kind`` (``workspace``, ``commit`` or ``experiment``), ``rev`` and ``timestamp`` (None for
    the workspace), its ``params`` and
    ``metric_files`` (metrics file stem -> path, to read the whole file from ``rev`` with git, since
    DVC drops lists). ``recovered`` is None where it only points at the compressed model (recovery=none).
    """
    runs = []

    def visit(entry: dict[str, Any], kind: str) -> None:
        data = entry.get("data") or {}
        files = data.get("metrics") or {}
        metrics = {Path(path).stem: (m or {}).get("data") for path, m in files.items()}
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        recovered = metrics.get("recovered")
        if metrics.get("compressed"):
            runs.append({
                "name": entry.get("name") or _short_rev(data.get("rev") or entry.get("rev") or "?"),
                "kind": "workspace" if (data.get("rev") or entry.get("rev")) == "workspace" else kind,
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
                    visit(revision, "experiment")

    for entry in payload:
        visit(entry, "commit")
    return runs


def load_runs(methods_dirs: Iterable[str | Path] = (), dvc_json: str | None = None) -> list[dict]:
    """Runs from any mix of ``scripts/run_methods.py`` folders and a ``dvc exp show --json`` payload, in that order."""
    runs: list[dict] = []
    for folder in methods_dirs:
        runs += runs_from_methods_dir(folder)
    if dvc_json is not None:
        runs += runs_from_dvc_exp_show(json.loads(dvc_json))
    return runs


def dvc_experiments_json(root: str | Path = ".") -> str:
    """``dvc exp show --json --all-commits`` of the repository at ``root``: every commit's and experiment's
    params and metrics. Raises ``RuntimeError`` with DVC's message where DVC cannot list them."""
    try:
        proc = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], cwd=root, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise RuntimeError("dvc is not installed in this environment (bash scripts/install.sh)") from err
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp show failed in {root}: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc.stdout
