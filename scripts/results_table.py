"""Print a Markdown table of a results directory written by scripts/run_methods.py.

    python scripts/results_table.py results/smollm2-135m_h100/methods_limit300

One row per method subdirectory (``dense`` first): layers, WikiText-2 / C4 perplexity, each task's
reported metric (acc or acc_norm, see layerfold.report.REPORTED_METRIC), the average and the share of
the dense average it retains, plus compression wall time and peak memory.
"""

import sys
from pathlib import Path

from layerfold.io import read_json
from layerfold.report.tables import REPORTED_METRIC, TASK_ORDER, average_accuracy, fmt


def main(root: Path) -> None:
    runs = sorted(p for p in root.iterdir() if (p / "metrics.json").exists())
    runs.sort(key=lambda p: p.name != "dense")
    metrics = {p.name: read_json(p / "metrics.json") for p in runs}
    tasks = [t for t in TASK_ORDER if all(t in m.get("lm_eval", {}) for m in metrics.values())]
    dense_avg = average_accuracy(metrics["dense"], tasks) if "dense" in metrics else None
    header = ["run", "layers", "wiki2 ppl", "c4 ppl", *[f"{t} ({REPORTED_METRIC[t]})" for t in tasks], "avg", "retained %", "compress s", "peak MiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for p in runs:
        m = metrics[p.name]
        compress = read_json(p / "compress.json") if (p / "compress.json").exists() else {}
        avg = average_accuracy(m, tasks)
        ppl = m.get("perplexity", {})
        row = [
            p.name,
            str(m["model"]["num_layers"]),
            fmt(ppl.get("wikitext2", {}).get("perplexity"), ".4g"),
            fmt(ppl.get("c4", {}).get("perplexity"), ".4g"),
            *[fmt(100 * m["lm_eval"][t][REPORTED_METRIC[t]], ".1f") for t in tasks],
            fmt(None if avg is None else 100 * avg, ".2f"),
            fmt(None if avg is None or not dense_avg else 100 * avg / dense_avg, ".1f"),
            fmt(compress.get("seconds"), ".1f"),
            fmt(compress.get("peak_memory_mib"), ".0f"),
        ]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
