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
import itertools
import json
import re
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
from layerfold.report.compare import runs_from_dvc_exp_show, runs_from_methods_dir
from layerfold.report.noise import difference, mean_difference, mean_stderr
from layerfold.report.plots import _figure, save_png
from layerfold.report.tables import (
    MISSING, average_accuracy, common_tasks, diff_cell, experiments_table, final_metrics, fmt, num, reported_metric,
)
from layerfold.stage import expand
from layerfold.validation import check

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a git ref component and a file name
RUN_KEYS = {"overrides", "remove", "curve"}
LIST_KEYS = {"experiment_prefix", "common", "compare_at", "runs"}
METRIC_FILES = ("dense", "compressed", "recovered", "compress", "compress_time", "recover")
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

FileReader = Callable[[str, str], Any]  # (git revision, path in the repository) -> parsed JSON, or None


def git_reader(root: str | Path = ".") -> FileReader:
    """Read a JSON file as an experiment committed it (``git show <rev>:<path>``); None where git cannot."""

    def read(rev: str, path: str) -> Any:
        result = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], capture_output=True, text=True)
        return json.loads(result.stdout) if result.returncode == 0 and result.stdout.strip() else None

    return read


def _timings(metrics: Mapping[str, Any]) -> dict[str, Any]:
    compress_time, recover = metrics.get("compress_time") or {}, metrics.get("recover") or {}
    return {
        "compress_s": num(compress_time.get("seconds")),
        "compress_peak_mib": num(compress_time.get("peak_memory_mib")),
        "recover_wall_s": num(recover.get("wall_seconds")),
        "recover_train_s": num(recover.get("train_seconds")),
        "recover_tokens_per_s": num(recover.get("tokens_per_s")),
        "evaluate_s": {k: (metrics.get(k) or {}).get("wall_time") for k in ("dense", "compressed", "recovered") if metrics.get(k)},
    }


def make_record(run_list: RunList, planned: PlannedRun, metrics: dict[str, Any], params: Mapping[str, Any], source: str,
                origin: str, timestamp: str | None = None) -> dict[str, Any]:
    """One run's JSON: what was planned, the params that matter, every metrics file whole, and its timings.
    ``source`` is "dvc experiment" or "run_methods folder"; ``origin`` the experiment's commit or the folder."""
    recovered = metrics.get("recovered")
    if recovered and "same_model_as" in recovered:  # recovery=none: the final model is the compressed one
        metrics = {**metrics, "recovered": None}
    return {
        "name": planned.name, "experiment": run_list.experiment(planned), "source": source, "origin": origin, "timestamp": timestamp,
        "remove": planned.remove, "curve": planned.curve, "overrides": list(planned.overrides),
        "params": {k: params.get(k) for k in PARAM_SECTIONS if k in params},
        "metrics": {k: metrics.get(k) for k in METRIC_FILES},
        "timings": _timings(metrics),
    }


def records_from_exp_show(payload: list[dict], run_list: RunList, read_file: FileReader | None = None) -> list[dict]:
    """Records of the run list's finished experiments in a ``dvc exp show --json`` payload (the newest
    experiment where a name occurs under several commits); each metrics file read whole through
    ``read_file`` where it can be, else as DVC showed it (without per-document lists)."""
    wanted = {run_list.experiment(run): run for run in run_list.runs}
    newest: dict[str, dict] = {}
    for run in runs_from_dvc_exp_show(payload):
        if run["name"] in wanted and (run["name"] not in newest or (run["timestamp"] or "") > (newest[run["name"]]["timestamp"] or "")):
            newest[run["name"]] = run
    records = []
    for planned in run_list.runs:
        run = newest.get(run_list.experiment(planned))
        if run is None:
            continue
        metrics = {}
        for key in METRIC_FILES:
            path = run["metric_files"].get(key)
            whole = read_file(run["rev"], path) if read_file is not None and path and run.get("rev") else None
            metrics[key] = whole if whole is not None else run.get(key)
        records.append(make_record(run_list, planned, metrics, run["params"], "dvc experiment", run["rev"], run["timestamp"]))
    return records


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


def summary_rows(records: list[dict], tasks: list[str]) -> list[dict]:
    """The dense row, then one row per record: layers (and whether the run landed where planned),
    perplexities, average ± se, Δ vs its dense ± se, every task, timings."""
    if not records:
        return []
    dense = records[0]["metrics"]["dense"] or {}
    dense_tasks = [task_result(dense, None, t) for t in tasks]
    rows = [{
        "run": "dense", "method": None, "recovery": None, "layers": _layers(dense), "expected_layers": _layers(dense),
        "wikitext2_ppl": num(((dense.get("perplexity") or {}).get("wikitext2") or {}).get("perplexity")),
        "c4_ppl": num(((dense.get("perplexity") or {}).get("c4") or {}).get("perplexity")),
        "average": average_accuracy(dense, tasks) if tasks else None, "average_se": mean_stderr([t["se"] for t in dense_tasks]),
        "diff": None, "diff_se": None, "paired": None, "significant": None,
        "tasks": dict(zip(tasks, dense_tasks)), "timings": {}, "notes": [],
    }]
    for record, table_row in zip(records, experiments_table([_as_run(r) for r in records], tasks)):
        run_dense, final = record["metrics"]["dense"] or {}, _final(record)
        per_task = {t: task_result(final, run_dense, t) for t in tasks}
        expected = None if _layers(run_dense) is None else _layers(run_dense) - record["remove"]
        notes = []
        if _layers(final) is not None and expected is not None and _layers(final) != expected:
            notes.append(f"landed at {_layers(final)} layers, planned {expected}")
        if per_task and not all(r["paired"] for r in per_task.values()):
            notes.append("unpaired se (per-document results not available)")
        if (run_dense.get("lm_eval"), run_dense.get("perplexity")) != (dense.get("lm_eval"), dense.get("perplexity")):
            notes.append("its dense metrics differ from the first run's")
        rows.append({
            "run": record["name"],
            "method": (record["params"].get("method") or {}).get("name") or (record["metrics"].get("compress") or {}).get("method"),
            "recovery": None if record["metrics"].get("recovered") is None else (record["params"].get("recovery") or {}).get("name"),
            "layers": _layers(final), "expected_layers": expected,
            "wikitext2_ppl": table_row["wikitext2_ppl"], "c4_ppl": table_row["c4_ppl"],
            "average": table_row["average"], "average_se": table_row["average_stderr"],
            "diff": table_row["diff"], "diff_se": table_row["diff_se"], "significant": table_row["significant"],
            "paired": all(r["paired"] for r in per_task.values()) if per_task else None,
            "tasks": per_task, "timings": record["timings"], "notes": notes,
        })
    return rows


def pair_rows(records: list[dict], tasks: list[str], layers: int | None) -> list[dict]:
    """Every pair of records whose final model has ``layers`` layers: ``a - b`` in average accuracy with
    its standard error (paired over the same documents where per-document results exist), and which is
    ahead: only when the difference is beyond 1.96 standard errors."""
    eligible = [r for r in records if layers is not None and _layers(_final(r)) == layers]
    rows = []
    for a, b in itertools.combinations(eligible, 2):
        d = average_difference(_final(a), _final(b), tasks)
        ahead = None if not d["significant"] else a["name"] if d["diff"] > 0 else b["name"]
        rows.append({"a": a["name"], "b": b["name"], "diff": d["diff"], "se": d["se"], "paired": d["paired"],
                     "significant": d["significant"], "ahead": ahead})
    return rows


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
    """Per curve, its points by layers removed, starting from dense at 0: average ± se, Δ vs dense ± se, PPL."""
    by_run = {r["run"]: r for r in rows}
    dense = by_run.get("dense")
    curves: dict[str, list[dict]] = {}
    fields = ("layers", "average", "average_se", "diff", "diff_se", "significant", "wikitext2_ppl", "c4_ppl")
    for record in records:
        if record["curve"] is None or record["name"] not in by_run:
            continue
        if record["curve"] not in curves and dense is not None:
            curves[record["curve"]] = [{"removed": 0, "run": "dense", **{k: dense[k] for k in fields}}]
        curves.setdefault(record["curve"], []).append({"removed": record["remove"], "run": record["name"],
                                                       **{k: by_run[record["name"]][k] for k in fields}})
    return {name: sorted(points, key=lambda p: p["removed"]) for name, points in curves.items()}


def depth_figure(curves: dict[str, list[dict]], path: str | Path | None = None, title: str | None = None):
    """Average accuracy (± 1.96 se bars) and perplexity (log scale; WikiText-2 solid, C4 dashed) against
    layers removed, one colour per curve."""
    fig = _figure(12.0, 4.8)
    acc_ax, ppl_ax = fig.subplots(1, 2)
    for i, (name, points) in enumerate(curves.items()):
        colour, shift = f"C{i % 10}", 0.1 * (i - (len(curves) - 1) / 2)  # shifted a little so error bars stay apart
        acc = [p for p in points if p["average"] is not None]
        acc_ax.errorbar([p["removed"] + shift for p in acc], [100 * p["average"] for p in acc],
                        yerr=[196 * (p["average_se"] or 0.0) for p in acc], color=colour, marker="o", capsize=3, label=name)
        for key, style in (("wikitext2_ppl", "-"), ("c4_ppl", "--")):
            ppl = [p for p in points if p[key] is not None]
            ppl_ax.plot([p["removed"] for p in ppl], [p[key] for p in ppl], style, color=colour, marker="o",
                        label=name if key == "wikitext2_ppl" else None)
    removed = sorted({p["removed"] for points in curves.values() for p in points})
    for ax in (acc_ax, ppl_ax):
        ax.set_xticks(removed)
        ax.set_xlabel("layers removed")
        ax.grid(alpha=0.3)
    acc_ax.set_ylabel("average accuracy % (± 1.96 se)")
    acc_ax.legend(fontsize=8)
    ppl_ax.set_ylabel("perplexity (solid: WikiText-2, dashed: C4)")
    ppl_ax.set_yscale("log")
    ppl_ax.legend(fontsize=8)
    fig.suptitle(title or "Accuracy and perplexity vs layers removed")
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


def header_lines(records: list[dict], title: str) -> list[str]:
    """Where the numbers come from, all read from the records: model file and hash, quantisation, date,
    device, library versions, evaluation and calibration settings."""
    metric_sets = [m for r in records for k in ("dense", "compressed", "recovered") if (m := r["metrics"].get(k))]
    models = [m.get("model") or {} for m in metric_sets]
    environments = [m.get("versions") or {} for m in metric_sets]
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
        f"- **Device**: {_distinct(m.get('device') for m in metric_sets)} (dtype {_distinct(m.get('dtype') for m in metric_sets)})",
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


def table_markdown(records: list[dict], rows: list[dict], tasks: list[str], title: str, missing: list[str]) -> str:
    """``table.md``: the header, then one line per run (dense first)."""
    out = header_lines(records, title) + [""]
    task_cols = [t for t in tasks if t != "mmlu"]
    out.append(f"Average: unweighted mean of the headline metric (acc_norm for HellaSwag, ARC-c, OpenBookQA; acc otherwise) over "
               f"the {len(tasks)} tasks every run has ({', '.join(tasks)}), ± its standard error. Δ: final model − dense in points "
               "± the standard error of the difference, paired over the same documents; `*` only where |Δ| > 1.96 se. "
               "The final model is the recovered one where the run trains.")
    out.append("")
    header = ["run", "method", "layers", "wiki2 PPL", "c4 PPL", f"avg % ({len(tasks)} tasks)", "Δ vs dense", "MMLU %",
              *task_cols, "compress s", "recover s", "note"]
    lines = []
    for row in rows:
        method = (row["method"] or MISSING) + (f", recovery={row['recovery']}" if row["recovery"] else "")
        mmlu = row["tasks"].get("mmlu")
        dense = row["run"] == "dense"
        lines.append([
            row["run"], MISSING if dense else method, fmt(row["layers"], ".0f"), _ppl(row["wikitext2_ppl"]), _ppl(row["c4_ppl"]),
            _acc_se(row["average"], row["average_se"]), MISSING if dense else _delta(row["diff"], row["diff_se"], row["significant"]),
            _acc_se(mmlu["value"], mmlu["se"]) if mmlu else MISSING,
            *(fmt(None if row["tasks"][t]["value"] is None else 100 * row["tasks"][t]["value"], ".2f") for t in task_cols),
            fmt(row["timings"].get("compress_s"), ".1f"), fmt(row["timings"].get("recover_wall_s"), ".1f"), "; ".join(row["notes"]),
        ])
    out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|", *("| " + " | ".join(r) + " |" for r in lines)]
    if missing:
        out += ["", f"Not collected (not finished, failed, or not run): {', '.join(missing)}."]
    return "\n".join(out) + "\n"


def pairs_markdown(pairs: list[dict], layers: int | None, title: str) -> str:
    """``pairs.md``: every pair of runs at ``layers`` layers, then the matrix of who is ahead."""
    out = [f"# {title}: pairs of {layers if layers is not None else '?'}-layer runs", "",
           "Δ = a − b in average accuracy points ± its standard error (paired over the same documents where both runs "
           "have per-document results). A run is ahead only when |Δ| > 1.96 se; otherwise the two are within noise.", ""]
    if not pairs:
        return "\n".join(out + ["No two runs at this depth were collected."]) + "\n"
    out += ["| a | b | Δ (a − b) | paired | ahead |", "|---|---|---|---|---|"]
    out += [f"| {p['a']} | {p['b']} | {_delta(p['diff'], p['se'], p['significant'])} | {'yes' if p['paired'] else 'no'} | "
            f"{p['ahead'] or ('within noise' if p['se'] is not None else 'no se')} |" for p in pairs]
    matrix = beats_matrix(pairs)
    names = list(matrix)
    out += ["", "Row vs column: ▲ row ahead beyond the noise, ▼ behind, · within noise.", "",
            "| | " + " | ".join(names) + " |", "|---|" + "|".join("---" for _ in names) + "|"]
    out += [f"| {n} | " + " | ".join(matrix[n][m] or "" for m in names) + " |" for n in names]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# writing the folder


def write_comparison(out: str | Path, run_list: RunList, records: list[dict], title: str) -> dict[str, Any]:
    """Write ``runs/<name>.json``, ``runs.json``, ``table.md``, ``pairs.md``, ``depth.json`` and ``depth.png``
    into ``out`` in one atomic step; return what was written (rows, pairs, curves, missing runs)."""
    if not records:
        raise ValueError(f"no run of {run_list.source} was found among the finished runs; nothing written to {out}")
    tasks = tasks_of(records)
    rows = summary_rows(records, tasks)
    dense_layers = rows[0]["layers"]
    compare_layers = None if dense_layers is None else dense_layers - run_list.compare_at
    pairs = pair_rows(records, tasks, compare_layers)
    curves = depth_curves(records, rows)
    collected = {r["name"] for r in records}
    missing = [run.name for run in run_list.runs if run.name not in collected]
    with atomic_dir(out) as tmp:
        for record in records:
            write_json(tmp / "runs" / f"{record['name']}.json", record)
        write_json(tmp / "runs.json", {"run_list": portable_path(run_list.source), "order": [r["name"] for r in records], "missing": missing,
                                       "compare_layers": compare_layers})
        (tmp / "table.md").write_text(table_markdown(records, rows, tasks, title, missing))
        (tmp / "pairs.md").write_text(pairs_markdown(pairs, compare_layers, title))
        write_json(tmp / "depth.json", {"tasks": tasks, "curves": curves,
                                        "notes": "average: mean headline accuracy over the tasks; se: its standard error; "
                                                 "diff/diff_se: vs dense, paired per document where available"})
        depth_figure(curves, tmp / "depth.png", title=f"{title}: accuracy and perplexity vs layers removed")
    return {"tasks": tasks, "rows": rows, "pairs": pairs, "curves": curves, "missing": missing}
