"""The 2025 methods next to ShortGPT and Gromov on one protocol: a table of every task's accuracy ± its standard
error, the WikiText-2 perplexity, and each method's paired difference from its baseline.

    python scripts/methods_2025_table.py results/methods_2025/smollm2-135m-q4_1_cpu

Reads the ``scripts/run_methods.py --out`` folder (``<run>/metrics.json``, ``params.yaml``, ``plan.json``,
``dense/metrics.json``) and writes ``table.md`` and ``table.json`` beside them. Every sentence of the
"reading" section is generated here from the numbers: a difference counts only outside 1.96 standard errors
(paired over the same documents, :mod:`layerfold.report.noise`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from layerfold.io import atomic_file, write_json  # noqa: E402
from layerfold.report.noise import Z, difference, mean_difference, mean_stderr  # noqa: E402
from layerfold.report.tables import reported_metric  # noqa: E402

TASKS = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq_notitle", "openbookqa"]
# Each method, and the baseline it is paired with (the same removal without the 2025 part, or the method ReplaceMe's
# selection follows).
BASELINE = {"replaceme": "gromov", "replaceme_objectivecosine": "gromov", "shortgpt_compensateprune_comp": "shortgpt",
            "gromov_compensateprune_comp": "gromov", "shortgpt_compensatelinear_patch": "shortgpt",
            "gromov_compensatelinear_patch": "gromov", "sleb_one_shotTrue": "shortgpt"}


def label(params: dict) -> str:
    method = params.get("method") or {}
    parts = [method.get("name", "?")]
    if method.get("name") == "replaceme":
        parts.append(f"{method.get('objective')}")
    if method.get("one_shot"):
        parts.append("one-shot")
    compensate = (params.get("compensate") or {}).get("name", "none")
    if compensate != "none":
        parts.append(f"+ {compensate}")
    return " ".join(parts)


def load(folder: Path) -> dict[str, dict]:
    runs = {}
    for path in sorted(folder.iterdir()):
        if (path / "metrics.json").exists() and (path / "params.yaml").exists():
            runs[path.name] = {"metrics": json.loads((path / "metrics.json").read_text()),
                               "params": yaml.safe_load((path / "params.yaml").read_text()),
                               "plan": json.loads((path / "plan.json").read_text()) if (path / "plan.json").exists() else None}
    return runs


def task_cell(result: dict | None, metric: str | None) -> tuple[float | None, float | None]:
    if not result or metric is None:
        return None, None
    return result.get(metric), result.get(f"{metric}_stderr")


def build(runs: dict[str, dict]) -> dict:
    dense = runs["dense"]["metrics"]["lm_eval"]
    rows = []
    for name, run in runs.items():
        m = run["metrics"]
        lm = m["lm_eval"]
        cells, stderrs = {}, []
        for task in TASKS:
            metric = reported_metric(task, lm.get(task), dense.get(task))
            value, se = task_cell(lm.get(task), metric)
            cells[task] = {"metric": metric, "value": value, "se": se}
            stderrs.append(se)
        values = [c["value"] for c in cells.values()]
        average = sum(values) / len(values) if all(v is not None for v in values) else None
        row = {"run": name, "label": "dense" if name == "dense" else label(run["params"]), "layers": m["model"]["num_layers"],
               "wikitext2_ppl": m["perplexity"]["wikitext2"]["perplexity"], "tasks": cells, "average": average,
               "average_se": mean_stderr(stderrs), "removed": (run["plan"] or {}).get("removed"),
               "merged": (run["plan"] or {}).get("merged"), "compensation": (run["plan"] or {}).get("compensation", {}).get("name", "none")}
        for ref in ("dense", BASELINE.get(name)):
            if ref and ref in runs and ref != name:
                ref_lm = runs[ref]["metrics"]["lm_eval"]
                diffs = [difference(ref_lm.get(t), lm.get(t), cells[t]["metric"]) for t in TASKS]
                row[f"vs_{'dense' if ref == 'dense' else 'baseline'}"] = {"against": ref, **mean_difference(diffs),
                                                                          "tasks": {t: d for t, d in zip(TASKS, diffs)}}
        rows.append(row)
    settings = runs["dense"]["metrics"].get("lm_eval_settings", {})
    return {"rows": rows, "device": runs["dense"]["metrics"].get("device"), "dtype": runs["dense"]["metrics"].get("dtype"),
            "versions": runs["dense"]["metrics"].get("versions"), "lm_eval_settings": settings,
            "perplexity": {k: {kk: vv for kk, vv in v.items() if kk != "perplexity"} for k, v in runs["dense"]["metrics"]["perplexity"].items()},
            "model": runs["dense"]["metrics"]["model"]}


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def reading(rows: list[dict]) -> list[str]:
    """One generated sentence per method with a baseline: ahead, behind or within noise, and by how much."""
    lines = []
    for row in rows:
        diff = row.get("vs_baseline")
        if not diff or diff["diff"] is None or diff["se"] is None:
            continue
        d, se = 100 * diff["diff"], 100 * diff["se"]
        verdict = ("within noise of" if not diff["significant"] else ("ahead of" if d > 0 else "behind"))
        base = next(r for r in rows if r["run"] == diff["against"])
        ppl = f"WikiText-2 perplexity {row['wikitext2_ppl']:.2f} vs {base['wikitext2_ppl']:.2f}"
        lines.append(f"- **{row['label']}** is {verdict} {base['label']} on the 7-task average: {d:+.2f} ± {se:.2f} points "
                     f"(paired, |Δ| {'>' if diff['significant'] else '<='} {Z} se); {ppl}.")
    return lines


def markdown(table: dict, folder: Path) -> str:
    rows = table["rows"]
    s = table["lm_eval_settings"]
    ppl = table["perplexity"]["wikitext2"]
    lines = [
        "# 2025 methods on SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), 30 -> 22 layers",
        "",
        f"- **Model**: {table['model'].get('name')}, `{table['model'].get('file')}`, {table['model'].get('quantization')}: the numbers "
        "of the **dequantised GGUF**, not of the full-precision model.",
        f"- **Device**: {table['device']}, {table['dtype']}; versions {json.dumps(table['versions'])}",
        f"- **Perplexity**: WikiText-2 test, every {ppl['seq_len']}-token window ({ppl['windows']} windows, {ppl['tokens_scored']} tokens scored).",
        f"- **lm-eval**: {s.get('sampling')} of {s.get('limit')} documents per task (seed {s.get('seed')}, the same documents for every "
        "model; per-document results in each run's metrics.json), 0-shot; headline metric acc_norm for HellaSwag, ARC-c, "
        "OpenBookQA, acc otherwise.",
        "- **Average**: unweighted mean of the 7 tasks ± its standard error; Δ: paired difference in points ± se over the same "
        f"documents; `*` where |Δ| > {Z} se.",
        "",
        "| run | method | layers | wiki2 PPL | " + " | ".join(TASKS) + " | avg % | Δ vs dense | baseline | Δ vs baseline |",
        "|---|---|---|---|" + "---|" * len(TASKS) + "---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{pct(row['tasks'][t]['value'])} ± {pct(row['tasks'][t]['se'])}" for t in TASKS]
        vs_dense, vs_base = row.get("vs_dense"), row.get("vs_baseline")

        def fmt(d: dict | None) -> str:
            if not d or d["diff"] is None:
                return "—"
            return f"{100 * d['diff']:+.2f} ± {100 * d['se']:.2f}{'*' if d['significant'] else ''}"

        lines.append(f"| {row['run']} | {row['label']} | {row['layers']} | {row['wikitext2_ppl']:.2f} | " + " | ".join(cells)
                     + f" | {pct(row['average'])} ± {pct(row['average_se'])} | {fmt(vs_dense)} | "
                     + f"{(vs_base or {}).get('against', '—')} | {fmt(vs_base)} |")
    lines += ["", "## Reading (generated from the numbers above)", "", *reading(rows), ""]
    lines += ["## Layers removed", "", "| run | removed (original indices) | compensation |", "|---|---|---|"]
    lines += [f"| {r['run']} | {r['removed']} | {r['compensation']} |" for r in rows if r["run"] != "dense"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    table = build(load(args.folder))
    write_json(args.folder / "table.json", table)
    with atomic_file(args.folder / "table.md") as handle:
        handle.write(markdown(table, args.folder))
    print((args.folder / "table.md").read_text())


if __name__ == "__main__":
    main()
