"""The comparison of collected runs: every run under one protocol in a table, the pairs at one depth, the
depth curves and the prose findings, from the records :mod:`layerfold.runs.collect` wrote.

Every difference comes from :mod:`layerfold.report.noise`: a run is ahead of another (or of dense) only
when the difference is more than 1.96 standard errors from zero. Each run's headline is its own
(:func:`layerfold.report.reader.run_headline`), the number every other reader shows for it.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from layerfold.io import atomic_dir, portable_path, read_json, write_json
from layerfold.report.findings import findings_markdown
from layerfold.report.noise import difference, mean_difference, verdict
from layerfold.report.plots import _figure, save_png
from layerfold.report.protocol import (
    COLLAPSE_FACTOR, DRIFT_ALPHA, collapsed, drift_mark, headline, informative_tasks, perplexity_agreement,
    ranking, rule_lines, run_drift, wikitext2_ppl,
)
from layerfold.report.reader import run_headline
from layerfold.report.tables import MISSING, average_accuracy, common_tasks, diff_cell, final_metrics, fmt, num, reported_metric
from layerfold.runs.plan import RunList


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


def records_of_runs(runs: list[dict]) -> list[dict]:
    """Runs as :mod:`layerfold.runs.sources` reads them (no run list behind them) in the record shape the
    pairs read: ``{name, metrics: {dense, compressed, recovered, compress}, params}``."""
    return [{"name": r["name"], "params": r.get("params") or {},
             "metrics": {k: r.get(k) for k in ("dense", "compressed", "recovered", "compress")}} for r in runs]


def pairs_of_runs(runs: list[dict], setting: Any = "auto", layers: int | None = None, title: str = "runs") -> str:
    """``pairs.md`` for runs read from anywhere (``scripts/runs.py pairs``): every two runs whose final models
    have the same depth (only ``layers`` when given), under the headline decided from the first run's dense
    model, as :func:`pairs_markdown` writes it for a collected comparison."""
    records = records_of_runs(runs)
    tasks = tasks_of(records)
    decision = decide(records, tasks, setting)
    depths = [layers] if layers is not None else sorted({d for r in records if (d := _layers(_final(r))) is not None}, reverse=True)
    sections = [pairs_markdown(pair_rows(records, decision["tasks"], depth), depth, title, decision, tasks, None,
                               pair_rows(records, tasks, depth)) for depth in depths]
    return "\n".join(sections) if sections else f"# {title}: no run with a final depth to pair\n"

