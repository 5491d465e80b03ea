"""Tables of a ``scripts/run_methods.py`` output folder (``scripts/runs.py table DIR``).

Table 1, quality: one row per run (``dense`` first) with the metrics of the model the run ends with
(recovered when a recovery ran): layers, WikiText-2 / C4 perplexity, each task's reported metric (acc
or acc_norm, see :data:`layerfold.report.tables.REPORTED_METRIC`), the headline (mean over the informative
tasks, whose rule, set and exclusions are printed above the table: docs/protocol.md) ± its standard error
and the difference to dense ± its standard error (paired over the same documents; ``*`` marks a difference
beyond 1.96 standard errors — anything else is noise, not a gain or a loss). Each run's headline is its own
(:func:`layerfold.report.reader.run_headline`), the number every other reader shows for it.

Table 2, cost: compression wall time and peak memory (``compress_time.json``), and for recovered runs
the training tokens, wall time, tokens/s, MFU, peak GPU memory and peak host RAM (``recover.json``).

Measured beside reported (:func:`reported_tables`): one table per run whose ``params.yaml`` comes from a paper
preset naming reported numbers (``protocol.reported``, see ``layerfold/report/papers.yaml``), with a verdict
that uses the measured standard error only (reported numbers have none).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from layerfold.evaluation.results import merge_documents
from layerfold.io import read_json
from layerfold.report.protocol import informative_tasks, rule_lines
from layerfold.report.reported import LEGEND, comparison_lines, entry, load_papers, reported_name, side_by_side
from layerfold.report.tables import REPORTED_METRIC, TASK_ORDER, experiments_table, final_metrics, fmt
from layerfold.runs.sources import runs_from_methods_dir


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _points(value: float | None) -> float | None:
    return None if value is None else 100 * value


def quality_table(root: Path, headline_tasks: str | list[str] = "auto") -> list[str]:
    runs = runs_from_methods_dir(root)
    dense = merge_documents(read_json(root / "dense" / "metrics.json"),
                            read_json(root / "dense" / "documents.json") if (root / "dense" / "documents.json").is_file() else None)
    tasks = [t for t in TASK_ORDER if t in dense.get("lm_eval", {}) and all(t in final_metrics(r).get("lm_eval", {}) for r in runs)]
    decision = informative_tasks(dense, tasks, headline_tasks)
    rows = experiments_table([{"name": "dense", "dense": dense, "compressed": dense}, *runs], setting=headline_tasks)
    header = ["run", "layers", "wiki2 ppl", "c4 ppl", *[f"{t} ({REPORTED_METRIC[t]})" for t in tasks], "headline ± se", "Δ vs dense ± se"]
    # each run's headline is over its own informative tasks (as its report says); name those that differ from the rule's
    own = [f"- {run['name']}: its own headline counts {', '.join(row['headline_tasks']) or 'none'}"
           for run, row in zip([{"name": "dense"}, *runs], rows) if row["headline_tasks"] != decision["tasks"]]
    out = [*rule_lines(decision), *own, "", _row(header), "|" + "---|" * len(header)]
    for run, row in zip([{"name": "dense", "compressed": dense}, *runs], rows):
        metrics = final_metrics(run)
        diff = "—" if run["name"] == "dense" or row["diff"] is None else \
            f"{fmt(100 * row['diff'], '+.2f')} ± {fmt(_points(row['diff_se']), '.2f')}{'*' if row['significant'] else ''}"
        out.append(_row([
            run["name"] + (" (recovered)" if run.get("recovered") else ""),
            fmt(row["layers"], ".0f"),
            fmt(row["wikitext2_ppl"], ".4g"),
            fmt(row["c4_ppl"], ".4g"),
            *[fmt(100 * metrics["lm_eval"][t][REPORTED_METRIC[t]], ".1f") for t in tasks],
            "—" if row["average"] is None else f"{fmt(100 * row['average'], '.2f')} ± {fmt(_points(row['average_stderr']), '.2f')}",
            diff,
        ]))
    return out


def cost_table(root: Path) -> list[str]:
    header = ["run", "compress s", "compress peak MiB", "train tokens", "train s", "tokens/s", "MFU", "peak GPU MiB", "peak host MiB"]
    out = [_row(header), "|" + "---|" * len(header)]
    for folder in sorted(p for p in root.iterdir() if (p / "compress.json").is_file()):
        timing = read_json(folder / "compress_time.json") if (folder / "compress_time.json").exists() else {}
        # recover_time.json holds the times and memory; older folders kept them in recover.json
        rec = {key: value for name in ("recover.json", "recover_time.json") if (folder / name).exists()
               for key, value in read_json(folder / name).items()}
        out.append(_row([
            folder.name,
            fmt(timing.get("seconds"), ".1f"),
            fmt(timing.get("peak_memory_mib"), ".0f"),
            fmt(rec.get("train_tokens_processed"), ",.0f"),
            fmt(rec.get("train_seconds"), ".1f"),
            fmt(rec.get("tokens_per_s"), ",.0f"),
            fmt(None if rec.get("mfu") is None else 100 * rec["mfu"], ".1f", " %"),
            fmt(rec.get("peak_gpu_memory_mib"), ",.0f"),
            fmt(rec.get("peak_host_rss_mib"), ",.0f"),
        ]))
    return out


def reported_tables(root: Path) -> list[str]:
    """Measured beside reported for every run whose params.yaml names a paper preset's reported entry."""
    papers = load_papers()
    out = []
    for run in runs_from_methods_dir(root):
        params_file = root / run["name"] / "params.yaml"
        name = reported_name(yaml.safe_load(params_file.read_text()) if params_file.is_file() else None)
        if name is None or run.get("dense") is None:
            continue
        rows = side_by_side(entry(name, papers), run["dense"], final_metrics(run), run.get("plan"), papers)
        out += [f"### {run['name']}: measured vs reported (`{name}`)", "", *comparison_lines(rows), ""]
    if not out:
        return ["No run here names reported numbers (protocol.reported in its params.yaml, set by a paper preset)."]
    return [LEGEND, "", *out]
