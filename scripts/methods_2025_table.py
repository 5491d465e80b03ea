"""The 2025 methods next to ShortGPT and Gromov on one protocol: the headline (the mean over the tasks the dense
model answers above its floor, ``docs/protocol.md``) ± its standard error with the paired difference from dense and
from each method's baseline, every task's accuracy ± se, and the WikiText-2 perplexity.

    python scripts/methods_2025_table.py results/methods_2025/smollm2-135m-q4_1_cpu_protocol

Reads the ``scripts/run_methods.py --out`` folder (``<run>/metrics.json``, ``params.yaml``, ``plan.json``,
``dense/metrics.json``) and writes ``table.md`` and ``table.json`` beside them. Every sentence of the
"reading" section is generated here from the numbers: a difference counts only outside 1.96 standard errors
(paired over the same documents, :mod:`layerfold.report.noise`).

    python scripts/methods_2025_table.py results/methods_2025/smollm2-135m-q4_1_cpu_protocol --docs docs/methods_2025.md \
        --marker methods_2025_protocol_table --table-only
    python scripts/methods_2025_table.py results/methods_2025/smollm2-135m-q4_1_cpu --docs docs/methods_2025.md

also rewrites a generated part of ``docs/methods_2025.md`` (between its ``<marker>:begin`` / ``<marker>:end`` lines,
``methods_2025_table`` by default): the table and, unless ``--table-only``, the parity verdicts
(``results/parity/*.json`` of ``python -m parity.methods_2025``) and ReplaceMe's estimation cost
(``benchmarks/results/replaceme_cost_*.json``), so no number in that section is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from layerfold.evaluation.results import merge_documents  # noqa: E402
from layerfold.io import atomic_file, write_json  # noqa: E402
from layerfold.report.noise import Z, difference, mean_difference, mean_stderr  # noqa: E402
from layerfold.report.protocol import (  # noqa: E402
    collapsed, drift_mark, headline, headline_difference, informative_tasks, rule_lines, run_drift,
)
from layerfold.report.tables import reported_metric  # noqa: E402

TASKS = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq_notitle", "openbookqa"]
# Each method, and the baseline it is paired with (the same removal without the 2025 part, or the method ReplaceMe's
# selection follows).
BASELINE = {"replaceme": "gromov", "replaceme_objectivecosine": "gromov", "shortgpt_compensateprune_comp": "shortgpt",
            "gromov_compensateprune_comp": "gromov", "shortgpt_compensatelinear_patch": "shortgpt",
            "gromov_compensatelinear_patch": "gromov", "sleb_one_shotTrue": "shortgpt", "sleb_one_shottrue": "shortgpt"}
# Perplexity here carries no standard error: a ratio to the baseline within this factor is not read as a difference.
PPL_UNREAD = 1.05


def label(params: dict, healed: bool = False) -> str:
    method = params.get("method") or {}
    parts = [method.get("name", "?")]
    if method.get("name") == "replaceme":
        parts.append(f"{method.get('objective')}")
    if method.get("one_shot"):
        parts.append("one-shot")
    compensate = (params.get("compensate") or {}).get("name", "none")
    if compensate != "none":
        parts.append(f"+ {compensate}")
    if healed:
        recovery = params.get("recovery") or {}
        trainable = recovery.get("trainable")
        what = f"lm_head + last {recovery.get('last_layers')} layers" if trainable == "last" else trainable
        loss = recovery.get("end_to_end") or {}
        objective = "logit KD" if loss.get("kd_weight") and not loss.get("lm_weight") else "LM loss"
        seed = (params.get("runtime") or {}).get("seed", 0)
        parts.append(f"healed ({recovery.get('name')}: {what}, {objective}, seed {seed})")
    return " ".join(parts)


def order(path: Path) -> tuple[int, str]:
    """dense, the baselines, then the 2025 methods in BASELINE's order (unknown runs last, by name)."""
    known = ["dense", "shortgpt", "gromov", *BASELINE]
    return (known.index(path.name) if path.name in known else len(known), path.name)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def load(folder: Path) -> dict[str, dict]:
    """Every run of a ``scripts/run_methods.py --out`` folder, its per-document results (``documents.json``) merged
    into its metrics so that differences are paired over the same documents. A folder with a recovery gives two runs:
    ``<folder>`` (the compressed model, when scored) and ``<folder> (healed)`` (``recovered.json``)."""
    runs = {}
    for path in sorted(folder.iterdir(), key=order):
        if not (path / "params.yaml").exists():
            continue
        common = {"params": yaml.safe_load((path / "params.yaml").read_text()), "plan": read_json(path / "plan.json"),
                  "compress_time": read_json(path / "compress_time.json"),
                  # the evaluate stage's device, library versions and wall times (kept out of metrics.json)
                  "evaluate_timings": read_json(path / "evaluate_timings.json") or {}}
        for metrics, documents, name in (("metrics.json", "documents.json", path.name),
                                         ("recovered.json", "recovered_documents.json", f"{path.name} {HEALED}")):
            if (path / metrics).exists():
                runs[name] = {**common, "metrics": merge_documents(read_json(path / metrics), read_json(path / documents)),
                              "healed": name != path.name, "recover": read_json(path / "recover.json") if name != path.name else None}
    return runs


HEALED = "(healed)"
SEED = re.compile(r"_seed(\d+)(?= |$)")


def seed_group(run: str) -> str:
    """``minitron-depth_seed2 (healed)`` -> ``minitron-depth (healed)``: the runs that differ only in their training seed."""
    return SEED.sub("", run)


def baseline_of(run: str, runs: dict[str, dict]) -> str | None:
    """What a run is paired with: a 2025 method with the removal it extends (``BASELINE``); a healed run with the same
    compressed model before healing (its own folder's, or its seed-0 folder's)."""
    if run.endswith(HEALED):
        compressed = seed_group(run)[: -len(HEALED) - 1]
        return compressed if compressed in runs else None
    return BASELINE.get(run)


def task_cell(result: dict | None, metric: str | None) -> tuple[float | None, float | None]:
    if not result or metric is None:
        return None, None
    return result.get(metric), result.get(f"{metric}_stderr")


def evaluated_tasks(runs: dict[str, dict]) -> list[str]:
    """The lm-eval tasks dense was scored on, in ``eval.lm_eval.tasks`` order (lm-eval's names, e.g. boolq_notitle)."""
    scored = list(runs["dense"]["metrics"].get("lm_eval") or {})
    listed = [str(t) for t in ((runs["dense"]["params"].get("eval") or {}).get("lm_eval") or {}).get("tasks") or []]
    return [t for t in listed if t in scored] + [t for t in scored if t not in listed]


def protocol(runs: dict[str, dict]) -> dict | None:
    """The headline protocol (``layerfold.report.protocol``) over these runs: the informative tasks decided from dense
    (``eval.headline.tasks``: auto, or a fixed list), each run's headline ± se, its paired difference from dense and
    from its baseline with the verdict, answer drift against dense and collapse; None without lm-eval results."""
    dense = runs["dense"]["metrics"]
    tasks = evaluated_tasks(runs)
    if not tasks:
        return None
    setting = ((runs["dense"]["params"].get("eval") or {}).get("headline") or {}).get("tasks", "auto")
    decision = informative_tasks(dense, tasks, setting)
    counted = decision["tasks"]
    per_run = {}
    for name, run in runs.items():
        m = run["metrics"]
        mine = headline(m, counted)
        entry = {"headline": mine["value"], "headline_se": mine["se"],
                 "collapsed": collapsed(m["perplexity"]["wikitext2"]["perplexity"], dense["perplexity"]["wikitext2"]["perplexity"])}
        if name != "dense":
            entry["vs_dense"] = headline_difference(m, dense, counted)
            drift = run_drift(dense, m, tasks)
            entry["drift"] = drift_mark(drift)
            entry["drifted"] = drift["drifted"]
            base = baseline_of(name, runs)
            if base in runs:
                vs_base = headline_difference(m, runs[base]["metrics"], counted)
                entry["vs_baseline"] = {"against": base, **{k: vs_base[k] for k in ("diff", "se", "paired", "significant", "verdict")}}
        per_run[name] = entry
    return {"rule": decision["rule"], "text": decision["text"], "tasks": counted, "evaluated": tasks,
            "excluded": decision["excluded"], "rule_lines": rule_lines(decision),
            "decisions": {t: {k: v for k, v in d.items()} for t, d in decision["decisions"].items()}, "runs": per_run}


def build(runs: dict[str, dict], run_facts: dict | None = None) -> dict:
    """The table. ``run_facts`` (the folder's ``run.json``: device, library versions, as the run printed them) stands in
    for the evaluate stage's timing files where those were not kept."""
    run_facts = run_facts or {}
    dense = runs["dense"]["metrics"].get("lm_eval") or {}
    rows = []
    for name, run in runs.items():
        m = run["metrics"]
        lm = m.get("lm_eval") or {}
        cells, stderrs = {}, []
        for task in TASKS:
            metric = reported_metric(task, lm.get(task), dense.get(task))
            value, se = task_cell(lm.get(task), metric)
            cells[task] = {"metric": metric, "value": value, "se": se}
            stderrs.append(se)
        values = [c["value"] for c in cells.values()]
        average = sum(values) / len(values) if all(v is not None for v in values) else None
        row = {"run": name, "label": "dense" if name == "dense" else label(run["params"], run.get("healed", False)), "layers": m["model"]["num_layers"],
               "wikitext2_ppl": m["perplexity"]["wikitext2"]["perplexity"], "tasks": cells, "average": average,
               "average_se": mean_stderr(stderrs), "removed": (run["plan"] or {}).get("removed"),
               "merged": (run["plan"] or {}).get("merged"), "compensation": (run["plan"] or {}).get("compensation", {}).get("name", "none"),
               "compress_s": (run.get("compress_time") or {}).get("seconds"),
               "compress_peak_host_mib": (run.get("compress_time") or {}).get("peak_host_mib")}
        for ref in ("dense", baseline_of(name, runs)):
            if ref and ref in runs and ref != name:
                ref_lm = runs[ref]["metrics"].get("lm_eval") or {}
                row[f"ppl_ratio_vs_{'dense' if ref == 'dense' else 'baseline'}"] = row["wikitext2_ppl"] / runs[ref]["metrics"]["perplexity"]["wikitext2"]["perplexity"]
                if not lm:
                    continue
                diffs = [difference(ref_lm.get(t), lm.get(t), cells[t]["metric"]) for t in TASKS]
                row[f"vs_{'dense' if ref == 'dense' else 'baseline'}"] = {"against": ref, **mean_difference(diffs),
                                                                          "tasks": {t: d for t, d in zip(TASKS, diffs)}}
        rows.append(row)
    settings = runs["dense"]["metrics"].get("lm_eval_settings", {})
    verdicts = protocol(runs)
    if verdicts is not None:
        for row in rows:
            row["protocol"] = verdicts["runs"][row["run"]]
            lm = runs[row["run"]]["metrics"].get("lm_eval") or {}
            row["all_tasks"] = {}
            for task in verdicts["evaluated"]:  # every task scored, LAMBADA included (the 7-task average leaves it out)
                value, se = task_cell(lm.get(task), reported_metric(task, lm.get(task), dense.get(task)))
                row["all_tasks"][task] = {"value": value, "se": se}
        verdicts = {k: v for k, v in verdicts.items() if k != "runs"}
    seeds = seed_spread(rows, runs) if verdicts is not None else []
    max_windows = ((runs["dense"]["params"].get("eval") or {}).get("perplexity") or {}).get("max_windows", "unknown")
    dense_metrics, dense_timings = runs["dense"]["metrics"], runs["dense"].get("evaluate_timings") or run_facts
    return {"rows": rows, "protocol": verdicts, "seeds": seeds, "perplexity_max_windows": max_windows,
            "device": dense_metrics.get("device") or dense_timings.get("device"), "dtype": dense_metrics.get("dtype"),
            "versions": dense_metrics.get("versions") or dense_timings.get("versions"), "lm_eval_settings": settings,
            "perplexity": {k: {kk: vv for kk, vv in v.items() if kk != "perplexity"} for k, v in runs["dense"]["metrics"]["perplexity"].items()},
            "model": runs["dense"]["metrics"]["model"]}


def seed_spread(rows: list[dict], runs: dict[str, dict]) -> list[dict]:
    """Each healed recipe trained under several seeds (``runtime.seed`` and ``recovery.data.seed``: data order and the
    initialisation of what is trained): the headline's and the perplexity's mean and sample standard deviation over the
    seeds, next to the evaluation's own standard error (the mean of the seeds' headline se)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if runs[row["run"]].get("healed"):
            groups.setdefault(seed_group(row["run"]), []).append(row)
    out = []
    for group, members in groups.items():
        if len(members) < 2:
            continue
        heads = [m["protocol"]["headline"] for m in members]
        deltas = [m["protocol"]["vs_dense"]["diff"] for m in members]
        ppls = [m["wikitext2_ppl"] for m in members]
        sample_seeds = sorted({(runs[m["run"]]["metrics"].get("lm_eval_settings") or {}).get("seed") for m in members}, key=str)
        out.append({"recipe": group, "label": members[0]["label"].rsplit(", seed", 1)[0] + ")", "n": len(members),
                    "document_sample_seeds": sample_seeds,
                    "runs": [m["run"] for m in members], "seeds": [(runs[m["run"]]["params"].get("runtime") or {}).get("seed") for m in members],
                    "headline_mean": statistics.mean(heads), "headline_sd": statistics.stdev(heads),
                    "eval_se_mean": statistics.mean(m["protocol"]["headline_se"] for m in members),
                    "vs_dense_mean": statistics.mean(deltas), "vs_dense_sd": statistics.stdev(deltas),
                    "wikitext2_ppl_mean": statistics.mean(ppls), "wikitext2_ppl_sd": statistics.stdev(ppls),
                    "headlines": heads, "wikitext2_ppls": ppls})
    return out


def seeds_markdown(seeds: list[dict]) -> list[str]:
    """The seed table and one generated sentence per recipe: is the spread over seeds small against the evaluation's se?"""
    if not seeds:
        return []
    lines = ["## Healed recipes over training seeds", "",
             "Each recipe trained with several seeds (`runtime.seed` and `recovery.data.seed`: data order and the "
             "initialisation of what is trained) from the same compressed model. sd: sample standard deviation over the "
             "seeds; eval se: the headline's standard error of one run (mean over the seeds).", "",
             "| recipe | seeds | headline % per seed | mean ± sd over seeds | eval se | Δ vs dense mean ± sd | wiki2 PPL mean ± sd |",
             "|---|---|---|---|---|---|---|"]
    for g in seeds:
        lines.append(f"| {g['label']} | {', '.join(str(x) for x in g['seeds'])} | {', '.join(pct(h) for h in g['headlines'])} | "
                     f"{pct(g['headline_mean'])} ± {pct(g['headline_sd'])} | {pct(g['eval_se_mean'])} | "
                     f"{100 * g['vs_dense_mean']:+.2f} ± {pct(g['vs_dense_sd'])} | {g['wikitext2_ppl_mean']:.2f} ± {g['wikitext2_ppl_sd']:.2f} |")
    lines.append("")
    for g in seeds:
        ratio = g["headline_sd"] / g["eval_se_mean"]
        size = "smaller than" if ratio < 1 else "at least as large as"
        same = len(g["document_sample_seeds"]) == 1
        documents = ("every seed scored on the same documents" if same else
                     "the seeds were scored on different document samples (sample seeds "
                     f"{', '.join(str(x) for x in g['document_sample_seeds'])}), so this spread holds the sampling's variance too "
                     "and the seeds' differences are unpaired")
        lines.append(f"- **{g['label']}**: the headline's spread over {g['n']} seeds ({pct(g['headline_sd'])} points) is {size} "
                     f"one evaluation's standard error ({pct(g['eval_se_mean'])} points; ratio {ratio:.2f}); {documents}.")
    return [*lines, ""]


def from_folder(folder: Path) -> dict:
    """The table of a results folder: its runs and, where present, its ``run.json`` (device and versions)."""
    return build(load(folder), read_json(folder / "run.json"))


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def reading(rows: list[dict]) -> list[str]:
    """One generated sentence per method with a baseline: ahead, behind or within noise, and by how much."""
    lines = []
    for row in rows:
        if "ppl_ratio_vs_baseline" in row and "vs_baseline" not in row:
            base = next(r for r in rows if r["run"] == BASELINE[row["run"]])
            ratio = row["ppl_ratio_vs_baseline"]
            if abs(math.log(ratio)) < math.log(PPL_UNREAD):
                change = "leaves the WikiText-2 perplexity of {base} about where it was, from {b:.2f} to {r:.2f} (x{x:.3f}: "
                change += f"within x{PPL_UNREAD}, not read as a difference without a standard error)"
            else:
                change = ("lowers" if ratio < 1 else "raises") + " the WikiText-2 perplexity of {base} from {b:.2f} to {r:.2f} (x{x:.3f})"
            lines.append(f"- **{row['label']}** " + change.format(base=base["label"], b=base["wikitext2_ppl"], r=row["wikitext2_ppl"], x=ratio)
                         + "; no accuracy was measured in this run.")
            continue
        marks = [m for m in ("collapsed (WikiText-2 perplexity above 10x dense's)" if (row.get("protocol") or {}).get("collapsed") else "",
                             (row.get("protocol") or {}).get("drift", "")) if m]
        flags = "".join(f"; {m}" for m in marks)
        vs_dense = (row.get("protocol") or {}).get("vs_dense")
        if row["run"] not in BASELINE and vs_dense and vs_dense.get("verdict"):  # the baselines, against dense
            d, se = 100 * vs_dense["diff"], 100 * vs_dense["se"]
            verdict = {"ahead": "ahead of", "behind": "behind", "within noise": "within noise of"}[vs_dense["verdict"]]
            retained = ("" if vs_dense.get("low") is None else
                        f"; retains {vs_dense['retained_pct']:.1f} % [{vs_dense['low']:.1f}, {vs_dense['high']:.1f}] of dense's headline")
            lines.append(f"- **{row['label']}** is {verdict} dense on the headline: {d:+.2f} ± {se:.2f} points "
                         f"({'paired' if vs_dense.get('paired') else 'unpaired'}, |Δ| {'>' if vs_dense['significant'] else '<='} {Z} se)"
                         f"{retained}; WikiText-2 perplexity x{row['ppl_ratio_vs_dense']:.2f} dense's{flags}.")
            continue
        on_headline = "vs_baseline" in (row.get("protocol") or {})
        diff = row["protocol"]["vs_baseline"] if on_headline else row.get("vs_baseline")
        if not diff or diff["diff"] is None or diff["se"] is None:
            continue
        d, se = 100 * diff["diff"], 100 * diff["se"]
        verdict = ("within noise of" if not diff["significant"] else ("ahead of" if d > 0 else "behind"))
        base = next(r for r in rows if r["run"] == diff["against"])
        ppl = (f"WikiText-2 perplexity {row['wikitext2_ppl']:.2f} vs {base['wikitext2_ppl']:.2f} "
               f"(x{row['wikitext2_ppl'] / base['wikitext2_ppl']:.3f})")
        measure = "the headline" if on_headline else "the 7-task average"
        lines.append(f"- **{row['label']}** is {verdict} {base['label']} on {measure}: {d:+.2f} ± {se:.2f} points "
                     f"({'paired' if diff.get('paired') else 'unpaired'}, |Δ| {'>' if diff['significant'] else '<='} {Z} se); "
                     f"{ppl}{flags}.")
    return lines


def markdown(table: dict, folder: Path) -> str:
    rows = table["rows"]
    s = table["lm_eval_settings"]
    ppl = table["perplexity"]["wikitext2"]
    if table.get("protocol"):
        return protocol_markdown(table)
    if not any(r["tasks"][t]["value"] is not None for r in rows for t in TASKS):
        return perplexity_markdown(table)
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
    lines += [f"| {r['run']} | {layers_changed(r)} | {r['compensation']} |" for r in rows if r["run"] != "dense"]
    return "\n".join(lines) + "\n"


def perplexity_scope(table: dict) -> str:
    """Which part of the WikiText-2 test set the perplexity covers, in words."""
    ppl = table["perplexity"]["wikitext2"]
    scored = f"{ppl['tokens_scored']} tokens scored of {ppl['tokens_in_text']}"
    if table.get("perplexity_max_windows") is None:
        return (f"WikiText-2 test, the full test set: every non-overlapping {ppl['seq_len']}-token window "
                f"({ppl['windows']} windows, {scored})")
    return (f"WikiText-2 test, its first {ppl['windows']} non-overlapping {ppl['seq_len']}-token windows only "
            f"(eval.perplexity.max_windows={table['perplexity_max_windows']}; {scored}, "
            f"{100 * ppl['tokens_scored'] / ppl['tokens_in_text']:.1f} %), not the full test set")


def protocol_markdown(table: dict) -> str:
    """The table of the headline protocol (``docs/protocol.md``): headline ± se, paired Δ vs dense and vs the baseline
    with their verdicts, flags, perplexity and compress cost; then every task; then the generated reading."""
    rows, s, proto = table["rows"], table["lm_eval_settings"], table["protocol"]

    def num(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    def delta(d: dict | None) -> str:
        if not d or d.get("diff") is None:
            return "—"
        se = "—" if d.get("se") is None else f"{100 * d['se']:.2f}"
        return f"{100 * d['diff']:+.2f} ± {se}{'*' if d.get('significant') else ''}"

    first, *rest = proto["rule_lines"]
    lines = [
        "# 2025 methods on SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), 30 -> 22 layers: the headline protocol",
        "",
        f"- **Model**: {table['model'].get('name')}, `{table['model'].get('file')}`, {table['model'].get('quantization')}: the numbers "
        "of the **dequantised GGUF**, not of the full-precision model.",
        f"- **Device**: {table['device']}, {table['dtype']}; versions {json.dumps(table['versions'])}",
        f"- **Perplexity**: {perplexity_scope(table)}; no standard error (per-window losses are not recorded).",
        f"- **lm-eval**: {s.get('sampling')} of {num(s.get('limit'), '.0f')} documents per task (seed {s.get('seed')}, the same "
        "documents for every model), 0-shot; reported metric acc_norm for HellaSwag, ARC-c, OpenBookQA, acc otherwise.",
        f"- {first}",
        *[f"  {line}" for line in rest],
        f"- **Δ**: run − reference on the headline in points ± se, paired over the same documents; `*` and a verdict ahead / "
        f"behind only where |Δ| > {Z} se; retained: % of dense's headline [95 % interval]; flags: `collapsed` (WikiText-2 "
        "perplexity above 10x dense's), `drift` (answer distribution unlike dense's, docs/protocol.md).",
        "- **Compress**: wall time and peak host RSS of the compress stage (selection, estimation, compensation, fold), one "
        + ("run each on a CPU shared with other jobs: an upper bound of the method's own cost." if "cpu" in str(table["device"]).lower()
           else f"run each on {table['device']}; the capture pass it reads is shared by every run and not counted."),
        "",
        "| run | method | layers | wiki2 PPL | x dense | headline % | Δ vs dense | verdict | retained % | baseline | Δ vs baseline "
        "| verdict | flags | compress s | peak host MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row["protocol"]
        vs_dense, vs_base = p.get("vs_dense"), p.get("vs_baseline")
        retained = ("—" if not vs_dense or vs_dense.get("retained_pct") is None else
                    f"{vs_dense['retained_pct']:.1f} [{num(vs_dense.get('low'), '.1f')}, {num(vs_dense.get('high'), '.1f')}]")
        flags = ", ".join(f for f in ("collapsed" if p.get("collapsed") else "", p.get("drift", "")) if f) or "—"
        lines.append(f"| {row['run']} | {row['label']} | {row['layers']} | {row['wikitext2_ppl']:.2f} | "
                     f"{num(row.get('ppl_ratio_vs_dense'), '.2f')} | {pct(p['headline'])} ± {pct(p['headline_se'])} | "
                     f"{delta(vs_dense)} | {(vs_dense or {}).get('verdict') or '—'} | {retained} | "
                     f"{(vs_base or {}).get('against', '—')} | {delta(vs_base)} | {(vs_base or {}).get('verdict') or '—'} | {flags} | "
                     f"{num(row.get('compress_s'), '.1f')} | {num(row.get('compress_peak_host_mib'), '.0f')} |")
    tasks = proto["evaluated"]
    lines += ["", "## Every task (reported metric % ± se; the headline counts only the informative tasks above)", "",
              "| run | " + " | ".join(tasks) + " | 7-task avg (earlier measure) |", "|---|" + "---|" * (len(tasks) + 1)]
    for row in rows:
        cells = [f"{pct(row['all_tasks'][t]['value'])} ± {pct(row['all_tasks'][t]['se'])}" for t in tasks]
        lines.append(f"| {row['run']} | " + " | ".join(cells) + f" | {pct(row['average'])} ± {pct(row['average_se'])} |")
    lines += ["", "## Reading (generated from the numbers above)", "", *reading(rows), ""]
    lines += seeds_markdown(table.get("seeds") or [])
    lines += ["## Layers removed", "", "| run | removed (original indices) | compensation |", "|---|---|---|"]
    lines += [f"| {r['run']} | {layers_changed(r)} | {r['compensation']} |" for r in rows if r["run"] != "dense"]
    return "\n".join(lines) + "\n"


def layers_changed(row: dict) -> str:
    """The original layers a run took away: removed ones, or a block replaced (ReplaceMe: by a map folded into the layer before)."""
    if row["removed"]:
        return str(row["removed"])
    blocks = [b for b in row["merged"] or []]
    return "; ".join(f"{b[1:]} replaced by a linear map folded into layer {b[0]}" for b in blocks) or "—"


def perplexity_markdown(table: dict) -> str:
    """The table when the runs measured perplexity only (no lm-eval tasks)."""
    rows, ppl = table["rows"], table["perplexity"]["wikitext2"]

    def num(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    lines = [
        "# 2025 methods on SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), 30 -> 22 layers: perplexity",
        "",
        f"- **Model**: {table['model'].get('name')}, `{table['model'].get('file')}`, {table['model'].get('quantization')}: the numbers "
        "of the **dequantised GGUF**, not of the full-precision model.",
        f"- **Device**: {table['device']}, {table['dtype']}; versions {json.dumps(table['versions'])}",
        f"- **Perplexity**: WikiText-2 test, the first {ppl['windows']} non-overlapping {ppl['seq_len']}-token windows "
        f"({ppl['tokens_scored']} tokens scored of {ppl['tokens_in_text']}); no lm-eval tasks in this run. Perplexity carries no "
        "standard error here (per-window losses are not recorded): a ratio to the baseline within "
        f"x{PPL_UNREAD} is not read as a difference.",
        "- **Compress**: wall time and peak host RSS of the compress stage (selection, estimation, compensation, fold); one "
        "run each on a CPU shared with other jobs, so the seconds are an upper bound of the method's own cost. ShortGPT and "
        "Gromov only read the capture statistics (one pass shared by every run, not counted here).",
        "",
        "| run | method | layers | wiki2 PPL | x dense | baseline | x baseline | compress s | peak host MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = BASELINE.get(row["run"])
        lines.append(f"| {row['run']} | {row['label']} | {row['layers']} | {row['wikitext2_ppl']:.2f} | "
                     f"{num(row.get('ppl_ratio_vs_dense'), '.2f')} | {base or '—'} | {num(row.get('ppl_ratio_vs_baseline'), '.3f')} | "
                     f"{num(row.get('compress_s'), '.1f')} | {num(row.get('compress_peak_host_mib'), '.0f')} |")
    lines += ["", "## Reading (generated from the numbers above)", "", *reading(rows), ""]
    lines += ["## Layers removed", "", "| run | removed (original indices) | compensation |", "|---|---|---|"]
    lines += [f"| {r['run']} | {layers_changed(r)} | {r['compensation']} |" for r in rows if r["run"] != "dense"]
    return "\n".join(lines) + "\n"


MARKER = "methods_2025_table"


def markers(marker: str = MARKER) -> tuple[str, str]:
    """The lines around a generated section of the docs file."""
    return f"<!-- {marker}:begin (generated by scripts/methods_2025_table.py) -->", f"<!-- {marker}:end -->"


BEGIN, END = markers()


def parity_markdown(parity_dir: Path) -> str:
    """One line per ``python -m parity.methods_2025`` result: verdict, setting, every gated comparison, both sides' cost."""
    lines = ["| run | verdict | model, calibration | gated comparisons (max abs diff) | released s / MiB | layerfold s / MiB |",
             "|---|---|---|---|---|---|"]
    for file in sorted(parity_dir.glob("*.json")):
        rec = json.loads(file.read_text())
        if not str(rec.get("benchmark", "")).startswith("parity_2025/"):
            continue
        s = rec["settings"]
        gated = ", ".join(f"{c['name']} {'ok' if c['passed'] else 'FAIL'}"
                          + ("" if c.get("max_abs_diff") is None else f" ({c['max_abs_diff']:.2g})")
                          for c in rec["comparisons"] if c.get("gate", True))
        sides = {r["side"]: f"{r['seconds']:.1f} / {r['peak_host_mib']:.0f}" for r in rec["rows"]}
        lines.append(f"| {file.stem} | {'PASS' if rec['passed'] else 'FAIL'} | {s['checkpoint']}, {s['dtype']}, {s['blocks']} x "
                     f"{s['seq_len']} tokens, {s['num_remove']} removed | {gated} | {sides.get('released', '—')} | "
                     f"{sides.get('layerfold', '—')} |")
    return "\n".join(lines) + "\n"


def cost_markdown(bench_dir: Path) -> str:
    """ReplaceMe's estimation cost, one line per timed setting of every ``replaceme_cost_*.json``."""
    lines = ["| result | device | setting | seconds (min-max) | tokens/s | host MiB added | peak host MiB | normal equations MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for file in sorted(bench_dir.glob("replaceme_cost_*.json")):
        rec = json.loads(file.read_text())
        env = rec["environment"]
        for row in rec["rows"]:
            tps = row.get("tokens_per_s")
            lines.append(f"| {file.name} | {env['device']}, torch {env['torch']} | {row['name']} | {row['seconds']:.1f} "
                         f"({row['seconds_min']:.1f}-{row['seconds_max']:.1f}) | {'—' if tps is None else tps} | "
                         f"{row.get('host_mib_added', '—')} | {row.get('peak_host_mib', '—')} | {row.get('equations_mib', '—')} |")
    return "\n".join(lines) + "\n"


def docs_section(table: dict, parity_dir: Path | None, bench_dir: Path | None, marker: str = MARKER) -> str:
    """A generated part of docs/methods_2025.md: the table (headings two levels down), then parity and cost unless
    their folders are None."""
    begin, end = markers(marker)
    body = "".join(f"##{line}\n" if line.startswith("#") else f"{line}\n" for line in markdown(table, Path(".")).splitlines())
    if parity_dir is None or bench_dir is None:
        return f"{begin}\n{body}{end}"
    return (f"{begin}\n{body}\n#### Parity with the released code ({parity_dir.as_posix()})\n\n{parity_markdown(parity_dir)}\n"
            f"#### ReplaceMe estimation cost ({bench_dir.as_posix()}/replaceme_cost_*.json)\n\n{cost_markdown(bench_dir)}{end}")


def replace_docs_section(text: str, section: str, marker: str = MARKER) -> str:
    begin, end = markers(marker)
    if begin not in text or end not in text:
        raise SystemExit(f"the docs file has no generated section: add the two lines\n{begin}\n{end}\nwhere it belongs")
    return text[:text.index(begin)] + section + text[text.index(end) + len(end):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--docs", type=Path, help="also rewrite the generated section of this markdown file")
    parser.add_argument("--parity-dir", type=Path, default=Path("results/parity"))
    parser.add_argument("--bench-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--marker", default=MARKER, help="the name of the docs file's generated section to rewrite")
    parser.add_argument("--table-only", action="store_true", help="the docs section holds the table alone (no parity, no cost)")
    args = parser.parse_args()
    table = from_folder(args.folder)
    write_json(args.folder / "table.json", table)
    with atomic_file(args.folder / "table.md") as handle:
        handle.write(markdown(table, args.folder))
    print((args.folder / "table.md").read_text())
    if args.docs:
        extras = (None, None) if args.table_only else (args.parity_dir, args.bench_dir)
        text = replace_docs_section(args.docs.read_text(encoding="utf-8"), docs_section(table, *extras, marker=args.marker),
                                    args.marker)
        with atomic_file(args.docs) as handle:
            handle.write(text)


if __name__ == "__main__":
    from layerfold.io import install_error_hook

    install_error_hook("methods_2025_table")  # layerfold's errors (a bad override, a missing file) as one line; --debug: the traceback
    main()
