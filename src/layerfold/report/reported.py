"""The numbers papers report for layerfold's paper presets, beside what a run measured.

``papers.yaml`` (next to this module) holds, per paper / model / setting, what the paper, its authors'
repository or a third party quoting it reports, and where each number was read. A paper preset names its
entry in ``protocol.reported``; :func:`side_by_side` pairs every reported value with the run's measurement
of the same task on the same model (dense, or the run's final model): measured ± its standard error,
reported, the difference, and a verdict.

Reported numbers carry no standard error, so the verdict uses the measured one alone: a difference within
1.96 measured standard errors is "within noise" and is neither above nor below the paper. The test
ignores the paper's own sampling noise, so it calls a difference more readily than one with both standard
errors would, and it says nothing about protocol differences (harness, metric, prompt): the preset's
``protocol`` block lists those. Nothing here is called a gain or a loss. Perplexities have no standard
error and get no verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from layerfold.report.noise import Z, difference, mean_difference, mean_stderr
from layerfold.report.markdown import markdown_table, ranges
from layerfold.report.tables import MISSING, fmt, num, reported_metric

PAPERS_FILE = Path(__file__).with_name("papers.yaml")

KINDS = {"paper": "read in the paper", "repo": "the authors' repository or model card", "3rd": "quoted by a third party"}
UNITS = ("fraction", "percent", "perplexity", "layers")
MODELS = ("dense", "pruned")
AGGREGATES = ("average", "retained")
PERPLEXITY_TASKS = ("wikitext2", "c4")
# lm-eval task names a reported task may have in a run's metrics (the offline BoolQ lacks passage titles)
TASK_KEYS = {"boolq": ("boolq", "boolq_notitle")}
NOT_STATED = "not stated"


class ReportedDataError(ValueError):
    """papers.yaml (or a preset's reference into it) is malformed; the message names the key and the fix."""


# ------------------------------------------------------------------------------------------------
# the data file


def load_papers(path: str | Path = PAPERS_FILE) -> dict:
    """Read and check the reported-numbers file: every value has a known source, unit and model."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("sources"), dict) or not isinstance(data.get("entries"), dict):
        raise ReportedDataError(f"{path}: expected the top-level mappings 'sources' and 'entries'.")
    problems = [*_source_problems(data["sources"]), *(p for name, e in data["entries"].items() for p in _entry_problems(name, e, data["sources"]))]
    if problems:
        raise ReportedDataError(f"{path}: " + "; ".join(problems) + f". Fix them in {path}.")
    return data


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _source_problems(sources: dict) -> list[str]:
    problems = []
    for name, source in sources.items():
        if not isinstance(source, dict):
            problems.append(f"sources.{name} must be a mapping")
            continue
        if source.get("kind") not in KINDS:
            problems.append(f"sources.{name}.kind={source.get('kind')!r} must be one of {', '.join(KINDS)}")
        problems += [f"sources.{name}.{key} is empty (say it, or 'not stated')" for key in ("cites", "where", "protocol") if not _text(source.get(key))]
    return problems


def _entry_problems(name: str, entry: Any, sources: dict) -> list[str]:
    if not isinstance(entry, dict):
        return [f"entries.{name} must be a mapping"]
    where = f"entries.{name}"
    problems = [f"{where}.{key} is empty" for key in ("paper", "arxiv", "model", "method") if not _text(entry.get(key))]
    layers = entry.get("layers") or {}
    if not (isinstance(layers.get("original"), int) and isinstance(layers.get("removed"), int) and _text(layers.get("basis"))):
        problems.append(f"{where}.layers needs original and removed (integers) and basis (how the count is known)")
    values, gaps = entry.get("values"), entry.get("gaps")
    if not isinstance(values, list) or not isinstance(gaps, list) or not isinstance(entry.get("claims"), list):
        return [*problems, f"{where} needs the lists values, claims and gaps (empty lists are fine)"]
    if not values and not gaps:
        problems.append(f"{where} has no values and no gaps: list what could not be retrieved under gaps")
    for i, value in enumerate(values):
        problems += _value_problems(f"{where}.values[{i}]", value, sources)
    for i, claim in enumerate(entry["claims"]):
        if not (isinstance(claim, dict) and _text(claim.get("text")) and claim.get("source") in sources):
            problems.append(f"{where}.claims[{i}] needs text and a source named under sources")
    return problems


def _value_problems(where: str, value: Any, sources: dict) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where} must be a mapping"]
    problems = []
    if value.get("source") not in sources:
        problems.append(f"{where}.source={value.get('source')!r} is not under sources")
    if value.get("of") not in MODELS:
        problems.append(f"{where}.of={value.get('of')!r} must be one of {', '.join(MODELS)}")
    if value.get("unit") not in UNITS:
        problems.append(f"{where}.unit={value.get('unit')!r} must be one of {', '.join(UNITS)}")
    if not _text(value.get("task")) or not _text(value.get("metric")):
        problems.append(f"{where} needs task and metric ('{NOT_STATED}' when the source does not say)")
    if value.get("shots") is not None and not isinstance(value.get("shots"), int):
        problems.append(f"{where}.shots={value.get('shots')!r} must be an integer, or null when not stated")
    if value.get("unit") == "layers":
        if not (isinstance(value.get("value"), list) and all(isinstance(v, int) for v in value["value"])):
            problems.append(f"{where}.value must be a list of layer indices")
    elif _decimal(value.get("value")) is None:
        problems.append(f"{where}.value={value.get('value')!r} must be the number as printed, quoted (e.g. \"65.90\")")
    if value.get("task") == "average" and not value.get("over"):
        problems.append(f"{where}: an average needs over (the tasks it averages)")
    return problems


def _decimal(text: Any) -> Decimal | None:
    if not isinstance(text, str):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def entry(name: str, papers: dict | None = None) -> dict:
    """The entry ``name`` of ``papers.yaml``; a clear error listing the entries when it does not exist."""
    papers = load_papers() if papers is None else papers
    if name not in papers["entries"]:
        raise ReportedDataError(
            f"protocol.reported={name!r} is not an entry of {PAPERS_FILE.name}; choose one of "
            f"{', '.join(sorted(papers['entries']))}, or 'none'. Fix it in the preset (conf/experiment/) or with "
            f"`dvc exp run -S protocol.reported=<entry>`."
        )
    return papers["entries"][name]


def reported_name(params: Mapping | None) -> str | None:
    """The entry a run's params name in ``protocol.reported``; None without a protocol block or for 'none'."""
    protocol = (params or {}).get("protocol") if isinstance(params, Mapping) else None
    name = (protocol or {}).get("reported")
    return None if name in (None, "none") else str(name)


# ------------------------------------------------------------------------------------------------
# measured beside reported


def side_by_side(reported: dict, dense: dict, final: dict, plan: dict | None = None, papers: dict | None = None) -> list[dict]:
    """One row per reported value of an entry, plus the number of layers removed, measured beside it.

    ``dense`` and ``final`` are ``metrics/<name>.json`` dicts (``final``: recovered when a recovery ran, else
    compressed); ``plan`` is ``plan.json`` (for removed-layer lists). Each row: ``task``, ``of``, ``metric``
    (what was measured), ``reported_metric``, ``shots``, ``measured`` and ``se`` (accuracies in points),
    ``reported`` (same units) and ``reported_text`` (as printed), ``diff`` (measured − reported), ``verdict``,
    ``source``, ``kind``, ``note``.
    """
    sources = (papers or load_papers())["sources"]
    rows = [_layers_row(reported, dense, final)]
    for value in reported["values"]:
        source = sources[value["source"]]
        row = {
            "task": value["task"], "of": value["of"], "reported_metric": value["metric"], "shots": value.get("shots"),
            "source": value["source"], "kind": source["kind"], "unit": value["unit"], "note": value.get("note"),
        }
        row.update(_reported(value))
        row.update(_measured(value, dense if value["of"] == "dense" else final, dense, final, plan))
        row.update(_verdict(row))
        rows.append(row)
    return rows


def _layers_row(reported: dict, dense: dict, final: dict) -> dict:
    layers = reported["layers"]
    before, after = num((dense.get("model") or {}).get("num_layers")), num((final.get("model") or {}).get("num_layers"))
    measured = None if before is None or after is None else before - after
    row = {
        "task": "layers removed", "of": "pruned", "metric": "layers", "reported_metric": "layers", "shots": None,
        "measured": measured, "se": None, "reported": float(layers["removed"]), "reported_text": f"{layers['removed']} of {layers['original']}",
        "unit": "count", "source": "entry", "kind": "—", "note": layers["basis"],
    }
    row["diff"] = None if measured is None else measured - layers["removed"]
    row["verdict"] = "not measured" if measured is None else "same" if row["diff"] == 0 else "differs"
    return row


def _reported(value: dict) -> dict:
    """The reported number in display units: accuracies in points, perplexities as printed."""
    if value["unit"] == "layers":
        return {"reported": sorted(value["value"]), "reported_text": ranges(list(value["value"]))}
    printed = Decimal(value["value"])
    shown = printed.scaleb(2) if value["unit"] == "fraction" else printed  # 0.641 -> 64.1, trailing zeros kept
    return {"reported": float(shown), "reported_text": str(shown)}


def _measured(value: dict, metrics: dict, dense: dict, final: dict, plan: dict | None) -> dict:
    """``{metric, measured, se, note}`` for one reported value; measured accuracies in points."""
    task, note = value["task"], value.get("note")
    if task == "removed_layers":
        removed = None if plan is None else sorted(plan.get("removed", []))
        return {"metric": "layers", "measured": removed, "se": None, "note": note if removed is not None else "no plan.json"}
    if task in PERPLEXITY_TASKS:
        ppl = (metrics.get("perplexity") or {}).get(task) or {}
        detail = f"{fmt(ppl.get('seq_len'), '.0f')}-token windows" if ppl else f"not measured: no {task} perplexity in this run"
        return {"metric": "perplexity", "measured": num(ppl.get("perplexity")), "se": None, "note": _join(note, detail)}
    if task in AGGREGATES:
        return _aggregate(value, metrics, dense, final)
    key, result = _task_result(task, metrics)
    if result is None:
        return {"metric": value["metric"], "measured": None, "se": None, "note": _join(note, f"not measured: this run has no {task} task")}
    metric, how = _metric(key, value["metric"], result)
    measured, se = num(result.get(metric)), num(result.get(f"{metric}_stderr"))
    return {"metric": metric, "measured": _points(measured), "se": _points(se), "note": _join(note, how, _alias(task, key))}


def _aggregate(value: dict, metrics: dict, dense: dict, final: dict) -> dict:
    """An average (of one model) or a retained % (final / dense), over the tasks the value names."""
    over = value.get("over")
    wanted = over if over is not None else _common_tasks(dense, final)
    metric_of = dict(wanted) if isinstance(wanted, Mapping) else {t: NOT_STATED for t in wanted}
    models = [metrics] if value["task"] == "average" else [dense, final]
    results: dict[str, tuple[str, list[dict]]] = {}
    missing = []
    for task, stated in metric_of.items():
        found = [_task_result(task, m) for m in models]
        if any(r is None for _, r in found):
            missing.append(task)
            continue
        metric, _ = _metric(found[0][0], stated, *(r for _, r in found))
        results[task] = (metric, [r for _, r in found])
    used = {metric for metric, _ in results.values()}
    label = "mixed" if len(used) > 1 else used.pop() if used else value["metric"]
    tasks_note = f"over {', '.join(metric_of)}" + ("" if over is not None else " (this run's tasks)")
    if missing or not results:
        return {"metric": label, "measured": None, "se": None, "note": _join(value.get("note"), f"not measured: this run lacks {', '.join(missing) or 'lm-eval results'}")}
    unstated = None if NOT_STATED not in metric_of.values() else "reported metric not stated; measured with layerfold's headline metric per task"
    if value["task"] == "average":
        means = [num(r[0].get(m)) for m, r in results.values()]
        ses = [num(r[0].get(f"{m}_stderr")) for m, r in results.values()]
        return {"metric": label, "measured": _points(_mean(means)), "se": _points(mean_stderr(ses)), "note": _join(value.get("note"), tasks_note, unstated)}
    dense_avg = _mean([num(r[0].get(m)) for m, r in results.values()])
    final_avg = _mean([num(r[1].get(m)) for m, r in results.values()])
    diff = mean_difference([difference(r[0], r[1], m) for m, r in results.values()])
    retained = None if dense_avg in (None, 0.0) or final_avg is None else 100 * final_avg / dense_avg
    se = None if diff["se"] is None or not dense_avg else 100 * diff["se"] / dense_avg
    how = "se of the difference to dense (paired where per-document results exist), dense average held fixed"
    return {"metric": label, "measured": retained, "se": se, "note": _join(value.get("note"), tasks_note, unstated, how)}


def _verdict(row: dict) -> dict:
    measured, reported, se = row["measured"], row["reported"], row["se"]
    if measured is None:
        return {"diff": None, "verdict": "not measured"}
    if row["unit"] == "layers":
        return {"diff": None, "verdict": "same layers" if measured == reported else "different layers"}
    diff = measured - reported
    if se is None:
        return {"diff": diff, "verdict": "no se: not judged"}
    if abs(diff) <= Z * se:
        return {"diff": diff, "verdict": "within noise"}
    return {"diff": diff, "verdict": f"{'above' if diff > 0 else 'below'} reported (beyond {Z} se)"}


def _task_result(task: str, metrics: dict) -> tuple[str, dict | None]:
    lm_eval = metrics.get("lm_eval") or {}
    for key in TASK_KEYS.get(task, (task,)):
        if key in lm_eval:
            return key, lm_eval[key]
    return task, None


def _metric(key: str, stated: str, *results: dict) -> tuple[str, str | None]:
    """The metric to measure (in every result) and why: the reported one when stated and recorded, else
    layerfold's headline metric."""
    headline = reported_metric(key, *results) or "acc"
    if stated not in ("acc", "acc_norm"):
        return headline, "reported metric not stated; measured with layerfold's headline metric"
    if any(num(r.get(stated)) is None for r in results):
        return headline, f"{stated} not recorded; measured {headline}"
    return stated, None


def _common_tasks(dense: dict, final: dict) -> list[str]:
    d, f = set(dense.get("lm_eval") or {}), set(final.get("lm_eval") or {})
    return sorted(d & f)


def _alias(task: str, key: str) -> str | None:
    return "BoolQ without passage titles (the local copy)" if (task, key) == ("boolq", "boolq_notitle") else None


def _points(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


def _join(*parts: str | None) -> str | None:
    text = "; ".join(p for p in parts if p)
    return text or None


# ------------------------------------------------------------------------------------------------
# Markdown

LEGEND = (
    "Accuracies in points. Reported numbers carry no standard error: the verdict compares the difference with "
    f"{Z} *measured* standard errors only (so it calls differences more readily than if the paper's noise were "
    "known), and says above or below, never gain or loss; protocol differences (above) are not in the standard "
    "error. Perplexities have no standard error and are not judged."
)
PROTOCOL_KEYS = ("paper", "setting", "calibration", "method", "recovery", "evaluation")


def markdown_section(protocol: Mapping | None, dense: dict, final: dict, plan: dict | None = None, papers: dict | None = None) -> list[str]:
    """The report's paper-preset section: the protocol block, then measured beside reported when the
    protocol names an entry. Empty when the run used no paper preset (``protocol`` is None)."""
    if not protocol:
        return []
    out = ["## Paper preset: measured vs reported", ""]
    out += [f"- **{key}**: {' '.join(str(protocol[key]).split())}" for key in PROTOCOL_KEYS if protocol.get(key)]
    out.append("")
    name = reported_name({"protocol": protocol})
    if name is None:
        return [*out, "This preset names no reported numbers (protocol.reported: none).", ""]
    papers = load_papers() if papers is None else papers
    reported = entry(name, papers)
    rows = side_by_side(reported, dense, final, plan, papers)
    out += [f"Reported entry `{name}`: {reported['paper']}, arXiv {reported['arxiv']}. {LEGEND}", ""]
    out += [*comparison_lines(rows), "", "Sources:"]
    for source_name in dict.fromkeys(r["source"] for r in rows if r["source"] in papers["sources"]):
        source = papers["sources"][source_name]
        out.append(f"- `{source_name}` ({source['kind']}: {KINDS[source['kind']]}): {source['where']} Protocol: {source['protocol']}.")
    if reported["claims"]:
        out += ["", "Also claimed (not one comparable number):", *(f"- {c['text']} (`{c['source']}`)" for c in reported["claims"])]
    if reported["gaps"]:
        out += ["", "Not retrieved (gaps):", *(f"- {' '.join(g.split())}" for g in reported["gaps"])]
    return [*out, ""]


def comparison_lines(rows: list[dict]) -> list[str]:
    """The side-by-side rows as a Markdown table."""
    table = [[
        r["task"], r["of"], _metric_cell(r), _measured_cell(r), r["reported_text"],
        MISSING if r["diff"] is None else fmt(r["diff"], "+.0f" if r["unit"] == "count" else "+.2f"),
        r["verdict"], r["source"] if r["kind"] == "—" else f"{r['source']} ({r['kind']})", r.get("note") or "",
    ] for r in rows]
    return markdown_table(["task", "model", "metric (shots)", "measured ± se", "reported", "Δ measured − reported", "verdict", "source", "note"], table)


def _metric_cell(row: dict) -> str:
    shots = "" if row["shots"] is None else f" ({row['shots']}-shot)"
    stated = "" if row["reported_metric"] in (row["metric"], "layers", "perplexity") else f"; reported: {row['reported_metric']}"
    return f"{row['metric']}{shots}{stated}"


def _measured_cell(row: dict) -> str:
    value = row["measured"]
    if value is None:
        return MISSING
    if row["unit"] == "layers":
        return ranges(list(value))
    if row["unit"] == "count":
        return fmt(value, ".0f")
    if row["unit"] == "perplexity":
        return fmt(value, ".2f")
    return fmt(value, ".2f") + ("" if row["se"] is None else f" ± {fmt(row['se'], '.2f')}")
