"""Dense-vs-compressed tables, the Markdown report, and the archive of finished experiments.

Everything here reads the JSON the stages wrote (``metrics/<name>.json`` from ``pipeline.evaluate``,
``metrics/compress.json`` and ``artifacts/compressed/plan.json`` from ``pipeline.compress``,
``artifacts/capture/stats.json`` from ``pipeline.capture``) and never makes a number up: a value
that is absent or not finite is ``None`` in the rows and "—" in the Markdown.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerfold.evaluation.efficiency import efficiency_speedups
from layerfold.evaluation.results import merge_documents
from layerfold.io import atomic_dir, read_json, write_json
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


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0.0) else None


def _retained(compressed: float | None, dense: float | None) -> float | None:
    r = _ratio(compressed, dense)
    return None if r is None else 100.0 * r


def _get(tree: dict | None, *keys: str) -> Any:
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
        if results and all(num(_get(r, metric)) is not None for r in results):
            return metric
    return None


def average_accuracy(metrics: dict, tasks: list[str] | None = None) -> float | None:
    """Mean headline metric over ``tasks`` (default: all in ``metrics['lm_eval']``); None if one is missing."""
    lm_eval = metrics.get("lm_eval") or {}
    tasks = list(lm_eval) if tasks is None else tasks
    values = [num(_get(lm_eval, t, reported_metric(t, lm_eval.get(t)) or "acc")) for t in tasks]
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
        dv, cv = num(_get(d, metric or "")), num(_get(c, metric or ""))
        if metric and d is not None and c is not None and dv is not None and cv is not None:
            common.append(task)
        row = {
            "section": "accuracy", "name": task, "metric": metric, "dense": dv, "compressed": cv,
            "retained_pct": _retained(cv, dv), "ratio": None,
            "dense_stderr": num(_get(d, f"{metric}_stderr")), "compressed_stderr": num(_get(c, f"{metric}_stderr")),
            "n": num(_get(c, "n")) if num(_get(c, "n")) is not None else num(_get(d, "n")),
            "note": "only in dense" if c is None else "only in compressed" if d is None
            else None if num(_get(d, "n")) == num(_get(c, "n")) else "different number of docs",
        }
        for m in ("acc", "acc_norm"):
            row[f"dense_{m}"], row[f"compressed_{m}"] = num(_get(d, m)), num(_get(c, m))
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
        if any(num(_get(m, task, "perplexity")) is not None for m in (d_eval, c_eval)):
            d_ppl[f"{task} (targets)"] = {"perplexity": _get(d_eval, task, "perplexity")}
            c_ppl[f"{task} (targets)"] = {"perplexity": _get(c_eval, task, "perplexity")}
    for dataset in sorted(set(d_ppl) | set(c_ppl)):
        d, c = d_ppl.get(dataset), c_ppl.get(dataset)
        dv, cv = num(_get(d, "perplexity")), num(_get(c, "perplexity"))
        differ = [k for k in ("seq_len", "windows", "add_bos") if d and c and d.get(k) != c.get(k)]
        rows.append({
            "section": "perplexity", "name": dataset, "metric": "perplexity", "dense": dv, "compressed": cv,
            "retained_pct": None, "ratio": _ratio(cv, dv),
            "note": f"settings differ: {', '.join(differ)}" if differ else None,
        })

    for key, label in PARAM_ROWS:
        dv, cv = num(_get(dense, "model", key)), num(_get(compressed, "model", key))
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
        rows.append({"name": label, "metric": key, "better": better, "dense": dv, "compressed": cv, "ratio": _ratio(cv, dv)})
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
    """The model an archived run compressed: its recorded name, else ``<model_type>-<params>M``."""
    name = _get(run, "meta", "model") or _get(run, "dense", "model", "name")
    if name:
        return str(name)
    model_type, params = _get(run, "dense", "model", "model_type"), num(_get(run, "dense", "model", "params_total"))
    return f"{model_type}-{params / 1e6:.0f}M" if model_type and params else None


def final_metrics(run: dict) -> dict:
    """The metrics of the model a run ends with: recovered when recovery ran, else compressed."""
    return run.get("recovered") or run.get("compressed") or {}


def experiments_table(runs: list[dict], tasks: list[str] | None = None, setting: Any = None,
                      facts: Mapping[str, Any] | None = None) -> list[dict]:
    """One row per run (see :func:`collect_experiments`): model, method, size, average accuracy
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
            c_se = mean_stderr([num(_get(comp, "lm_eval", t, f"{reported_metric(t, _get(comp, 'lm_eval', t)) or 'acc'}_stderr")) for t in tasks]) if tasks else None
            avg_diff = mean_difference([difference(_get(dense, "lm_eval", t), _get(comp, "lm_eval", t), reported_metric(t, _get(dense, "lm_eval", t), _get(comp, "lm_eval", t)) or "acc") for t in tasks])
            headline_tasks = None
        rows.append({
            "experiment": run["name"],
            "model": run_model(run),
            "recovered": run.get("recovered") is not None,
            "average_stderr": c_se,
            "diff": avg_diff["diff"], "diff_se": avg_diff["se"], "significant": avg_diff["significant"],
            "c4_ppl": num(_get(comp, "perplexity", "c4", "perplexity")),
            "method": _get(run, "plan", "method", "name") or _get(run, "compress", "method"),
            "layers": num(_get(comp, "model", "num_layers")),
            "dense_layers": num(_get(dense, "model", "num_layers")),
            "params_total": num(_get(comp, "model", "params_total")),
            "dense_average": d_avg,
            "average": c_avg,
            "retained_pct": _retained(c_avg, d_avg),
            "wikitext2_ppl": num(_get(comp, "perplexity", "wikitext2", "perplexity")),
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
                "params": num(_get(metrics, "model", params_key)),
                "average_acc": average_accuracy(metrics, tasks) if tasks else None,
                "se": mean_stderr([num(_get(lm_eval, t, f"{reported_metric(t, lm_eval.get(t)) or 'acc'}_stderr")) for t in tasks]) if tasks else None,
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
# Markdown


def fmt(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    """Format a number, or "—" when it is missing."""
    v = num(value)
    return MISSING if v is None else f"{v:{spec}}{suffix}"


def _pct(value: Any) -> str:  # accuracies as percentages
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


def _speedup_section(dense: dict, compressed: dict) -> list[str]:
    """The speed-ups of the two ``evaluate`` measurements, said to be unpaired, next to their FLOP bound."""
    lines = [
        "Speed-up = dense / compressed time (prefill latency; decode time per token), with its range over the repeats. "
        "The two models were **measured in separate runs** (one `evaluate` stage each, one after the other, not alternated), "
        "so clock state and other load may differ between them. The FLOP bound is dense / compressed forward FLOPs per token "
        "(decoder layers with attention, and the LM head); removing layers cannot speed a model up by more. "
        "A paired measurement: `python benchmarks/layer_removal_speed.py --checkpoint artifacts/base --compressed artifacts/compressed`.",
        "",
    ]
    rows = []
    for r in efficiency_speedup_rows(dense, compressed):
        if r["speedup"] is None:
            rows.append([r["phase"], MISSING, MISSING, "spread or FLOPs not recorded (metrics from an older layerfold)"])
            continue
        note = "**exceeds the bound by more than its spread: a timing artefact, not the models**" if r["measurement_suspect"] else ""
        rows.append([r["phase"], f"{r['speedup']:.2f}× [{r['speedup_min']:.2f}–{r['speedup_max']:.2f}]",
                     MISSING if r["speedup_bound"] is None else f"{r['speedup_bound']:.2f}×", note])
    return lines + _table(["phase", "speed-up [range]", "FLOP bound", "note"], rows)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0–2, 5, 7–8"``."""
    parts, layers = [], sorted(layers)
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}–{layers[j]}")
        i = j + 1
    return ", ".join(parts) if parts else "none"


def _mapping_rows(plan: dict) -> list[list[str]]:
    """New layer -> original layers; runs of consecutive one-to-one layers share one row."""
    rows: list[list[str]] = []
    run: list[tuple[int, int]] = []  # (new, original) pairs of the current one-to-one run

    def flush() -> None:
        if run:
            (n0, o0), (n1, o1) = run[0], run[-1]
            rows.append([str(n0) if n0 == n1 else f"{n0}–{n1}", str(o0) if o0 == o1 else f"{o0}–{o1}", ""])
            run.clear()

    for entry in plan.get("layers", []):
        index, originals = entry["index"], entry["stands_for"]
        if len(originals) == 1:
            if run and (index, originals[0]) != (run[-1][0] + 1, run[-1][1] + 1):
                flush()
            run.append((index, originals[0]))
        else:
            flush()
            rows.append([str(index), _ranges(originals), "merged"])
    flush()
    return rows


def _setting(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value) and len(json.dumps(value)) > 60:
        return f"[{len(value)} strings]"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def markdown_report(
    dense: dict,
    compressed: dict,
    compress: dict | None = None,
    plan: dict | None = None,
    stats: dict | None = None,
    model_name: str | None = None,
    plots: dict[str, str] | None = None,
    experiments: list[dict] | None = None,
    recovered: dict | None = None,
    decision: dict | None = None,
    drift: dict | None = None,
) -> str:
    """The report as Markdown. ``plots`` maps a caption to an image path relative to the report;
    ``experiments`` are :func:`experiments_table` rows; ``recovered`` (``metrics/recovered.json``,
    when a recovery ran) adds recovered columns beside the compressed ones. ``decision``
    (:func:`layerfold.report.protocol.informative_tasks`) makes the summary row the headline over the
    informative tasks and prints the rule above the tables; ``drift`` (per model name, compressed /
    recovered: :func:`layerfold.report.protocol.run_drift`) marks answer drift beside the scores."""
    from layerfold.report.protocol import drift_mark, rule_lines

    headline_tasks = None if decision is None else list(decision["tasks"])
    drift = drift or {}
    method = (plan or {}).get("method") or {}
    method_name = method.get("name") or _get(compress, "method") or MISSING
    out = [f"# {model_name or 'model'}: {method_name}", ""]

    # settings ------------------------------------------------------------------------------
    out += ["## Settings", ""]
    layers = f"{fmt(_get(dense, 'model', 'num_layers'), '.0f')} → {fmt(_get(compressed, 'model', 'num_layers'), '.0f')}"
    out.append(f"- **Model**: {model_name or MISSING} ({_get(dense, 'model', 'model_type') or MISSING}), layers {layers}")
    settings = ", ".join(f"{k}={_setting(v)}" for k, v in method.items() if k != "name")
    out.append(f"- **Method**: {method_name}" + (f" ({settings})" if settings else ""))
    if stats:
        out.append(f"- **Calibration** (capture): {fmt(stats.get('sequences'), '.0f')} sequences, {fmt(stats.get('tokens'), '.0f')} tokens")
    le = dense.get("lm_eval_settings") or compressed.get("lm_eval_settings")
    if le:
        shots = le.get("num_fewshot") or {}
        note = "" if dense.get("lm_eval_settings") == compressed.get("lm_eval_settings") else " — **differs between dense and compressed**"
        out.append(
            f"- **lm-eval**: limit={_setting(le['limit']) if le.get('limit') is not None else 'none (full sets)'}, "
            f"num_fewshot={json.dumps(shots) if shots else '0'} (other tasks 0-shot), local task files={le.get('local_tasks', MISSING)}{note}"
        )
    else:
        out.append("- **lm-eval**: not run (no tasks configured)")
    for dataset, p in (dense.get("perplexity") or {}).items():
        out.append(f"- **Perplexity {dataset}**: seq_len={fmt(p.get('seq_len'), '.0f')}, windows={fmt(p.get('windows'), '.0f')}, tokens scored={fmt(p.get('tokens_scored'), '.0f')}, add_bos={p.get('add_bos', MISSING)}")
    if dense.get("device") or compressed.get("device"):
        out.append(f"- **Device**: dense {dense.get('device') or MISSING} ({dense.get('dtype') or MISSING}); compressed {compressed.get('device') or MISSING} ({compressed.get('dtype') or MISSING})")
    else:
        out.append(f"- **Device**: in `reports/timings.md` with the timings (machine-local, not committed); dtype dense "
                   f"{dense.get('dtype') or MISSING}, compressed {compressed.get('dtype') or MISSING}")
    out.append("")

    # plan ---------------------------------------------------------------------------------
    if plan:
        out += ["## Plan", ""]
        out.append(f"{plan.get('original_layers', MISSING)} original layers → {len(plan.get('layers', []))} layers.")
        out.append(f"- **Removed** (no new layer stands for them): {_ranges(plan.get('removed', []))}")
        merged = plan.get("merged") or []
        out.append(f"- **Merged**: {'; '.join('{' + ', '.join(map(str, g)) + '}' for g in merged) if merged else 'none'}")
        out += ["", *_table(["new layer", "original layer(s)", "note"], _mapping_rows(plan)), ""]

    # comparison ---------------------------------------------------------------------------
    rows = comparison_table(dense, compressed, headline_tasks)
    rec_rows = {(r["section"], r["name"]): r for r in comparison_table(dense, recovered, headline_tasks)} if recovered else {}
    out += ["## Dense vs compressed" + (" and recovered" if recovered else ""), ""]
    acc = [r for r in rows if r["section"] == "accuracy"]
    if acc and decision is not None:
        out += [*rule_lines(decision), ""]
        marks = [f"{label}: {drift_mark(drift.get(label))}" for label in ("compressed", "recovered") if drift_mark(drift.get(label))]
        tested = sorted({t for d in drift.values() if d for t in d.get("tested", [])})
        out.append("**Answer drift** (each model's answer distribution vs dense's on the same documents; Stuart-Maxwell test, "
                   "McNemar for two choices; Bonferroni over the tasks tested): "
                   + ("; ".join(marks) if marks else f"none beyond noise ({len(tested)} task(s) tested)") + ".")
        out.append("")
    if acc:
        out.append("Accuracies in %. The headline metric follows the usual per-task convention (acc_norm for "
                   "HellaSwag, ARC-c, OpenBookQA; acc otherwise); retained % = compressed / dense × 100; "
                   "Δ = compressed − dense in points ± its standard error (paired over the same documents where "
                   "per-document results exist). A retained % marked ≈ … (n.s.) differs from dense by less than "
                   "1.96 standard errors: it is not evidence of a loss or a gain.")
        if le and num(le.get("limit")) is not None:
            limit = num(le["limit"])
            share = f"{100 * limit:g}% of the documents" if limit < 1 else f"{limit:g} documents"
            out.append(f"lm-eval ran on a seeded random sample of {share} per task (the same documents for every model).")
        out.append("")
        table = []
        for r in acc:
            avg = r["name"] in ("average", "headline")
            rec = rec_rows.get(("accuracy", r["name"]))
            cells = [
                f"**{r['name']}**" if avg else r["name"],
                r["metric"] or MISSING,
                "" if avg else fmt(r.get("n"), ".0f"),
                _pct(r["dense"]) + ("" if r.get("dense_stderr") is None else f" ± {_pct(r['dense_stderr'])}"),
                _pct(r["compressed"]) + ("" if r.get("compressed_stderr") is None else f" ± {_pct(r['compressed_stderr'])}"),
                diff_cell(r.get("diff"), r.get("diff_se")),
                retained_cell(r["retained_pct"], r.get("significant")),
            ]
            if recovered:
                cells += [
                    MISSING if rec is None else _pct(rec["compressed"]) + ("" if rec.get("compressed_stderr") is None else f" ± {_pct(rec['compressed_stderr'])}"),
                    MISSING if rec is None else diff_cell(rec.get("diff"), rec.get("diff_se")),
                    MISSING if rec is None else retained_cell(rec["retained_pct"], rec.get("significant")),
                ]
            notes = [r.get("note") or ""]
            for label in ("compressed", "recovered"):
                task_drift = ((drift.get(label) or {}).get("tasks") or {}).get(r["name"])
                if task_drift and any(d["task"] == r["name"] for d in (drift.get(label) or {}).get("drifted", [])):
                    notes.append(f"{label}: drift → {task_drift['to']} ({100 * task_drift['shares_dense'][task_drift['to']]:.0f}→"
                                 f"{100 * task_drift['shares'][task_drift['to']]:.0f} % of answers, p = {task_drift['p']:.1e})")
            if headline_tasks is not None and not avg and r["name"] not in headline_tasks:
                notes.append("not in the headline")
            table.append(cells + ["; ".join(n for n in notes if n)])
        header = ["task", "metric", "n", "dense", "compressed", "Δ compressed", "retained %"]
        if recovered:
            header += ["recovered", "Δ recovered", "retained % (recovered)"]
        out += _table(header + ["note"], table)
        out += ["", "acc and acc_norm of every task are in `reports/tables/comparison.json`."]
    else:
        out.append("No lm-eval results (no tasks configured).")
    out.append("")
    other = []
    for r in rows:
        rec = rec_rows.get((r["section"], r["name"])) or {}
        rec_cells = [fmt(rec.get("compressed"), ".3f" if r["section"] == "perplexity" else ",.0f")] if recovered else []
        if r["section"] == "perplexity":
            other.append([f"perplexity {r['name']} (lower is better)", fmt(r["dense"], ".3f"), fmt(r["compressed"], ".3f"), *rec_cells, fmt(r["ratio"], ".3f"), MISSING, r["note"] or ""])
        elif r["section"] == "parameters":
            other.append([r["name"], fmt(r["dense"], ",.0f"), fmt(r["compressed"], ",.0f"), *rec_cells, fmt(_ratio(r["compressed"], r["dense"]), ".3f"), fmt(r["retained_pct"], ".1f"), ""])
    out += [*_table(["quantity", "dense", "compressed", *(["recovered"] if recovered else []), "compressed / dense", "retained %", "note"], other), ""]

    # efficiency ---------------------------------------------------------------------------
    out += efficiency_section(dense, compressed)

    # compression ----------------------------------------------------------------------------
    out += ["## Compression run", ""]
    out.append(compression_line(compress))
    out.append("")

    if experiments:
        own = any(r.get("headline_tasks") is not None for r in experiments)
        what = ("headline of each experiment over its own informative tasks, decided from its dense model (the numbers "
                "of its metrics/summary.json)") if own else "average accuracy over the tasks every experiment ran"
        out += ["## Experiments", "", f"The {what}, of the final model (recovered where a recovery ran); "
                "Δ = final − dense ± its standard error.", ""]
        out += _table(["experiment", "model", "method", "layers", "parameters", "average % (dense → final)", "Δ", "retained %", "wikitext2 PPL", "c4 PPL"], [
            [r["experiment"], r.get("model") or MISSING, (r["method"] or MISSING) + (" + recovery" if r.get("recovered") else ""),
             fmt(r["layers"], ".0f"), fmt(r["params_total"], ",.0f"),
             f"{_pct(r['dense_average'])} → {_pct(r['average'])}", diff_cell(r.get("diff"), r.get("diff_se")),
             retained_cell(r["retained_pct"], r.get("significant")), fmt(r["wikitext2_ppl"], ".3f"), fmt(r.get("c4_ppl"), ".3f")]
            for r in experiments
        ])
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{caption}]({path})" for caption, path in plots.items()] + [""]
    return "\n".join(out)


COMPRESS_TIMINGS = "metrics/compress_time.json"  # written by the compress stage, git-ignored (machine-local)


def compression_line(compress: dict | None) -> str:
    """The report's "Compression run" sentence: method and layers, then the wall time, peak memory and
    device where ``compress`` records them; where it does not (they live in the git-ignored
    ``metrics/compress_time.json`` so that the committed report does not change with the clock), it says
    where they are instead of printing blanks."""
    if not compress:
        return "metrics/compress.json not available."
    text = f"{compress.get('method', MISSING)}: {fmt(compress.get('layers_before'), '.0f')} → {fmt(compress.get('layers_after'), '.0f')} layers"
    known = [part for value, part in (
        (num(compress.get("seconds")), f"{fmt(compress.get('seconds'), '.2f')} s"),
        (num(compress.get("peak_memory_mib")), f"peak memory {fmt(compress.get('peak_memory_mib'), '.1f')} MiB"),
    ) if value is not None]
    text += (" in " + ", ".join(known) if known else "") + (f" on {compress['device']}" if compress.get("device") else "") + "."
    if len(known) < 2 or not compress.get("device"):
        text += (f" Wall time, peak memory and device are machine-local: `{COMPRESS_TIMINGS}` (git-ignored), "
                 "summarised in `reports/timings.md`.")
    return text


def efficiency_section(dense: dict, compressed: dict) -> list[str]:
    """The efficiency measurement of the two ``evaluate`` stages as Markdown (``efficiency`` blocks)."""
    out = ["## Efficiency", ""]
    d_eff, c_eff = dense.get("efficiency"), compressed.get("efficiency")
    if d_eff or c_eff:
        e = d_eff or c_eff
        out.append(f"batch {fmt(e.get('batch_size'), '.0f')}, prompt {fmt(e.get('prompt_len'), '.0f')} tokens, {fmt(e.get('new_tokens'), '.0f')} new tokens; "
                   f"device: dense {_get(d_eff, 'device') or MISSING}, compressed {_get(c_eff, 'device') or MISSING}; "
                   f"peak memory is {e.get('peak_memory_kind') or MISSING}.")
        out += ["", *_table(["quantity", "dense", "compressed", "compressed / dense"],
                            [[f"{r['name']} ({r['better']} is better)", fmt(r["dense"], ".1f"), fmt(r["compressed"], ".1f"), fmt(r["ratio"], ".3f")] for r in efficiency_table(dense, compressed)])]
        if d_eff and c_eff:
            out += ["", *_speedup_section(dense, compressed)]
    else:
        out.append("Not in these metrics: measured timings and the device are machine-local and go to `reports/timings.md` "
                   "(not committed); eval.efficiency.enabled=false measures none.")
    out.append("")
    return out


# ------------------------------------------------------------------------------------------------
# runs and the experiment archive

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
ARCHIVED = {
    "dense": "metrics/dense.json", "compressed": "metrics/compressed.json", "recovered": "metrics/recovered.json",
    "compress": "metrics/compress.json", "plan": "plan.json", "meta": "meta.json",
}


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
        method = _get(run, "plan", "method", "name") or _get(run, "compress", "method") or "unknown"
        layers = _get(run, "compressed", "model", "num_layers") or _get(run, "compress", "layers_after")
        name = f"{method}-{layers if layers is not None else '?'}L"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-") or "experiment"


def archive_run(run: dict, experiments_dir: str | Path, name: str) -> Path:
    """Copy a run's small JSON files into ``<experiments_dir>/<name>/`` (replacing an older copy)."""
    with atomic_dir(Path(experiments_dir) / name) as tmp:
        for key, rel in ARCHIVED.items():
            if run.get(key) is not None:
                write_json(tmp / rel, run[key])
    return Path(experiments_dir) / name


def collect_experiments(experiments_dir: str | Path, current: dict | None = None) -> list[dict]:
    """Archived runs ``<experiments_dir>/<exp>/metrics/{dense,compressed}.json`` (+ ``plan.json``,
    ``metrics/compress.json``), sorted by name, plus ``current`` (a :func:`load_run` dict) if given.

    An archived run with the same dense and compressed metrics as ``current`` is the same run and is
    dropped in favour of ``current``. Folders without both metrics files are skipped.
    """
    runs = []
    directory = Path(experiments_dir)
    for folder in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")) if directory.is_dir() else []:
        if not all((folder / ARCHIVED[k]).is_file() for k in ("dense", "compressed")):
            continue
        run: dict[str, Any] = {"name": folder.name, "path": str(folder)}
        for key, rel in ARCHIVED.items():
            run[key] = read_json(folder / rel) if (folder / rel).is_file() else None
        runs.append(run)
    if current is not None and current.get("compressed") is not None:
        runs = [r for r in runs if (r["dense"], r["compressed"]) != (current.get("dense"), current["compressed"])]
        runs.append(current)
    return runs
