"""One protocol, every method: the run list, the commands that queue it, and the comparison collected
from the finished runs.

The run list (``conf/comparison/*.yaml``) names each run and its ``dvc exp run -S`` overrides, how many
layers it removes and which depth curve it belongs to. Before anything is queued every run is composed
exactly as ``dvc exp run`` composes it and checked as the ``validate`` stage checks it, so a typo fails
here, naming the run, instead of an hour into the queue.

Collecting reads the finished experiments from ``dvc exp show --json`` (or ``scripts/run_methods.py``
folders). DVC drops lists from the metrics it shows, so the per-document results that make differences
*paired* are read from each experiment's commit (``git show <rev>:metrics/<name>.json``); where they are
missing the standard errors fall back to unpaired ones and the table says so. Every difference comes from
:mod:`layerfold.report.noise`: a run is ahead of another (or of dense) only when the difference is more
than 1.96 standard errors from zero.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.errors import HydraException
from omegaconf import DictConfig

from layerfold.config import ConfigError, compose, parse_params
from layerfold.io import atomic_dir, portable_path, read_json, write_json
from layerfold.models import ModelFacts, ModelSourceError, UnsupportedArchitectureError, probe
from layerfold.evaluation.results import merge_documents
from layerfold.report.compare import experiment_states, runs_from_dvc_exp_show, runs_from_methods_dir
from layerfold.report.findings import findings_markdown
from layerfold.report.noise import difference, mean_difference, verdict
from layerfold.report.plots import _figure, save_png
from layerfold.report.protocol import (
    COLLAPSE_FACTOR, DRIFT_ALPHA, collapsed, drift_mark, headline, informative_tasks, perplexity_agreement,
    ranking, rule_lines, run_drift, wikitext2_ppl,
)
from layerfold.report.tables import MISSING, average_accuracy, common_tasks, diff_cell, final_metrics, fmt, num, reported_metric
from layerfold.report.reader import run_headline
from layerfold.stage import expand
from layerfold.validation import check

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a git ref component and a file name
RUN_KEYS = {"overrides", "remove", "curve"}
LIST_KEYS = {"experiment_prefix", "common", "compare_at", "runs"}
METRIC_FILES = ("dense", "compressed", "recovered", "compress", "compress_time", "recover", "recover_time")
PARAM_SECTIONS = ("model", "data", "method", "recovery", "eval", "runtime", "hardware")


# ------------------------------------------------------------------------------------------------
# the run list


@dataclass(frozen=True)
class PlannedRun:
    name: str
    overrides: tuple[str, ...]
    remove: int  # layers the run takes away; checked against the composed method settings
    curve: str | None = None  # line of the depth plot this run is a point of


@dataclass(frozen=True)
class RunList:
    source: str  # the file it was read from, named in errors
    runs: tuple[PlannedRun, ...]
    common: tuple[str, ...] = ()
    prefix: str = ""
    compare_at: int = 8

    def experiment(self, run: PlannedRun) -> str:
        """The dvc experiment name of ``run``."""
        return f"{self.prefix}{run.name}"

    def overrides(self, run: PlannedRun, extra: Iterable[str] = ()) -> list[str]:
        """``common``, then ``extra`` (``--set``), then the run's own: later ones win in Hydra."""
        return [*self.common, *extra, *run.overrides]

    def select(self, names: Iterable[str] | None) -> list[PlannedRun]:
        """The runs named (all when ``names`` is empty), in run-list order."""
        names = list(names or [])
        known = {run.name for run in self.runs}
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else f" Runs: {', '.join(sorted(known))}."
                raise ConfigError(f"--only {name}: no such run in {self.source}.{hint}")
        return [run for run in self.runs if not names or run.name in names]


def _list_error(source: str, key: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"{source}: {key} = {value!r}; {want}. Fix it in {source}.")


def load_run_list(path: str | Path) -> RunList:
    """Read and check a run list: known keys, names usable as experiment names, overrides as strings."""
    source = str(path)
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(raw) - LIST_KEYS)
    if unknown:
        raise _list_error(source, unknown[0], raw[unknown[0]], f"the keys are {', '.join(sorted(LIST_KEYS))}")
    common, prefix, compare_at = raw.get("common") or [], raw.get("experiment_prefix") or "", raw.get("compare_at", 8)
    if not isinstance(common, list) or not all(isinstance(o, str) for o in common):
        raise _list_error(source, "common", common, "must be a list of Hydra overrides such as 'eval=gpu'")
    if prefix and not RUN_NAME.fullmatch(prefix):
        raise _list_error(source, "experiment_prefix", prefix, "must use letters, digits, '-' and '_' only")
    if isinstance(compare_at, bool) or not isinstance(compare_at, int) or compare_at < 1:
        raise _list_error(source, "compare_at", compare_at, "must be an integer >= 1 (layers removed in the comparison)")
    runs = []
    for name, spec in (raw.get("runs") or {}).items():
        key = f"runs.{name}"
        if not RUN_NAME.fullmatch(str(name)):
            raise _list_error(source, key, name, "a run name uses letters, digits, '-' and '_' only (it becomes a git ref)")
        if not isinstance(spec, dict) or set(spec) - RUN_KEYS:
            raise _list_error(source, key, spec, f"must be a mapping with the keys {', '.join(sorted(RUN_KEYS))}")
        overrides, remove, curve = spec.get("overrides"), spec.get("remove"), spec.get("curve")
        if not isinstance(overrides, list) or not overrides or not all(isinstance(o, str) for o in overrides):
            raise _list_error(source, f"{key}.overrides", overrides, "must be a non-empty list of overrides such as 'method=shortgpt'")
        if isinstance(remove, bool) or not isinstance(remove, int) or remove < 1:
            raise _list_error(source, f"{key}.remove", remove, "must be an integer >= 1 (the layers the run removes)")
        if curve is not None and not isinstance(curve, str):
            raise _list_error(source, f"{key}.curve", curve, "must be a label such as 'shortgpt', or absent")
        runs.append(PlannedRun(str(name), tuple(overrides), remove, curve))
    if not runs:
        raise _list_error(source, "runs", raw.get("runs"), "must name at least one run")
    return RunList(source, tuple(runs), tuple(common), prefix, compare_at)


# ------------------------------------------------------------------------------------------------
# checking every run before the queue is touched


def removed_layers(method: Mapping[str, Any], num_layers: int) -> int | None:
    """The layers a method's settings take away: ``num_layers - target_layers`` where a target depth is
    set (LaCo, CoMe), else ``num_remove``; None when neither fixes the depth (LaCo without a target)."""
    if method.get("target_layers") is not None:
        return num_layers - int(method["target_layers"])
    if method.get("num_remove") is not None:
        return int(method["num_remove"])
    return None


def model_facts(model: DictConfig) -> ModelFacts:
    """The model's facts from its config or file header (no weights), as the ``validate`` stage reads them."""
    model = model.copy()
    model.path, model.tokenizer = expand(model.path), expand(model.tokenizer)
    return probe(model)


def check_runs(run_list: RunList, runs: list[PlannedRun], extra: Iterable[str] = (), conf_dir: str | Path = "conf",
               facts_for: Callable[[DictConfig], ModelFacts] = model_facts) -> dict[str, dict]:
    """Compose every run as ``dvc exp run -S`` would and validate it against its model; return the composed
    params by run name. Raises :class:`ConfigError` naming the run, its overrides and the fix at the first
    run that fails, including a run whose settings remove another number of layers than its ``remove``."""
    extra = list(extra)
    facts_cache: dict[str, ModelFacts] = {}
    composed_by_run = {}
    for run in runs:
        overrides = run_list.overrides(run, extra)
        where = f"run '{run.name}'"
        try:
            composed = compose(conf_dir, overrides)
            params = parse_params(composed, where)
            key = json.dumps(composed["model"], sort_keys=True)
            if key not in facts_cache:
                facts_cache[key] = facts_for(params.model)
            check(params, facts_cache[key], where)
        except (HydraException, ValueError, ModelSourceError, UnsupportedArchitectureError, FileNotFoundError) as err:
            raise ConfigError(
                f"run '{run.name}' (overrides: {' '.join(overrides)}) does not compose and validate: {err}\n"
                f"Fix runs.{run.name}.overrides in {run_list.source} (or the --set value); nothing was queued."
            ) from None
        layers = facts_cache[key].num_layers
        removed = removed_layers(composed["method"], layers)
        if removed != run.remove:
            how = "no num_remove or target_layers fixes its depth" if removed is None else f"its method settings remove {removed}"
            raise ConfigError(
                f"run '{run.name}': runs.{run.name}.remove = {run.remove} but {how} (of {layers} layers; method: "
                f"{json.dumps(composed['method'], default=str)[:200]}). Set method.num_remove or method.target_layers in "
                f"runs.{run.name}.overrides, or correct remove, in {run_list.source}; nothing was queued."
            )
        composed_by_run[run.name] = composed
    return composed_by_run


def queue_command(run_list: RunList, run: PlannedRun, extra: Iterable[str] = (), force: bool = False) -> list[str]:
    """``dvc exp run --queue -n <experiment> -S <override> ...`` for one run (``-f`` replaces an
    experiment of the same name, which DVC otherwise refuses)."""
    options = [part for override in run_list.overrides(run, extra) for part in ("-S", override)]
    return ["dvc", "exp", "run", "--queue", *(["-f"] if force else []), "-n", run_list.experiment(run), *options]


# ------------------------------------------------------------------------------------------------
# collecting finished runs into records

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


# ------------------------------------------------------------------------------------------------
# numbers: the table, the pairs, the depth curves


def _final(record: dict) -> dict:
    return final_metrics(record["metrics"])


def _layers(metrics: Mapping[str, Any] | None) -> int | None:
    value = num(((metrics or {}).get("model") or {}).get("num_layers"))
    return None if value is None else int(value)


def _as_run(record: dict) -> dict:
    """The shape :mod:`layerfold.report.tables` reads."""
    m = record["metrics"]
    return {"name": record["name"], "dense": m.get("dense"), "compressed": m.get("compressed"), "recovered": m.get("recovered"),
            "compress": m.get("compress"), "plan": {"method": {"name": ((record["params"].get("method") or {}).get("name"))}}}


def tasks_of(records: list[dict]) -> list[str]:
    """The lm-eval tasks every record's dense and final model have: the average is over these."""
    return common_tasks([_as_run(r) for r in records])


def task_result(metrics: Mapping[str, Any] | None, base: Mapping[str, Any] | None, task: str) -> dict[str, Any]:
    """One task's headline value of ``metrics`` and its difference to ``base`` (``metrics - base``)."""
    mine, theirs = ((metrics or {}).get("lm_eval") or {}).get(task), ((base or {}).get("lm_eval") or {}).get(task)
    metric = reported_metric(task, *(r for r in (mine, theirs) if r is not None)) or "acc"
    diff = difference(theirs, mine, metric)
    return {"metric": metric, "value": num((mine or {}).get(metric)), "se": num((mine or {}).get(f"{metric}_stderr")),
            "diff": diff["diff"], "diff_se": diff["se"], "paired": diff["paired"], "significant": diff["significant"]}


def average_difference(metrics: Mapping[str, Any] | None, base: Mapping[str, Any] | None, tasks: list[str]) -> dict[str, Any]:
    """Difference of the task averages, ``metrics - base``, with its standard error (paired per task where
    both have per-document results): :func:`layerfold.report.noise.mean_difference`."""
    per_task = [task_result(metrics, base, t) for t in tasks]
    return mean_difference([{"diff": r["diff"], "se": r["diff_se"], "paired": r["paired"], "significant": r["significant"]}
                            for r in per_task])


def decide(records: list[dict], tasks: list[str], setting: Any = "auto", facts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The informative tasks of the comparison, decided once from the first run's dense model
    (:func:`layerfold.report.protocol.informative_tasks`) and applied to every run."""
    dense = (records[0]["metrics"].get("dense") or {}) if records else {}
    return informative_tasks(dense, tasks, setting, facts)


def _row(record_name: str, final: Mapping[str, Any], run_dense: Mapping[str, Any], tasks: list[str], decision: Mapping[str, Any],
         dense_ppl: float | None, facts: Mapping[str, Any] | None) -> dict[str, Any]:
    # the run's own headline (layerfold.report.reader): the numbers its report and every other reader show
    setting = "auto" if decision["rule"] == "auto" else list(decision["tasks"])
    numbers = run_headline({"dense": run_dense, "compressed": final}, setting, facts)
    mine = {"value": numbers["headline"], "se": numbers["se"]}
    diff = {"diff": numbers["diff"], "se": numbers["diff_se"], "paired": numbers["paired"], "significant": numbers["significant"],
            "verdict": numbers["verdict"], "retained_pct": numbers["retained_pct"], "low": numbers["low"],
            "high": numbers["high"]} if record_name != "dense" else {}
    every = average_difference(final, run_dense, tasks) if record_name != "dense" else {}
    ppl = wikitext2_ppl(final)
    drift = run_drift(run_dense, final, tasks, facts) if record_name != "dense" else None
    lambada = ((final.get("lm_eval") or {}).get("lambada_openai")) or {}
    return {
        "run": record_name, "layers": _layers(final),
        "wikitext2_ppl": ppl, "c4_ppl": num(((final.get("perplexity") or {}).get("c4") or {}).get("perplexity")),
        "headline": mine["value"], "headline_se": mine["se"],
        "diff": diff.get("diff"), "diff_se": diff.get("se"), "paired": diff.get("paired"), "significant": diff.get("significant"),
        "verdict": diff.get("verdict"), "retained_pct": diff.get("retained_pct"), "retained_low": diff.get("low"),
        "retained_high": diff.get("high"),
        "average": average_accuracy(final, tasks) if tasks else None, "average_se": headline(final, tasks)["se"],
        "average_diff": every.get("diff"), "average_diff_se": every.get("se"), "average_significant": every.get("significant"),
        "average_verdict": verdict(every) if every else None,
        "collapsed": collapsed(ppl, dense_ppl) if record_name != "dense" else False,
        "drift": drift, "drift_mark": drift_mark(drift),
        "lambada_acc": num(lambada.get("acc")), "lambada_acc_se": num(lambada.get("acc_stderr")), "lambada_ppl": num(lambada.get("perplexity")),
        "tasks": {t: task_result(final, run_dense, t) for t in tasks},
    }


def summary_rows(records: list[dict], tasks: list[str], decision: Mapping[str, Any] | None = None,
                 facts: Mapping[str, Any] | None = None) -> list[dict]:
    """The dense row, then one row per record: layers (and whether the run landed where planned),
    perplexities, the headline ± se over the informative tasks (``decision``, default: decided from the
    first dense model), Δ vs its dense ± se with the verdict and retained % [interval], the average of
    every task (what the comparison reported before the headline), collapse, answer drift
    (:func:`layerfold.report.protocol.run_drift`; ``facts`` holds the gold answers that let two-choice
    tasks' answers be derived from 0/1 results), every task, timings and notes."""
    if not records:
        return []
    decision = decision or decide(records, tasks, facts=facts)
    dense = records[0]["metrics"]["dense"] or {}
    dense_ppl = wikitext2_ppl(dense)
    rows = [{**_row("dense", dense, dense, tasks, decision, dense_ppl, facts), "method": None, "recovery": None,
             "expected_layers": _layers(dense), "timings": {}, "notes": []}]
    for record in records:
        run_dense, final = record["metrics"]["dense"] or {}, _final(record)
        row = _row(record["name"], final, run_dense, tasks, decision, dense_ppl, facts)
        expected = None if _layers(run_dense) is None else _layers(run_dense) - record["remove"]
        notes = []
        if row["layers"] is not None and expected is not None and row["layers"] != expected:
            notes.append(f"landed at {row['layers']} layers, planned {expected}")
        if row["tasks"] and not all(r["paired"] for r in row["tasks"].values()):
            notes.append("unpaired se (per-document results not available)")
        if (run_dense.get("lm_eval"), run_dense.get("perplexity")) != (dense.get("lm_eval"), dense.get("perplexity")):
            notes.append("its dense metrics differ from the first run's")
        rows.append({
            **row,
            "method": (record["params"].get("method") or {}).get("name") or (record["metrics"].get("compress") or {}).get("method"),
            "recovery": None if record["metrics"].get("recovered") is None else (record["params"].get("recovery") or {}).get("name"),
            "expected_layers": expected, "timings": record["timings"], "notes": notes,
        })
    return rows


def pair_rows(records: list[dict], tasks: list[str], layers: int | None) -> list[dict]:
    """Every pair of records whose final model has ``layers`` layers: ``a - b`` in the headline over
    ``tasks`` (the informative ones) with its standard error (paired over the same documents where
    per-document results exist), and which is ahead: only when the difference is beyond 1.96 standard errors."""
    eligible = [r for r in records if layers is not None and _layers(_final(r)) == layers]
    rows = []
    for a, b in itertools.combinations(eligible, 2):
        d = average_difference(_final(a), _final(b), tasks)
        ahead = None if not d["significant"] else a["name"] if d["diff"] > 0 else b["name"]
        rows.append({"a": a["name"], "b": b["name"], "diff": d["diff"], "se": d["se"], "paired": d["paired"],
                     "significant": d["significant"], "ahead": ahead})
    return rows


def agreement(records: list[dict], rows: list[dict], tasks: list[str]) -> dict[str, Any]:
    """Headline vs WikiText-2 perplexity over every run (dense included): Spearman's rank agreement and
    the pairs the headline orders against a >= 3x perplexity gap
    (:func:`layerfold.report.protocol.perplexity_agreement`)."""
    by_run = {"dense": (records[0]["metrics"].get("dense") or {}) if records else {}} | {r["name"]: _final(r) for r in records}
    return perplexity_agreement(rows, by_run, tasks)


def beats_matrix(pairs: list[dict]) -> dict[str, dict[str, str]]:
    """``matrix[row][column]``: "▲" the row is ahead of the column beyond the noise, "▼" behind, "·" within
    it, "?" without a standard error."""
    names = list(dict.fromkeys(n for p in pairs for n in (p["a"], p["b"])))
    matrix = {n: {m: "" for m in names} for n in names}
    for p in pairs:
        a_vs_b = "?" if p["se"] is None else "·" if p["ahead"] is None else "▲" if p["ahead"] == p["a"] else "▼"
        matrix[p["a"]][p["b"]] = a_vs_b
        matrix[p["b"]][p["a"]] = {"▲": "▼", "▼": "▲"}.get(a_vs_b, a_vs_b)
    return matrix


def depth_curves(records: list[dict], rows: list[dict]) -> dict[str, list[dict]]:
    """Per curve, its points by layers removed, starting from dense at 0: headline ± se, Δ vs dense ± se, PPL."""
    by_run = {r["run"]: r for r in rows}
    dense = by_run.get("dense")
    curves: dict[str, list[dict]] = {}
    fields = ("layers", "headline", "headline_se", "diff", "diff_se", "significant", "verdict", "collapsed", "drift_mark",
              "wikitext2_ppl", "c4_ppl")
    for record in records:
        if record["curve"] is None or record["name"] not in by_run:
            continue
        if record["curve"] not in curves and dense is not None:
            curves[record["curve"]] = [{"removed": 0, "run": "dense", **{k: dense[k] for k in fields}}]
        curves.setdefault(record["curve"], []).append({"removed": record["remove"], "run": record["name"],
                                                       **{k: by_run[record["name"]][k] for k in fields}})
    return {name: sorted(points, key=lambda p: p["removed"]) for name, points in curves.items()}


def depth_figure(curves: dict[str, list[dict]], path: str | Path | None = None, title: str | None = None,
                 headline_label: str = "headline accuracy %"):
    """Headline accuracy (± 1.96 se bars; collapsed points hollow) and perplexity (log scale; WikiText-2
    solid, C4 dashed) against layers removed, one colour per curve."""
    fig = _figure(12.0, 4.8)
    acc_ax, ppl_ax = fig.subplots(1, 2)
    for i, (name, points) in enumerate(curves.items()):
        colour, shift = f"C{i % 10}", 0.1 * (i - (len(curves) - 1) / 2)  # shifted a little so error bars stay apart
        acc = [p for p in points if p["headline"] is not None]
        acc_ax.errorbar([p["removed"] + shift for p in acc], [100 * p["headline"] for p in acc],
                        yerr=[196 * (p["headline_se"] or 0.0) for p in acc], color=colour, marker="o", capsize=3, label=name)
        hollow = [p for p in acc if p.get("collapsed")]
        if hollow:
            acc_ax.scatter([p["removed"] + shift for p in hollow], [100 * p["headline"] for p in hollow], s=90,
                           facecolors="white", edgecolors=colour, zorder=3)
        for key, style in (("wikitext2_ppl", "-"), ("c4_ppl", "--")):
            ppl = [p for p in points if p[key] is not None]
            ppl_ax.plot([p["removed"] for p in ppl], [p[key] for p in ppl], style, color=colour, marker="o",
                        label=name if key == "wikitext2_ppl" else None)
    removed = sorted({p["removed"] for points in curves.values() for p in points})
    for ax in (acc_ax, ppl_ax):
        ax.set_xticks(removed)
        ax.set_xlabel("layers removed")
        ax.grid(alpha=0.3)
    acc_ax.set_ylabel(f"{headline_label} (± 1.96 se; hollow: collapsed)")
    acc_ax.legend(fontsize=8)
    ppl_ax.set_ylabel("perplexity (solid: WikiText-2, dashed: C4)")
    ppl_ax.set_yscale("log")
    ppl_ax.legend(fontsize=8)
    fig.suptitle(title or "Headline accuracy and perplexity vs layers removed")
    if path is not None:
        save_png(fig, path)
    return fig


# ------------------------------------------------------------------------------------------------
# Markdown


def _distinct(values: Iterable[Any], missing: str = "not recorded in the metrics files") -> str:
    seen = list(dict.fromkeys(str(v) for v in values if v not in (None, "")))
    if not seen:
        return missing
    return seen[0] if len(seen) == 1 else "; ".join(seen) + " (**differs between runs**)"


def model_caveat(records: list[dict]) -> str:
    """The model the records' numbers belong to, for prose: its name and, where its weights were quantised and
    dequantised, that these are not the full-precision model's numbers."""
    models = [m.get("model") or {} for r in records for k in ("dense", "compressed", "recovered") if (m := r["metrics"].get(k))]
    name, quantization = _distinct(m.get("name") for m in models), _distinct((m.get("quantization") for m in models), "")
    return name + (f", {quantization}: not the full-precision model" if "dequantised" in quantization
                   else f", {quantization}" if quantization else "")


def header_lines(records: list[dict], title: str) -> list[str]:
    """Where the numbers come from, all read from the records: model file and hash, quantisation, date,
    device, library versions, evaluation and calibration settings."""
    metric_sets = [m for r in records for k in ("dense", "compressed", "recovered") if (m := r["metrics"].get(k))]
    machines = [m for r in records for m in (r.get("machine") or {}).values()]  # machine-local facts where collect found them
    models = [m.get("model") or {} for m in metric_sets]
    environments = [m.get("versions") or {} for m in metric_sets + machines]
    quantization = _distinct(m.get("quantization") for m in models)
    # the experiments' commit times, and the evaluation dates where the metrics record them
    dates = sorted({str(r["timestamp"])[:10] for r in records if r["timestamp"]} | {e["date"] for e in environments if e.get("date")})
    dense = records[0]["metrics"]["dense"] or {}
    settings = dense.get("lm_eval_settings") or {}
    ppl = dense.get("perplexity") or {}
    calibration = [json.dumps(r["params"]["data"].get("calibration"), sort_keys=True) for r in records if r["params"].get("data")]
    lines = [
        f"# {title}", "",
        f"- **Model**: {_distinct(m.get('name') for m in models)}, file `{_distinct(m.get('file') for m in models)}`, "
        f"sha256 `{_distinct(m.get('sha256') for m in models)}`",
        f"- **Weights**: {quantization}"
        + (": these are the numbers of the **dequantised GGUF**, not of the full-precision model."
           if "dequantised" in quantization else "."),
        f"- **Date**: {dates[0] + ' to ' + dates[-1] if len(dates) > 1 else dates[0] if dates else 'not recorded'}",
        f"- **Device**: {_distinct(m.get('device') for m in metric_sets + machines)} (dtype {_distinct(m.get('dtype') for m in metric_sets)})",
        f"- **Versions**: torch {_distinct(e.get('torch') for e in environments)}, "
        f"transformers {_distinct(e.get('transformers') for e in environments)}, "
        f"lm-eval {_distinct(e.get('lm_eval') for e in environments)}",
        f"- **lm-eval**: {'full sets' if settings.get('limit') is None and settings else 'limit ' + str(settings.get('limit'))}, "
        f"few-shot {json.dumps(settings.get('num_fewshot') or {})} (other tasks 0-shot), seed {settings.get('seed', MISSING)}",
        "- **Perplexity**: " + (", ".join(f"{k} {fmt(v.get('seq_len'), '.0f')}-token windows x {fmt(v.get('windows'), '.0f')}"
                                          for k, v in ppl.items()) or MISSING),
        f"- **Calibration** (data.calibration): {_distinct(calibration, 'not recorded')}",
        f"- **Runs**: {len(records)}, each a {_distinct(r['source'] for r in records)}",
    ]
    return lines


def _ppl(value: Any) -> str:
    v = num(value)
    return MISSING if v is None else f"{v:.2f}" if v < 1e4 else f"{v:.3g}"


def _acc_se(value: Any, se: Any) -> str:
    return MISSING if num(value) is None else f"{100 * value:.2f}" + ("" if num(se) is None else f" ± {100 * se:.2f}")


def _delta(diff: Any, se: Any, significant: bool | None) -> str:
    return diff_cell(diff, se) + ("*" if significant else "")


def _retained(row: Mapping[str, Any]) -> str:
    if num(row.get("retained_pct")) is None:
        return MISSING
    interval = "" if num(row.get("retained_low")) is None else f" [{row['retained_low']:.1f}, {row['retained_high']:.1f}]"
    return f"{row['retained_pct']:.1f}{interval}"


def _flags(row: Mapping[str, Any]) -> str:
    return "; ".join(f for f in ("collapsed" if row.get("collapsed") else "", row.get("drift_mark") or "") if f)


def protocol_lines(decision: Mapping[str, Any], tasks: list[str], rows: list[dict] | None = None) -> list[str]:
    """What every table of the comparison says first: the headline rule, the counted and the excluded
    tasks with their reasons, how drift and collapse are marked, and what is not measured yet."""
    lines = [*rule_lines(decision), ""]
    tested = sorted({t for r in rows or [] if r.get("drift") for t in r["drift"]["tested"]})
    derived = any(d.get("derived") for r in rows or [] if r.get("drift") for d in r["drift"]["tasks"].values())
    lines.append(f"**drift**: a run's answer distribution on a task differs from dense's on the same documents (Stuart-Maxwell "
                 f"test of marginal homogeneity, McNemar's for two choices; p < {DRIFT_ALPHA} / tasks tested); the mark names the "
                 f"class whose share of the answers grew most, with dense's share and the run's. Tested here: {', '.join(tested) or 'none'}"
                 + (" (answers of two-choice tasks derived exactly from each document's 0/1 result and gold answer)" if derived else "")
                 + ("; the other tasks need the per-document answers the evaluate stage stores from now on" if set(tasks) - set(tested) else "")
                 + ".")
    lines.append(f"**collapsed**: WikiText-2 perplexity above {COLLAPSE_FACTOR:g}x dense's; ranked after every working run.")
    if "lambada_openai" not in tasks:
        lines.append("**LAMBADA** (OpenAI): not in these runs; it is part of the default suite from now on.")
    return lines


def table_markdown(records: list[dict], rows: list[dict], tasks: list[str], title: str, missing: list[dict],
                   decision: Mapping[str, Any], consistency: Mapping[str, Any] | None = None) -> str:
    """``table.md``: the header, the headline protocol, one line per run (dense first), the ranking, and
    headline vs perplexity."""
    out = header_lines(records, title) + ["", *protocol_lines(decision, tasks, rows), ""]
    out.append("Headline: mean of each counted task's reported metric (acc_norm for HellaSwag, ARC-c, OpenBookQA; acc "
               "otherwise) ± its standard error. Δ: final model − dense in points ± the standard error of the difference, "
               "paired over the same documents; `*` only where |Δ| > 1.96 se. Retained: % of dense's headline [95 % interval "
               f"from the paired Δ]. All {len(tasks)}: the unweighted mean of every task, as reported before the headline, for "
               "comparison. The final model is the recovered one where the run trains.")
    out.append("")
    task_cols = [t for t in tasks if t != "mmlu"]
    header = ["run", "method", "layers", "wiki2 PPL", "c4 PPL", f"headline % ({len(decision['tasks'])})", "Δ vs dense", "retained %",
              "flags", f"all {len(tasks)} %", f"Δ all {len(tasks)}", "MMLU %", *task_cols, "compress s", "recover s", "note"]
    lines = []
    for row in rows:
        method = (row["method"] or MISSING) + (f", recovery={row['recovery']}" if row["recovery"] else "")
        mmlu = row["tasks"].get("mmlu")
        dense = row["run"] == "dense"
        lines.append([
            row["run"], MISSING if dense else method, fmt(row["layers"], ".0f"), _ppl(row["wikitext2_ppl"]), _ppl(row["c4_ppl"]),
            _acc_se(row["headline"], row["headline_se"]), MISSING if dense else _delta(row["diff"], row["diff_se"], row["significant"]),
            MISSING if dense else _retained(row), _flags(row),
            _acc_se(row["average"], row["average_se"]),
            MISSING if dense else _delta(row["average_diff"], row["average_diff_se"], row["average_significant"]),
            _acc_se(mmlu["value"], mmlu["se"]) if mmlu else MISSING,
            *(fmt(None if row["tasks"][t]["value"] is None else 100 * row["tasks"][t]["value"], ".2f") for t in task_cols),
            fmt(row["timings"].get("compress_s"), ".1f"), fmt(row["timings"].get("recover_wall_s"), ".1f"), "; ".join(row["notes"]),
        ])
    out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|", *("| " + " | ".join(r) + " |" for r in lines)]
    if missing:
        out += ["", "Not in the table (no numbers of their own): "
                + "; ".join(f"{m['run']} ({m['state']}: {m['reason']})" for m in missing) + "."]
    out += ["", "## Ranking", "", "Every run by headline, working runs first, then collapsed ones (a collapsed model is not a "
            "working language model whatever its task scores); the verdict is the headline's Δ vs dense.", ""]
    out += ["| # | run | layers | headline % | Δ vs dense | verdict | wiki2 PPL | flags |", "|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(ranking(rows[1:]), 1):
        out.append(f"| {i} | {row['run']} | {fmt(row['layers'], '.0f')} | {_acc_se(row['headline'], row['headline_se'])} | "
                   f"{_delta(row['diff'], row['diff_se'], row['significant'])} | {row['verdict'] or MISSING} | "
                   f"{_ppl(row['wikitext2_ppl'])} | {_flags(row)} |")
    if consistency is not None:
        out += ["", *consistency_lines(consistency)]
    return "\n".join(out) + "\n"


def consistency_lines(consistency: Mapping[str, Any]) -> list[str]:
    """Headline vs perplexity: Spearman's rank agreement and every inversion (A above B, A's PPL >= 3x B's)."""
    rho = consistency["rho"]
    out = ["## Headline vs perplexity", "",
           f"Spearman's rank agreement between headline and WikiText-2 perplexity over {consistency['n']} runs (dense "
           f"included; +1: both order every run alike): **{MISSING if rho is None else f'{rho:+.2f}'}**. Pairs where the "
           f"headline puts A above B while A's perplexity is at least {consistency['factor']:g}x B's: "
           f"{len(consistency['inversions'])}" + ("." if not consistency["inversions"] else ":"), ""]
    if consistency["inversions"]:
        out += ["| A | B | headline A − B | A's PPL / B's |", "|---|---|---|---|"]
        out += [f"| {p['a']} | {p['b']} | {_delta(p['diff'], p['se'], p['significant'])} | {p['ppl_a'] / p['ppl_b']:.3g} |"
                for p in consistency["inversions"]]
    return out


def pairs_markdown(pairs: list[dict], layers: int | None, title: str, decision: Mapping[str, Any] | None = None,
                   tasks: list[str] | None = None, rows: list[dict] | None = None, pairs_all: list[dict] | None = None) -> str:
    """``pairs.md``: the headline protocol, every pair of runs at ``layers`` layers (with the all-task average's
    difference the comparison reported before, ``pairs_all``), then the matrix of who is ahead."""
    out = [f"# {title}: pairs of {layers if layers is not None else '?'}-layer runs", ""]
    if decision is not None:
        out += [*protocol_lines(decision, tasks or [], rows), ""]
    flags = {r["run"]: _flags(r) for r in rows or []}
    out += ["Δ = a − b in headline points ± its standard error (paired over the same documents where both runs have "
            "per-document results). A run is ahead only when |Δ| > 1.96 se; otherwise the two are within noise.", ""]
    if not pairs:
        return "\n".join(out + ["No two runs at this depth were collected."]) + "\n"
    earlier = {(p["a"], p["b"]): p for p in pairs_all or []}
    every = f"Δ all {len(tasks or [])} (before)"
    out += [f"| a | b | Δ (a − b) | paired | ahead | {every} | flags a / b |", "|---|---|---|---|---|---|---|"]
    out += [f"| {p['a']} | {p['b']} | {_delta(p['diff'], p['se'], p['significant'])} | {'yes' if p['paired'] else 'no'} | "
            f"{p['ahead'] or ('within noise' if p['se'] is not None else 'no se')} | "
            f"{_delta(e['diff'], e['se'], e['significant']) if (e := earlier.get((p['a'], p['b']))) else MISSING} | "
            f"{flags.get(p['a']) or '·'} / {flags.get(p['b']) or '·'} |" for p in pairs]
    matrix = beats_matrix(pairs)
    names = list(matrix)
    out += ["", "Row vs column: ▲ row ahead beyond the noise, ▼ behind, · within noise.", "",
            "| | " + " | ".join(names) + " |", "|---|" + "|".join("---" for _ in names) + "|"]
    out += [f"| {n} | " + " | ".join(matrix[n][m] or "" for m in names) + " |" for n in names]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# writing the folder


def _missing_entries(run_list: RunList, records: list[dict], missing: list[dict] | None) -> list[dict]:
    collected = {r["name"] for r in records}
    given = {m["run"]: m for m in missing or []}
    return [given.get(run.name) or {"run": run.name, "experiment": run_list.experiment(run), "state": "not collected",
                                    "reason": "not among the finished runs read"}
            for run in run_list.runs if run.name not in collected]


def compare_records(run_list: RunList, records: list[dict], setting: Any = "auto", facts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every number of the comparison from the records: the informative tasks, the rows, the pairs at the
    comparison depth, the depth curves and headline vs perplexity."""
    tasks = tasks_of(records)
    decision = decide(records, tasks, setting, facts)
    rows = summary_rows(records, tasks, decision, facts)
    dense_layers = rows[0]["layers"]
    compare_layers = None if dense_layers is None else dense_layers - run_list.compare_at
    return {"tasks": tasks, "decision": decision, "rows": rows, "compare_layers": compare_layers,
            "pairs": pair_rows(records, decision["tasks"], compare_layers), "pairs_all": pair_rows(records, tasks, compare_layers),
            "curves": depth_curves(records, rows),
            "consistency": agreement(records, rows, decision["tasks"])}


WRITTEN = {"runs", "runs.json", "task_facts.json", "table.md", "pairs.md", "findings.md", "depth.json", "depth.png"}


def write_comparison(out: str | Path, run_list: RunList, records: list[dict], title: str, missing: list[dict] | None = None,
                     setting: Any = "auto", facts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``runs/<name>.json``, ``runs.json``, ``table.md``, ``pairs.md``, ``findings.md``, ``depth.json``,
    ``depth.png`` (and ``task_facts.json`` when ``facts`` are given) into ``out`` in one atomic step; return
    what was written (tasks, decision, rows, pairs, curves, consistency, missing runs with their state)."""
    if not records:
        raise ValueError(f"no run of {run_list.source} was found among the finished runs; nothing written to {out}")
    result = compare_records(run_list, records, setting, facts)
    result["missing"] = _missing_entries(run_list, records, missing)
    decision, tasks, rows = result["decision"], result["tasks"], result["rows"]
    kept = [p for p in Path(out).iterdir() if p.name not in WRITTEN] if Path(out).is_dir() else []
    with atomic_dir(out) as tmp:
        for path in kept:  # files this function does not write (e.g. a saved `dvc exp show`) stay in the folder
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp / path.name)
        for record in records:
            write_json(tmp / "runs" / f"{record['name']}.json", record)
        write_json(tmp / "runs.json", {"run_list": portable_path(run_list.source), "order": [r["name"] for r in records],
                                       "missing": result["missing"], "compare_layers": result["compare_layers"],
                                       "headline": {k: decision[k] for k in ("rule", "text", "tasks", "excluded")},
                                       "headline_setting": setting})
        if facts is not None:
            write_json(tmp / "task_facts.json", facts)
        (tmp / "table.md").write_text(table_markdown(records, rows, tasks, title, result["missing"], decision, result["consistency"]))
        (tmp / "pairs.md").write_text(pairs_markdown(result["pairs"], result["compare_layers"], title, decision, tasks, rows,
                                                     result["pairs_all"]))
        (tmp / "findings.md").write_text(findings_markdown(result, title, model_caveat(records)))
        write_json(tmp / "depth.json", {"tasks": decision["tasks"], "rule": decision["rule"], "curves": result["curves"],
                                        "notes": "headline: mean reported accuracy over the informative tasks; se: its standard "
                                                 "error; diff/diff_se: vs dense, paired per document where available"})
        depth_figure(result["curves"], tmp / "depth.png", title=f"{title}: headline and perplexity vs layers removed",
                     headline_label=f"headline % ({len(decision['tasks'])} informative tasks)")
    return result


def missing_names(folder: str | Path) -> list[str]:
    """The runs a collected folder lists as missing (any ``runs.json`` layout)."""
    return [m if isinstance(m, str) else m["run"] for m in read_json(Path(folder) / "runs.json").get("missing", [])]


def load_task_facts(folder: str | Path) -> dict[str, Any] | None:
    """``task_facts.json`` of a collected folder (per task: floor and gold answers), if it has one."""
    path = Path(folder) / "task_facts.json"
    return read_json(path) if path.is_file() else None
