"""The run's Markdown report (``reports/report.md``): the numbers of :mod:`layerfold.report.tables`,
formatted here and laid out by ``templates/report.md.j2``.

Python decides what each cell says (a value that is absent or not finite is "—", never made up); the
template holds the sections, their order and the prose around them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from layerfold.report.tables import (
    MISSING,
    comparison_table,
    diff_cell,
    efficiency_speedup_rows,
    efficiency_table,
    fmt,
    get,
    num,
    pct,
    ratio,
    retained_cell,
)

TEMPLATES = Path(__file__).parent / "templates"
COMPRESS_TIMINGS = "metrics/compress_time.json"  # written by the compress stage, git-ignored (machine-local)


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    # Markdown, not HTML: nothing to escape; StrictUndefined so a context key the template misses fails loudly
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False)


def render(template: str, **context: Any) -> str:
    """``templates/<template>`` rendered with ``context``; one line per line of output, the last newline dropped
    (the report ends as ``"\\n".join(lines)`` of its lines)."""
    text = _environment().get_template(template).render(**context)
    return text[:-1] if text.endswith("\n") else text


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines (for the sections built in Python, e.g. the efficiency section)."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def ranges(layers: list[int]) -> str:
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


def mapping_rows(plan: dict) -> list[list[str]]:
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
            rows.append([str(index), ranges(originals), "merged"])
    flush()
    return rows


def setting_text(value: Any) -> str:
    """A method setting as the report prints it: whole floats as integers, long values shortened."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value) and len(json.dumps(value)) > 60:
        return f"[{len(value)} strings]"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


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
    """The efficiency measurement of the two ``evaluate`` stages as Markdown lines (``efficiency`` blocks):
    in the report, and in the machine-local ``reports/timings.md``."""
    out = ["## Efficiency", ""]
    d_eff, c_eff = dense.get("efficiency"), compressed.get("efficiency")
    if d_eff or c_eff:
        e = d_eff or c_eff
        out.append(f"batch {fmt(e.get('batch_size'), '.0f')}, prompt {fmt(e.get('prompt_len'), '.0f')} tokens, {fmt(e.get('new_tokens'), '.0f')} new tokens; "
                   f"device: dense {get(d_eff, 'device') or MISSING}, compressed {get(c_eff, 'device') or MISSING}; "
                   f"peak memory is {e.get('peak_memory_kind') or MISSING}.")
        out += ["", *markdown_table(["quantity", "dense", "compressed", "compressed / dense"],
                                    [[f"{r['name']} ({r['better']} is better)", fmt(r["dense"], ".1f"), fmt(r["compressed"], ".1f"), fmt(r["ratio"], ".3f")] for r in efficiency_table(dense, compressed)])]
        if d_eff and c_eff:
            out += ["", *_speedup_section(dense, compressed)]
    else:
        out.append("Not in these metrics: measured timings and the device are machine-local and go to `reports/timings.md` "
                   "(not committed); eval.efficiency.enabled=false measures none.")
    out.append("")
    return out


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
    return lines + markdown_table(["phase", "speed-up [range]", "FLOP bound", "note"], rows)


def _acc_se(value: Any, se: Any) -> str:
    return pct(value) + ("" if se is None else f" ± {pct(se)}")


def _settings_context(dense: dict, compressed: dict, method: dict, method_name: str, stats: dict | None,
                      model_name: str | None) -> dict[str, Any]:
    le = dense.get("lm_eval_settings") or compressed.get("lm_eval_settings")
    lm_eval = None
    if le:
        shots = le.get("num_fewshot") or {}
        lm_eval = {"limit": setting_text(le["limit"]) if le.get("limit") is not None else "none (full sets)",
                   "num_fewshot": json.dumps(shots) if shots else "0", "local_tasks": le.get("local_tasks", MISSING),
                   "differs": dense.get("lm_eval_settings") != compressed.get("lm_eval_settings")}
    return {
        "model": model_name or MISSING, "model_type": get(dense, "model", "model_type") or MISSING,
        "layers": f"{fmt(get(dense, 'model', 'num_layers'), '.0f')} → {fmt(get(compressed, 'model', 'num_layers'), '.0f')}",
        "method_name": method_name,
        "method_settings": ", ".join(f"{k}={setting_text(v)}" for k, v in method.items() if k != "name"),
        "calibration": {"sequences": fmt(stats.get("sequences"), ".0f"), "tokens": fmt(stats.get("tokens"), ".0f")} if stats else None,
        "lm_eval": lm_eval,
        "perplexity": [{"dataset": dataset, "seq_len": fmt(p.get("seq_len"), ".0f"), "windows": fmt(p.get("windows"), ".0f"),
                        "tokens_scored": fmt(p.get("tokens_scored"), ".0f"), "add_bos": p.get("add_bos", MISSING)}
                       for dataset, p in (dense.get("perplexity") or {}).items()],
        "device": {"recorded": bool(dense.get("device") or compressed.get("device")),
                   "dense": dense.get("device") or MISSING, "dense_dtype": dense.get("dtype") or MISSING,
                   "compressed": compressed.get("device") or MISSING, "compressed_dtype": compressed.get("dtype") or MISSING},
    }


def _accuracy_context(rows: list[dict], rec_rows: dict, recovered: bool, drift: dict, headline_tasks: list[str] | None,
                      le: dict | None) -> dict[str, Any]:
    sample = None
    if le and num(le.get("limit")) is not None:
        limit = num(le["limit"])
        sample = f"{100 * limit:g}% of the documents" if limit < 1 else f"{limit:g} documents"
    table = []
    for r in rows:
        avg = r["name"] in ("average", "headline")
        rec = rec_rows.get(("accuracy", r["name"]))
        cells = [
            f"**{r['name']}**" if avg else r["name"], r["metric"] or MISSING, "" if avg else fmt(r.get("n"), ".0f"),
            _acc_se(r["dense"], r.get("dense_stderr")), _acc_se(r["compressed"], r.get("compressed_stderr")),
            diff_cell(r.get("diff"), r.get("diff_se")), retained_cell(r["retained_pct"], r.get("significant")),
        ]
        if recovered:
            cells += [
                MISSING if rec is None else _acc_se(rec["compressed"], rec.get("compressed_stderr")),
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
    return {"sample": sample, "header": header + ["note"], "rows": table}


def _other_context(rows: list[dict], rec_rows: dict, recovered: bool) -> dict[str, Any]:
    other = []
    for r in rows:
        rec = rec_rows.get((r["section"], r["name"])) or {}
        rec_cells = [fmt(rec.get("compressed"), ".3f" if r["section"] == "perplexity" else ",.0f")] if recovered else []
        if r["section"] == "perplexity":
            other.append([f"perplexity {r['name']} (lower is better)", fmt(r["dense"], ".3f"), fmt(r["compressed"], ".3f"), *rec_cells, fmt(r["ratio"], ".3f"), MISSING, r["note"] or ""])
        elif r["section"] == "parameters":
            other.append([r["name"], fmt(r["dense"], ",.0f"), fmt(r["compressed"], ",.0f"), *rec_cells, fmt(ratio(r["compressed"], r["dense"]), ".3f"), fmt(r["retained_pct"], ".1f"), ""])
    return {"header": ["quantity", "dense", "compressed", *(["recovered"] if recovered else []), "compressed / dense", "retained %", "note"],
            "rows": other}


def _experiments_context(experiments: list[dict]) -> dict[str, Any]:
    own = any(r.get("headline_tasks") is not None for r in experiments)
    what = ("headline of each experiment over its own informative tasks, decided from its dense model (the numbers "
            "of its metrics/summary.json)") if own else "average accuracy over the tasks every experiment ran"
    rows = [[r["experiment"], r.get("model") or MISSING, (r["method"] or MISSING) + (" + recovery" if r.get("recovered") else ""),
             fmt(r["layers"], ".0f"), fmt(r["params_total"], ",.0f"),
             f"{pct(r['dense_average'])} → {pct(r['average'])}", diff_cell(r.get("diff"), r.get("diff_se")),
             retained_cell(r["retained_pct"], r.get("significant")), fmt(r["wikitext2_ppl"], ".3f"), fmt(r.get("c4_ppl"), ".3f")]
            for r in experiments]
    return {"what": what, "rows": rows,
            "header": ["experiment", "model", "method", "layers", "parameters", "average % (dense → final)", "Δ", "retained %", "wikitext2 PPL", "c4 PPL"]}


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
    ``experiments`` are :func:`layerfold.report.tables.experiments_table` rows; ``recovered``
    (``metrics/recovered.json``, when a recovery ran) adds recovered columns beside the compressed ones.
    ``decision`` (:func:`layerfold.report.protocol.informative_tasks`) makes the summary row the headline
    over the informative tasks and prints the rule above the tables; ``drift`` (per model name, compressed /
    recovered: :func:`layerfold.report.protocol.run_drift`) marks answer drift beside the scores."""
    from layerfold.report.protocol import drift_mark, rule_lines

    headline_tasks = None if decision is None else list(decision["tasks"])
    drift = drift or {}
    method = (plan or {}).get("method") or {}
    method_name = method.get("name") or get(compress, "method") or MISSING
    rows = comparison_table(dense, compressed, headline_tasks)
    rec_rows = {(r["section"], r["name"]): r for r in comparison_table(dense, recovered, headline_tasks)} if recovered else {}
    acc = [r for r in rows if r["section"] == "accuracy"]
    marks = [f"{label}: {drift_mark(drift.get(label))}" for label in ("compressed", "recovered") if drift_mark(drift.get(label))]
    tested = sorted({t for d in drift.values() if d for t in d.get("tested", [])})
    le = dense.get("lm_eval_settings") or compressed.get("lm_eval_settings")
    return render(
        "report.md.j2",
        title=f"{model_name or 'model'}: {method_name}",
        **_settings_context(dense, compressed, method, method_name, stats, model_name),
        plan={"original_layers": plan.get("original_layers", MISSING), "new_layers": len(plan.get("layers", [])),
              "removed": ranges(plan.get("removed", [])),
              "merged": "; ".join("{" + ", ".join(map(str, g)) + "}" for g in plan["merged"]) if plan.get("merged") else "none",
              "mapping": mapping_rows(plan)} if plan else None,
        recovered=bool(recovered),
        rule_lines=rule_lines(decision) if decision is not None else None,
        drift="; ".join(marks) if marks else f"none beyond noise ({len(tested)} task(s) tested)",
        accuracy=_accuracy_context(acc, rec_rows, bool(recovered), drift, headline_tasks, le) if acc else None,
        other=_other_context(rows, rec_rows, bool(recovered)),
        efficiency=efficiency_section(dense, compressed),
        compression=compression_line(compress),
        experiments=_experiments_context(experiments) if experiments else None,
        plots=list((plots or {}).items()),
    )
