"""Collecting finished runs into records: one JSON per run of a run list (:mod:`layerfold.runs.plan`), read
from ``dvc exp show --json`` or from ``scripts/run_methods.py`` folders.

DVC drops lists from the metrics it shows, so the per-document results that make differences *paired* are
read from each experiment's commit (``git show <rev>:metrics/<name>.json``); a run's numbers count only
when that commit's ``dvc.lock`` ties them to the run (:func:`provenance_problems`). The records are what
:mod:`layerfold.report.collected` tabulates and pairs.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from layerfold.config import compose
from layerfold.evaluation.results import merge_documents
from layerfold.io import read_json
from layerfold.runs.plan import PlannedRun, RunList
from layerfold.runs.sources import experiment_states, runs_from_dvc_exp_show, runs_from_methods_dir

METRIC_FILES = ("dense", "compressed", "recovered", "compress", "compress_time", "recover", "recover_time")
PARAM_SECTIONS = ("model", "data", "method", "recovery", "eval", "runtime", "hardware")


def num(value: Any) -> float | None:
    """``value`` as a finite float, else None (as :func:`layerfold.report.tables.num`, which reads these records:
    runs are read below the report, so the report's helpers are not imported here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


FileReader = Callable[[str, str], "bytes | None"]  # (git revision, path in the repository) -> the file's bytes, or None
DOCUMENT_FILES = ("dense", "compressed", "recovered")  # metrics files with a per-document output beside them


def git_reader(root: str | Path = ".") -> FileReader:
    """Read a file as a commit holds it (``git show <rev>:<path>``); None where git cannot."""

    def read(rev: str, path: str) -> bytes | None:
        result = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], capture_output=True)
        return result.stdout if result.returncode == 0 and result.stdout.strip() else None

    return read


def _json(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def documents_path(metrics_path: str) -> str:
    """``metrics/<name>.json`` -> its per-document output ``metrics/documents/<name>.json``."""
    path = Path(metrics_path)
    return str(path.parent / "documents" / path.name)


def _timings(metrics: Mapping[str, Any], machine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    # recover_time.json holds the recover stage's times; older runs kept them in recover.json
    compress_time, recover = metrics.get("compress_time") or {}, {**(metrics.get("recover") or {}), **(metrics.get("recover_time") or {})}
    machine = machine or {}
    return {
        "compress_s": num(compress_time.get("seconds")),
        "compress_peak_mib": num(compress_time.get("peak_memory_mib")),
        "recover_wall_s": num(recover.get("wall_seconds")),
        "recover_train_s": num(recover.get("train_seconds")),
        "recover_tokens_per_s": num(recover.get("tokens_per_s")),
        "evaluate_s": {k: (metrics.get(k) or {}).get("wall_time") or (machine.get(k) or {}).get("wall_time")
                       for k in ("dense", "compressed", "recovered") if metrics.get(k)},
    }


def make_record(run_list: RunList, planned: PlannedRun, metrics: dict[str, Any], params: Mapping[str, Any], source: str,
                origin: str, timestamp: str | None = None, provenance: str | None = None,
                machine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One run's JSON: what was planned, the params that matter, every metrics file whole (per-document
    results merged in), its timings, how its numbers were tied to the run (``provenance``) and the
    machine facts its evaluate stages left locally (``machine``: device, versions, wall times).
    ``source`` is "dvc experiment" or "run_methods folder"; ``origin`` the experiment's commit or the folder."""
    recovered = metrics.get("recovered")
    if recovered and "same_model_as" in recovered:  # recovery=none: the final model is the compressed one
        metrics = {**metrics, "recovered": None}
    record = {
        "name": planned.name, "experiment": run_list.experiment(planned), "source": source, "origin": origin, "timestamp": timestamp,
        "remove": planned.remove, "curve": planned.curve, "overrides": list(planned.overrides),
        "params": {k: params.get(k) for k in PARAM_SECTIONS if k in params},
        "metrics": {k: metrics.get(k) for k in METRIC_FILES},
        "timings": _timings(metrics, machine),
    }
    if provenance is not None:
        record["provenance"] = provenance
    if machine:
        record["machine"] = dict(machine)
    return record


def _dotted(tree: Mapping[str, Any], key: str) -> Any:
    value: Any = tree
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING_PARAM
        value = value[part]
    return value


_MISSING_PARAM = object()


def provenance_problems(read_file: FileReader, rev: str, params: Mapping[str, Any], paths: Iterable[str]) -> list[str]:
    """Why the metrics files ``paths`` at ``rev`` may not be this experiment's results; empty when they are.

    An experiment's commit holds a ``dvc.lock`` that records, for every stage, the params it ran with and
    the md5 of each output. A file counts as this experiment's result when a stage of that lock lists it
    as an output with the md5 of the bytes at ``rev``, and that stage and every stage upstream of it (by
    the md5s of their dependencies) ran with the params the experiment's ``params.yaml`` holds. A failed
    queued run shows the files of the commit it was queued from, whose lock ran other params: refused.
    """
    raw_lock = read_file(rev, "dvc.lock")
    lock = yaml.safe_load(raw_lock) if raw_lock else None
    if not isinstance(lock, Mapping) or not isinstance(lock.get("stages"), Mapping):
        return [f"no dvc.lock at {rev[:12]} to tie its metrics to the run"]
    stages = lock["stages"]
    producer = {out.get("path"): (name, out.get("md5")) for name, stage in stages.items() for out in (stage.get("outs") or [])}
    problems: list[str] = []
    checked: set[str] = set()

    def check_stage(name: str) -> None:
        if name in checked:
            return
        checked.add(name)
        stage = stages[name]
        for key, locked in ((stage.get("params") or {}).get("params.yaml") or {}).items():
            current = _dotted(params, key)
            if current is _MISSING_PARAM or current != locked:
                shown = "absent" if current is _MISSING_PARAM else json.dumps(current, default=str)[:80]
                problems.append(f"stage {name} ran with {key}={json.dumps(locked, default=str)[:80]}, the run's params.yaml has {shown}")
        for dep in stage.get("deps") or []:
            upstream = producer.get(dep.get("path"))
            if upstream is None:
                continue
            if upstream[1] is not None and dep.get("md5") != upstream[1]:
                problems.append(f"stage {name} read {dep.get('path')} at another version than stage {upstream[0]} wrote")
            check_stage(upstream[0])

    for path in paths:
        if path not in producer:
            problems.append(f"{path} is no stage's output in dvc.lock")
            continue
        name, md5 = producer[path]
        raw = read_file(rev, path)
        if raw is None or hashlib.md5(raw).hexdigest() != md5:
            problems.append(f"{path} at {rev[:12]} is not the file stage {name} recorded")
        check_stage(name)
    return list(dict.fromkeys(problems))


def _machine_files(machine_dir: Path | None, experiment: str) -> dict[str, Any]:
    """The evaluate stages' machine-local facts of one experiment (``metrics/timings/<experiment>/``)."""
    if machine_dir is None:
        return {}
    folder = Path(machine_dir) / experiment
    return {k: read_json(folder / f"evaluate-{k}.json") for k in ("dense", "compressed", "recovered")
            if (folder / f"evaluate-{k}.json").is_file()}


def records_from_exp_show(payload: list[dict], run_list: RunList, read_file: FileReader | None = None,
                          machine_dir: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """Records of the run list's finished experiments in a ``dvc exp show --json`` payload, and every
    planned run that has none, with its state.

    A run counts only when DVC reports it finished (``executor.state`` success, or an experiment ref of a
    plain ``dvc exp run``) without an error; the newest such run wins where a name occurs under several
    commits. Its metrics files are read whole from its commit through ``read_file`` (with the per-document
    outputs beside them) and must pass :func:`provenance_problems`; without ``read_file`` they are taken as
    DVC shows them (no per-document lists) and the record says the provenance was not checked. Runs that
    failed, are queued or running, whose numbers are not their own, or that were never run come back as
    ``{"run", "experiment", "state", "reason"}``, never with numbers.
    """
    wanted = {run_list.experiment(run): run for run in run_list.runs}
    finished: dict[str, list[dict]] = {}
    for run in runs_from_dvc_exp_show(payload):
        if run["name"] in wanted:
            finished.setdefault(run["name"], []).append(run)
    states = {s["name"]: s for s in experiment_states(payload) if s["name"] in wanted}
    records, missing = [], []
    for planned in run_list.runs:
        experiment = run_list.experiment(planned)
        candidates = sorted(finished.get(experiment, []), key=lambda r: r["timestamp"] or "", reverse=True)
        rejected = []
        for run in candidates:
            metrics, paths = {}, []
            for key in METRIC_FILES:
                path = run["metric_files"].get(key)
                raw = read_file(run["rev"], path) if read_file is not None and path and run.get("rev") else None
                whole = _json(raw)
                if whole is not None:
                    paths.append(path)
                    if key in DOCUMENT_FILES:
                        documents = _json(read_file(run["rev"], documents_path(path)))  # type: ignore[misc]
                        if documents is not None:
                            paths.append(documents_path(path))
                            whole = merge_documents(whole, documents)
                metrics[key] = whole if whole is not None else run.get(key)
            if read_file is None:
                provenance = "not checked (metrics as dvc exp show lists them, without git)"
            else:
                problems = provenance_problems(read_file, run["rev"], run["params"], paths)
                if problems:
                    rejected.append(f"{run['rev'][:12]}: " + "; ".join(problems))
                    continue
                provenance = f"dvc.lock at {run['rev'][:12]}: {len(paths)} file(s) match its outputs, params as the run's"
            machine = _machine_files(Path(machine_dir) if machine_dir else None, experiment)
            records.append(make_record(run_list, planned, metrics, run["params"], "dvc experiment", run["rev"], run["timestamp"],
                                       provenance, machine))
            break
        else:
            state = states.get(experiment)
            if rejected:
                missing.append({"run": planned.name, "experiment": experiment, "state": "rejected",
                                "reason": "its numbers are not its own: " + " | ".join(rejected)})
            elif state is not None:
                missing.append({"run": planned.name, "experiment": experiment, "state": state["state"], "reason": state["reason"]})
            else:
                missing.append({"run": planned.name, "experiment": experiment, "state": "not run",
                                "reason": "no experiment of this name in dvc exp show"})
    return records, missing


def _same_settings(folder_params: Mapping[str, Any], composed: Mapping[str, Any]) -> bool:
    """A run_methods folder ran a planned run when its method settings (the keys both have: older folders
    lack settings added since), its recovery mode and its compensation are the planned run's."""
    mine, theirs = folder_params.get("method") or {}, composed.get("method") or {}
    shared = set(mine) & set(theirs)
    return ("name" in shared and all(mine[k] == theirs[k] for k in shared)
            and (folder_params.get("recovery") or {}).get("name") == (composed.get("recovery") or {}).get("name")
            and (folder_params.get("compensate") or {}).get("name", "none") == (composed.get("compensate") or {}).get("name", "none"))


def records_from_methods_dir(folder: str | Path, run_list: RunList, conf_dir: str | Path = "conf") -> tuple[list[dict], list[str]]:
    """Records from a ``scripts/run_methods.py --out`` folder, each folder matched to the planned run with
    the same method and recovery settings; also the folders that match none."""
    folders = runs_from_methods_dir(folder)
    composed = {run.name: compose(conf_dir, run_list.overrides(run)) for run in run_list.runs}
    records, used = [], set()
    for planned in run_list.runs:
        match = next((f for f in folders if f["name"] not in used and _same_settings(f["params"], composed[planned.name])), None)
        if match is None:
            continue
        used.add(match["name"])
        metrics = {k: match.get(k) for k in METRIC_FILES}
        records.append(make_record(run_list, planned, metrics, match["params"], "run_methods folder", match["path"]))
    return records, [f["name"] for f in folders if f["name"] not in used]


def load_records(folder: str | Path) -> list[dict]:
    """The records a collect wrote (``<folder>/runs/*.json``), in the order of ``runs.json``."""
    folder = Path(folder)
    order = read_json(folder / "runs.json")["order"]
    return [read_json(folder / "runs" / f"{name}.json") for name in order]
