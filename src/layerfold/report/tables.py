"""Dense-vs-compressed tables: the numbers of the report (:mod:`layerfold.report.markdown` lays them out)
and of every reader of runs, and the cells they are printed in.

Everything here reads the JSON the stages wrote (``metrics/<name>.json`` from ``pipeline.evaluate``,
``metrics/compress.json`` and ``artifacts/compressed/plan.json`` from ``pipeline.compress``,
``artifacts/capture/stats.json`` from ``pipeline.capture``) and never makes a number up: a value
that is absent or not finite is ``None`` in the rows and "—" in the Markdown.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerfold.evaluation.efficiency import efficiency_speedups
from layerfold.evaluation.results import merge_documents
from layerfold.io import read_json
from layerfold.report.noise import difference, mean_difference, mean_stderr

MISSING = "—"

# Order of the headline table (Shortened-LLaMA's column order, MMLU last).
TASK_ORDER = ["boolq", "boolq_notitle", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "mmlu"]

# Metric the headline column and the average use, per task: the convention of
# Nota-NetsPresso/shortened-llm (their ``results/*/zeroshot_acc.csv``). Both acc and acc_norm are shown anyway.
REPORTED_METRIC: dict[str, str] = {
    "boolq": "acc",
    "boolq_notitle": "acc",  # offline BoolQ: the local passages lack the stock "<title> -- " prefix
    "piqa": "acc",
    "winogrande": "acc",
    "arc_easy": "acc",
    "hellaswag": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "mmlu": "acc",
}

PARAM_ROWS = [("params_total", "parameters (total)"), ("params_non_embedding", "parameters (non-embedding)"), ("num_layers", "layers")]
EFFICIENCY_ROWS = [
    ("prefill_latency_ms", "prefill latency (ms)", "lower"),
    ("decode_tokens_per_s", "decode throughput (tokens/s)", "higher"),
    ("peak_memory_mib", "peak memory (MiB)", "lower"),
]


# ------------------------------------------------------------------------------------------------
# numbers


def num(value: Any) -> float | None:
    """``value`` as a finite float, else None (bools, strings, NaN and inf are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either is missing or ``b`` is 0."""
    return a / b if a is not None and b not in (None, 0.0) else None


def _retained(compressed: float | None, dense: float | None) -> float | None:
    r = ratio(compressed, dense)
    return None if r is None else 100.0 * r


def get(tree: dict | None, *keys: str) -> Any:
    """``tree[k1][k2]...``, or None where a level is missing."""
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _sorted_tasks(tasks: set[str]) -> list[str]:
    return [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))


def reported_metric(task: str, *results: dict | None) -> str | None:
    """The task's headline metric if every result has it, else ``acc`` if every result has that."""
    for metric in (REPORTED_METRIC.get(task, "acc"), "acc"):
        if results and all(num(get(r, metric)) is not None for r in results):
            return metric
    return None


def average_accuracy(metrics: dict, tasks: list[str] | None = None) -> float | None:
    """Mean headline metric over ``tasks`` (default: all in ``metrics['lm_eval']``); None if one is missing."""
    lm_eval = metrics.get("lm_eval") or {}
    tasks = list(lm_eval) if tasks is None else tasks
    values = [num(get(lm_eval, t, reported_metric(t, lm_eval.get(t)) or "acc")) for t in tasks]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


# ------------------------------------------------------------------------------------------------
# tables


def comparison_table(dense: dict, compressed: dict, headline_tasks: list[str] | None = None) -> list[dict]:
    """Rows comparing two ``metrics/<name>.json`` dicts.

    Every row has ``section`` (accuracy | perplexity | parameters), ``name``, ``metric``, ``dense``,
    ``compressed``, ``retained_pct`` (compressed / dense x 100, where higher is better) and ``ratio``
    (compressed / dense, for perplexity, where lower is better). Accuracy rows also carry
    ``{dense,compressed}_{acc,acc_norm}``, the headline metric's stderrs, ``n`` (docs) and the
    difference compressed − dense with its standard error (``diff``, ``diff_se``, ``paired``,
    ``significant``: see :mod:`layerfold.report.noise`). The ``average`` row averages the headline
    metric over the tasks present in both; its retained % is the ratio of the two averages and its
    difference the mean of the task differences. With ``headline_tasks`` (the informative tasks of
    :func:`layerfold.report.protocol.informative_tasks`) that row is the ``headline`` over those tasks
    instead. ``note`` flags comparisons whose settings differ.
    """
    rows: list[dict] = []
    d_eval, c_eval = dense.get("lm_eval") or {}, compressed.get("lm_eval") or {}
    common: list[str] = []
    for task in _sorted_tasks(set(d_eval) | set(c_eval)):
        d, c = d_eval.get(task), c_eval.get(task)
        metric = reported_metric(task, *(r for r in (d, c) if r is not None))
        dv, cv = num(get(d, metric or "")), num(get(c, metric or ""))
        if metric and d is not None and c is not None and dv is not None and cv is not None:
            common.append(task)
        row = {
            "section": "accuracy", "name": task, "metric": metric, "dense": dv, "compressed": cv,
            "retained_pct": _retained(cv, dv), "ratio": None,
            "dense_stderr": num(get(d, f"{metric}_stderr")), "compressed_stderr": num(get(c, f"{metric}_stderr")),
            "n": num(get(c, "n")) if num(get(c, "n")) is not None else num(get(d, "n")),
            "note": "only in dense" if c is None else "only in compressed" if d is None
            else None if num(get(d, "n")) == num(get(c, "n")) else "different number of docs",
        }
        for m in ("acc", "acc_norm"):
            row[f"dense_{m}"], row[f"compressed_{m}"] = num(get(d, m)), num(get(c, m))
        row.update(_diff_fields(difference(d, c, metric) if metric else difference(None, None, "")))
        rows.append(row)
    summary_name = "average"
    if headline_tasks is not None:
        common, summary_name = [t for t in common if t in headline_tasks], "headline"
    if common:
        d_avg = sum(r["dense"] for r in rows if r["name"] in common) / len(common)
        c_avg = sum(r["compressed"] for r in rows if r["name"] in common) / len(common)
        rows.append({
            "section": "accuracy", "name": summary_name, "metric": "headline", "dense": d_avg, "compressed": c_avg,
            "retained_pct": _retained(c_avg, d_avg), "ratio": None, "tasks": common,
            "dense_stderr": mean_stderr([r["dense_stderr"] for r in rows if r["name"] in common]),
            "compressed_stderr": mean_stderr([r["compressed_stderr"] for r in rows if r["name"] in common]),
            **_diff_fields(mean_difference([_undiff(r) for r in rows if r["name"] in common])),
            "note": (f"over the {len(common)} informative task(s)" if headline_tasks is not None
                     else None if len(common) == len(set(d_eval) | set(c_eval)) else f"over the {len(common)} tasks present in both"),
        })

    d_ppl, c_ppl = dict(dense.get("perplexity") or {}), dict(compressed.get("perplexity") or {})
    for task in sorted(set(d_eval) | set(c_eval)):  # LAMBADA: the perplexity of the target words, beside the corpora's
        if any(num(get(m, task, "perplexity")) is not None for m in (d_eval, c_eval)):
            d_ppl[f"{task} (targets)"] = {"perplexity": get(d_eval, task, "perplexity")}
            c_ppl[f"{task} (targets)"] = {"perplexity": get(c_eval, task, "perplexity")}
    for dataset in sorted(set(d_ppl) | set(c_ppl)):
        d, c = d_ppl.get(dataset), c_ppl.get(dataset)
        dv, cv = num(get(d, "perplexity")), num(get(c, "perplexity"))
        differ = [k for k in ("seq_len", "windows", "add_bos") if d and c and d.get(k) != c.get(k)]
        rows.append({
            "section": "perplexity", "name": dataset, "metric": "perplexity", "dense": dv, "compressed": cv,
            "retained_pct": None, "ratio": ratio(cv, dv),
            "note": f"settings differ: {', '.join(differ)}" if differ else None,
        })

    for key, label in PARAM_ROWS:
        dv, cv = num(get(dense, "model", key)), num(get(compressed, "model", key))
        rows.append({
            "section": "parameters", "name": label, "metric": key, "dense": dv, "compressed": cv,
            "retained_pct": _retained(cv, dv), "ratio": None, "note": None,
        })
    return rows


def _diff_fields(d: dict) -> dict:
    return {"diff": d["diff"], "diff_se": d["se"], "paired": d["paired"], "significant": d["significant"]}


def _undiff(row: dict) -> dict:
    return {"diff": row["diff"], "se": row["diff_se"], "paired": row["paired"], "significant": row["significant"]}


def efficiency_table(dense: dict, compressed: dict) -> list[dict]:
    """Rows ``{name, metric, better, dense, compressed, ratio}`` from the two ``efficiency`` blocks."""
    d, c = dense.get("efficiency") or {}, compressed.get("efficiency") or {}
    rows = []
    for key, label, better in EFFICIENCY_ROWS:
        dv, cv = num(d.get(key)), num(c.get(key))
        rows.append({"name": label, "metric": key, "better": better, "dense": dv, "compressed": cv, "ratio": ratio(cv, dv)})
    return rows


def efficiency_speedup_rows(dense: dict, compressed: dict) -> list[dict]:
    """Rows ``{phase, speedup, speedup_min, speedup_max, speedup_bound, measurement_suspect, paired}``:
    dense / compressed time of the prefill and of a decode step, from the two ``evaluate`` stages'
    separate measurements (``paired`` is False: not alternated in one process), with the FLOP bound.
    A phase an older metrics file lacks the spread or FLOPs of has ``None`` values."""
    checks = efficiency_speedups(dense.get("efficiency") or {}, compressed.get("efficiency") or {})
    empty = {"speedup": None, "speedup_min": None, "speedup_max": None, "speedup_bound": None, "measurement_suspect": None}
    return [{"phase": phase, **(check or empty), "paired": False} for phase, check in checks.items()]


def run_model(run: dict) -> str | None:
    """The model a run compressed: its recorded name, else ``<model_type>-<params>M``."""
    name = get(run, "meta", "model") or get(run, "dense", "model", "name")
    if name:
        return str(name)
    model_type, params = get(run, "dense", "model", "model_type"), num(get(run, "dense", "model", "params_total"))
    return f"{model_type}-{params / 1e6:.0f}M" if model_type and params else None


def final_metrics(run: dict) -> dict:
    """The metrics of the model a run ends with: recovered when recovery ran, else compressed."""
    return run.get("recovered") or run.get("compressed") or {}


def experiments_table(runs: list[dict], tasks: list[str] | None = None, setting: Any = None,
                      facts: Mapping[str, Any] | None = None) -> list[dict]:
    """One row per run (:func:`load_run` dicts, or runs read by :mod:`layerfold.runs.sources`): model, method, size, average accuracy
    (± its standard error, and the difference to dense with its own), WikiText-2 and C4 PPL of the
    final model (recovered when the run has one).

    With ``setting`` (``eval.headline.tasks``: ``"auto"`` or a task list) the average is each run's
    headline from :func:`layerfold.report.reader.run_headline` (its own informative tasks, listed in
    ``headline_tasks``), the numbers the report stage writes to ``metrics/summary.json``, whatever
    other runs are listed; without it, the plain average over ``tasks`` (default: those every run has)."""
    from layerfold.report.reader import run_headline  # reader builds on this module

    tasks = common_tasks(runs) if tasks is None else tasks
    rows = []
    for run in runs:
        dense, comp = run.get("dense") or {}, final_metrics(run)
        if setting is not None:
            numbers = run_headline(run, setting, facts)
            d_avg, c_avg, c_se, avg_diff = numbers["dense"], numbers["headline"], numbers["se"], {
                "diff": numbers["diff"], "se": numbers["diff_se"], "significant": numbers["significant"]}
            headline_tasks: list[str] | None = numbers["tasks"]
        else:
            d_avg = average_accuracy(dense, tasks) if tasks else None
            c_avg = average_accuracy(comp, tasks) if tasks else None
            c_se = mean_stderr([num(get(comp, "lm_eval", t, f"{reported_metric(t, get(comp, 'lm_eval', t)) or 'acc'}_stderr")) for t in tasks]) if tasks else None
            avg_diff = mean_difference([difference(get(dense, "lm_eval", t), get(comp, "lm_eval", t), reported_metric(t, get(dense, "lm_eval", t), get(comp, "lm_eval", t)) or "acc") for t in tasks])
            headline_tasks = None
        rows.append({
            "experiment": run["name"],
            "model": run_model(run),
            "recovered": run.get("recovered") is not None,
            "average_stderr": c_se,
            "diff": avg_diff["diff"], "diff_se": avg_diff["se"], "significant": avg_diff["significant"],
            "c4_ppl": num(get(comp, "perplexity", "c4", "perplexity")),
            "method": get(run, "plan", "method", "name") or get(run, "compress", "method"),
            "layers": num(get(comp, "model", "num_layers")),
            "dense_layers": num(get(dense, "model", "num_layers")),
            "params_total": num(get(comp, "model", "params_total")),
            "dense_average": d_avg,
            "average": c_avg,
            "retained_pct": _retained(c_avg, d_avg),
            "wikitext2_ppl": num(get(comp, "perplexity", "wikitext2", "perplexity")),
            "headline_tasks": headline_tasks,
        })
    return rows


def common_tasks(runs: list[dict]) -> list[str]:
    """lm-eval tasks present in every dense/compressed metrics dict that has lm-eval results at all."""
    sets = [set(m["lm_eval"]) for r in runs for m in (r.get("dense"), r.get("compressed"), r.get("recovered")) if m and m.get("lm_eval")]
    return _sorted_tasks(set.intersection(*sets)) if sets else []


def accuracy_points(runs: list[dict], params_key: str = "params_total", tasks: list[str] | None = None) -> list[dict]:
    """Points ``{name, params, average_acc, se, dense, significant}`` for
    :func:`layerfold.report.plots.accuracy_vs_params`.

    Averages use the tasks every run has (:func:`common_tasks`), so points stay comparable; ``se`` is
    the standard error of that average; ``significant`` says whether a compressed (or recovered)
    model's average differs from its own dense model's by more than the noise (None for dense
    points). Identical dense models are plotted once.
    """
    tasks = common_tasks(runs) if tasks is None else [t for t in common_tasks(runs) if t in tasks]
    points: list[dict] = []
    seen_dense: set[tuple] = set()
    for run in runs:
        for kind in ("dense", "compressed", "recovered"):
            metrics = run.get(kind)
            if not metrics:
                continue
            lm_eval = metrics.get("lm_eval") or {}
            point = {
                "name": {"dense": "dense", "compressed": run["name"], "recovered": f"{run['name']} (recovered)"}[kind],
                "params": num(get(metrics, "model", params_key)),
                "average_acc": average_accuracy(metrics, tasks) if tasks else None,
                "se": mean_stderr([num(get(lm_eval, t, f"{reported_metric(t, lm_eval.get(t)) or 'acc'}_stderr")) for t in tasks]) if tasks else None,
                "dense": kind == "dense",
                "significant": None,
            }
            if kind != "dense" and tasks and run.get("dense"):
                d_eval = run["dense"].get("lm_eval") or {}
                point["significant"] = mean_difference(
                    [difference(d_eval.get(t), lm_eval.get(t), reported_metric(t, d_eval.get(t), lm_eval.get(t)) or "acc") for t in tasks]
                )["significant"]
            if kind == "dense":
                key = (point["params"], None if point["average_acc"] is None else round(point["average_acc"], 9))
                if key in seen_dense:
                    continue
                seen_dense.add(key)
            points.append(point)
    if sum(p["dense"] for p in points) > 1:  # several different dense models: tell them apart by size
        for p in points:
            if p["dense"]:
                p["name"] = f"dense ({int(p['params'] or 0) / 1e6:.0f}M)"
    return points


# ------------------------------------------------------------------------------------------------
# cells


def fmt(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    """Format a number, or "—" when it is missing."""
    v = num(value)
    return MISSING if v is None else f"{v:{spec}}{suffix}"


def pct(value: Any) -> str:
    """An accuracy (a fraction) as a percentage with two decimals, or "—"."""
    v = num(value)
    return MISSING if v is None else f"{100 * v:.2f}"


def retained_cell(retained: Any, significant: bool | None) -> str:
    """Retained %, with "≈" and "(n.s.)" when the difference behind it is inside the noise."""
    text = fmt(retained, ".1f")
    return text if significant is not False or text == MISSING else f"≈{text} (n.s.)"


def diff_cell(diff: Any, se: Any) -> str:
    """A difference in accuracy points with its standard error, e.g. ``-5.1 ± 1.2``."""
    if num(diff) is None:
        return MISSING
    return f"{100 * diff:+.2f}" + ("" if num(se) is None else f" ± {100 * se:.2f}")


# ------------------------------------------------------------------------------------------------
# a run's files

RUN_FILES = {
    "dense": "metrics/dense.json",
    "compressed": "metrics/compressed.json",
    "compress": "metrics/compress.json",
    "plan": "artifacts/compressed/plan.json",
    "stats": "artifacts/capture/stats.json",
}
OPTIONAL_RUN_FILES = {"recovered": "metrics/recovered.json", "recover": "metrics/recover.json"}  # only when a recovery ran
# The evaluate stages' per-document outputs (a plain output beside each metrics file), merged back into the
# metrics dicts on load so paired differences and answer drift read them where the aggregates are.
DOCUMENT_FILES = {"dense": "metrics/documents/dense.json", "compressed": "metrics/documents/compressed.json",
                  "recovered": "metrics/documents/recovered.json"}


def load_run(root: str | Path = ".", name: str = "workspace") -> dict:
    """The stage outputs under a repository ``root``: ``{name, dense, compressed, compress, plan, stats,
    recovered, recover}`` (None for a file that does not exist), each model's per-document results
    (``metrics/documents/<name>.json``) merged into its metrics."""
    root = Path(root)
    run: dict[str, Any] = {"name": name}
    for key, rel in (RUN_FILES | OPTIONAL_RUN_FILES).items():
        run[key] = read_json(root / rel) if (root / rel).is_file() else None
    for key, rel in DOCUMENT_FILES.items():
        if run.get(key) is not None and (root / rel).is_file():
            run[key] = merge_documents(run[key], read_json(root / rel))
    if run["recovered"] is not None and "same_model_as" in run["recovered"]:
        run["recovered"] = None  # recovery=none: the final model is the compressed one
    return run


def experiment_name(run: dict, env: dict | None = None) -> str:
    """``$DVC_EXP_NAME`` (set by ``dvc exp run``), else ``<method>-<layers>L``, made safe as a folder name."""
    env = os.environ if env is None else env
    name = env.get("DVC_EXP_NAME")
    if not name:
        method = get(run, "plan", "method", "name") or get(run, "compress", "method") or "unknown"
        layers = get(run, "compressed", "model", "num_layers") or get(run, "compress", "layers_after")
        name = f"{method}-{layers if layers is not None else '?'}L"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-") or "experiment"
