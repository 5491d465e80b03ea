"""Print Markdown tables of a results directory written by scripts/run_methods.py.

    python scripts/results_table.py results/smollm2-135m-q4_1_h100/suite

Table 1, quality: one row per run (``dense`` first) with the metrics of the model the run ends with
(recovered when a recovery ran): layers, WikiText-2 / C4 perplexity, each task's reported metric (acc
or acc_norm, see layerfold.report.REPORTED_METRIC), the task average ± its standard error and the
difference to dense ± its standard error (paired over the same documents; ``*`` marks a difference
beyond 1.96 standard errors — anything else is noise, not a gain or a loss).

Table 2, cost: compression wall time and peak memory (``compress_time.json``), and for recovered runs
the training tokens, wall time, tokens/s, MFU, peak GPU memory and peak host RAM (``recover.json``).
"""

import sys
from pathlib import Path

from layerfold.io import read_json
from layerfold.report.compare import runs_from_methods_dir
from layerfold.report.tables import REPORTED_METRIC, TASK_ORDER, experiments_table, final_metrics, fmt


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def quality_table(root: Path) -> list[str]:
    runs = runs_from_methods_dir(root)
    dense = read_json(root / "dense" / "metrics.json")
    tasks = [t for t in TASK_ORDER if t in dense.get("lm_eval", {}) and all(t in final_metrics(r).get("lm_eval", {}) for r in runs)]
    rows = experiments_table([{"name": "dense", "dense": dense, "compressed": dense}, *runs], tasks)
    header = ["run", "layers", "wiki2 ppl", "c4 ppl", *[f"{t} ({REPORTED_METRIC[t]})" for t in tasks], "avg ± se", "Δ vs dense ± se"]
    out = [_row(header), "|" + "---|" * len(header)]
    for run, row in zip([{"name": "dense", "compressed": dense}, *runs], rows):
        metrics = final_metrics(run)
        diff = "—" if run["name"] == "dense" else f"{fmt(100 * row['diff'], '+.2f')} ± {fmt(100 * row['diff_se'], '.2f')}{'*' if row['significant'] else ''}"
        out.append(_row([
            run["name"] + (" (recovered)" if run.get("recovered") else ""),
            fmt(row["layers"], ".0f"),
            fmt(row["wikitext2_ppl"], ".4g"),
            fmt(row["c4_ppl"], ".4g"),
            *[fmt(100 * metrics["lm_eval"][t][REPORTED_METRIC[t]], ".1f") for t in tasks],
            f"{fmt(100 * row['average'], '.2f')} ± {fmt(100 * (row['average_stderr'] or 0), '.2f')}",
            diff,
        ]))
    return out


def cost_table(root: Path) -> list[str]:
    header = ["run", "compress s", "compress peak MiB", "train tokens", "train s", "tokens/s", "MFU", "peak GPU MiB", "peak host MiB"]
    out = [_row(header), "|" + "---|" * len(header)]
    for folder in sorted(p for p in root.iterdir() if (p / "compress.json").is_file()):
        timing = read_json(folder / "compress_time.json") if (folder / "compress_time.json").exists() else {}
        rec = read_json(folder / "recover.json") if (folder / "recover.json").exists() else {}
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


def main(root: Path) -> None:
    print("\n".join(quality_table(root)))
    print()
    print("\n".join(cost_table(root)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
