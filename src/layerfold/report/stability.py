"""Calibration stability: does a training-free method choose the same layers on another calibration draw?

A training-free method reads a few calibration windows and decides which layers to remove or merge.
Run it on ``K`` independent draws (same source, size and window length; ``data.calibration.seed``
picks the windows) and compare what it did:

- **Chosen layers** of a plan (``plan.json``: for every new layer, the original layers it stands
  for): every original layer that no longer exists on its own, i.e. the removed layers and every
  member of a merged group, the layer whose norms the merge kept included. A merge of ``{20, 21}``
  chooses both 20 and 21: neither survives unchanged. Removal methods choose exactly the layers they
  remove; a method of ``m`` disjoint two-layer merges chooses ``2m`` layers.
- **Agreement**: the Jaccard index ``|A & B| / |A | B|`` of two draws' chosen sets, averaged over all
  ``K (K - 1) / 2`` pairs of draws, beside its chance level (the expected Jaccard of two uniformly
  random sets of the same sizes out of the same layers: methods that choose more layers agree more
  by chance); the layers chosen in at least half the draws; how many distinct chosen sets occurred.
- **Loss spread**: the compressed model's mean next-token NLL on its own draw, the same minus the
  dense model's on that draw (the draws differ in difficulty), on one held-out set common to every
  draw, and the WikiText-2 perplexity; each as mean, sample standard deviation, min and max.

The first part of this module is pure (plans and numbers in, numbers and Markdown out). The second,
:class:`StabilityRunner`, runs the pipeline's stages for every (method, draw) under one working
folder, never in the DVC workspace; the stage entry points are handed in by the caller
(``scripts/calibration_stability.py``), so imports still flow from ``pipeline`` to the library.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from layerfold.config import ConfigError
from layerfold.io import atomic_file, file_sha256, read_json, write_json
from layerfold.report.markdown import markdown_table, ranges
from layerfold.report.tables import MISSING

# ------------------------------------------------------------------------------------------------
# pure: what a plan chose, how draws agree, how losses spread


def plan_groups(plan: Mapping[str, Any]) -> list[list[int]]:
    """The original layers behind every layer of the compressed model, in order (``plan.json``'s ``stands_for``)."""
    try:
        total = int(plan["original_layers"])
        groups = [sorted(int(i) for i in layer["stands_for"]) for layer in plan["layers"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not a plan.json: needs original_layers and layers[].stands_for ({err!r})") from None
    seen = [i for g in groups for i in g]
    if any(not g for g in groups) or len(seen) != len(set(seen)) or not all(0 <= i < total for i in seen):
        raise ValueError(f"plan.json: every new layer must stand for distinct original layers in 0..{total - 1}; got {groups}")
    return groups


def chosen_layers(plan: Mapping[str, Any]) -> list[int]:
    """Original layers the plan removed or merged: every layer that does not survive alone and unchanged."""
    groups = plan_groups(plan)
    alone = {g[0] for g in groups if len(g) == 1}
    return [i for i in range(int(plan["original_layers"])) if i not in alone]


def merged_layers(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every merged layer of a plan: the original layers it stands for and, where the plan records them, the
    weight of each in its linear weights (``coefficients``: MKA's ``alpha`` and LaCo's RDSC show here)."""
    plan_groups(plan)  # the same checks
    merged = []
    for layer in plan["layers"]:
        if len(layer["stands_for"]) > 1:
            coefficients = layer.get("coefficients")
            merged.append({"stands_for": [int(i) for i in layer["stands_for"]],
                           "coefficients": None if coefficients is None else [round(float(c), 6) for c in coefficients]})
    return merged


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """``|A & B| / |A | B|``; two empty sets agree completely (1.0)."""
    a, b = set(a), set(b)
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def pairwise_jaccard(sets: Sequence[Iterable[int]]) -> list[float]:
    """Jaccard of every unordered pair of draws, in ``itertools.combinations`` order."""
    return [jaccard(a, b) for a, b in itertools.combinations([set(s) for s in sets], 2)]


def mean_pairwise_jaccard(sets: Sequence[Iterable[int]]) -> float | None:
    """Mean Jaccard over all pairs of draws; None with fewer than two draws (no pair to compare)."""
    values = pairwise_jaccard(sets)
    return sum(values) / len(values) if values else None


def chance_jaccard(num_layers: int, size_a: int, size_b: int) -> float:
    """Expected Jaccard of two independent, uniformly random sets of ``size_a`` and ``size_b`` out of ``num_layers``.

    The overlap ``k`` is hypergeometric: ``P(k) = C(a, k) C(n - a, b - k) / C(n, b)``, and the Jaccard is ``k / (a + b - k)``.
    """
    n, a, b = num_layers, size_a, size_b
    if not (0 <= a <= n and 0 <= b <= n):
        raise ValueError(f"set sizes {a} and {b} must lie in 0..{n} (the number of layers)")
    if a == 0 and b == 0:
        return 1.0
    total = math.comb(n, b)
    return sum(math.comb(a, k) * math.comb(n - a, b - k) / total * k / (a + b - k) for k in range(max(0, a + b - n), min(a, b) + 1))


def mean_chance_jaccard(num_layers: int, sets: Sequence[Iterable[int]]) -> float | None:
    """:func:`chance_jaccard` averaged over the same pairs of draws as :func:`mean_pairwise_jaccard`."""
    sizes = [len(set(s)) for s in sets]
    values = [chance_jaccard(num_layers, a, b) for a, b in itertools.combinations(sizes, 2)]
    return sum(values) / len(values) if values else None


def layer_counts(sets: Sequence[Iterable[int]]) -> dict[int, int]:
    """In how many draws each layer was chosen (layers never chosen are absent), by layer."""
    counts = Counter(i for s in sets for i in set(s))
    return dict(sorted(counts.items()))


def majority_layers(sets: Sequence[Iterable[int]]) -> list[int]:
    """Layers chosen in at least half the draws (``2 * count >= K``)."""
    k = len(sets)
    return [i for i, c in layer_counts(sets).items() if 2 * c >= k] if k else []


def spread(values: Iterable[float | None]) -> dict[str, Any] | None:
    """``{n, mean, sd, min, max}`` of the values given (None entries skipped); ``sd`` is the sample
    standard deviation (n - 1), None for a single value; None when there is no value at all."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"n": len(xs), "mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs), "max": max(xs)}


def summarise(draws: Sequence[Mapping[str, Any]], num_layers: int) -> dict[str, Any]:
    """The stability summary of one method from its draws' records (:meth:`StabilityRunner.run_draw` writes them).

    Each record has ``seed``, ``groups`` (the plan's), ``loss`` and ``dense_loss`` (on its own draw),
    ``held_out_loss`` and ``perplexity`` (``{dataset: value}``).
    """
    draws = sorted(draws, key=lambda d: d["seed"])
    sets = [chosen_layers({"original_layers": num_layers, "layers": [{"stands_for": g} for g in d["groups"]]}) for d in draws]
    datasets = sorted({name for d in draws for name in (d.get("perplexity") or {})})
    return {
        "draws": len(draws),
        "seeds": [d["seed"] for d in draws],
        "layers_after": sorted({len(d["groups"]) for d in draws}),
        "chosen_sizes": sorted({len(s) for s in sets}),
        "mean_jaccard": mean_pairwise_jaccard(sets),
        "chance_jaccard": mean_chance_jaccard(num_layers, sets),
        "pairwise_jaccard": pairwise_jaccard(sets),
        "distinct_sets": len({tuple(s) for s in sets}),
        "distinct_plans": len({json.dumps(d["groups"]) for d in draws}),
        "majority_layers": majority_layers(sets),
        "layer_counts": {str(i): c for i, c in layer_counts(sets).items()},
        "loss": spread(d["loss"] for d in draws),
        "loss_minus_dense": spread(None if d["loss"] is None else d["loss"] - d["dense_loss"] for d in draws),
        "held_out_loss": spread(d.get("held_out_loss") for d in draws),
        "perplexity": {name: spread((d.get("perplexity") or {}).get(name) for d in draws) for name in datasets},
    }


def format_spread(s: Mapping[str, Any] | None, spec: str = ".3f", sd_spec: str | None = None, of: int | None = None) -> str:
    """``mean ± sd [min, max]``; ``mean`` alone for one draw; "—" for none. With ``of`` (the method's draws), a spread
    over fewer draws than that (draws whose plan was made but not measured) says over how many."""
    if not s:
        return MISSING
    sd_spec = sd_spec or spec
    fewer = of is not None and s["n"] < of
    if s["sd"] is None:
        return f"{s['mean']:{spec}} (1 {'of ' + str(of) + ' draws' if fewer else 'draw'})"
    text = f"{s['mean']:{spec}} ± {s['sd']:{sd_spec}} [{s['min']:{spec}}, {s['max']:{spec}}]"
    return f"{text} ({s['n']} of {of} draws)" if fewer else text


def _ppl_spec(s: Mapping[str, Any] | None) -> str:
    return ".3g" if s and s["mean"] >= 1e4 else ".2f"


def stability_table(rows: Sequence[Mapping[str, Any]], held_out: str = "held-out", perplexity: str = "wikitext2") -> str:
    """One Markdown row per method: ``rows`` are ``{"name", "summary", "note"?}`` (``summary`` from :func:`summarise`)."""
    header = ["method", "K", "layers", "mean Jaccard (chance)", "distinct sets", "chosen in ≥ half the draws",
              "loss on own draw", "Δ loss vs dense, same draw", f"loss on {held_out}", f"{perplexity} ppl"]
    body = []
    for row in rows:
        s = row["summary"]
        mean, chance = s["mean_jaccard"], s["chance_jaccard"]
        agreement = MISSING if mean is None else f"{mean:.2f} ({chance:.2f})"
        ppl = (s.get("perplexity") or {}).get(perplexity)
        name = row["name"] + (f" ({row['note']})" if row.get("note") else "")
        body.append([
            name, str(s["draws"]), "/".join(map(str, s["layers_after"])), agreement, f"{s['distinct_sets']} of {s['draws']}",
            ranges(s["majority_layers"]), format_spread(s["loss"], of=s["draws"]), format_spread(s["loss_minus_dense"], of=s["draws"]),
            format_spread(s["held_out_loss"], of=s["draws"]), format_spread(ppl, _ppl_spec(ppl), of=s["draws"]),
        ])
    return "\n".join(markdown_table(header, body)) + "\n"


def method_result(name: str, overrides: Sequence[str], records: Sequence[Mapping[str, Any]], planned: int) -> dict[str, Any]:
    """What is stored per method: its summary and, per draw, the plan's groups, chosen layers and numbers."""
    num_layers = {int(r["original_layers"]) for r in records}
    if len(num_layers) != 1:
        raise ValueError(f"{name}: the draws' plans start from different depths {sorted(num_layers)}; they are not one model")
    keep = ("seed", "groups", "chosen", "merges", "loss", "dense_loss", "held_out_loss", "dense_held_out_loss", "perplexity",
            "dense_perplexity", "compress_seconds", "measure_seconds")
    return {
        "name": name, "overrides": list(overrides), "draws_planned": planned, "original_layers": num_layers.pop(),
        "summary": summarise(records, int(records[0]["original_layers"])),
        "per_draw": [{k: r.get(k) for k in keep} for r in sorted(records, key=lambda r: r["seed"])],
    }


def notes(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Statements read off the results: methods run on fewer draws than planned, plans identical in every draw."""
    lines = []
    fewer = [f"{r['name']} ({r['summary']['draws']} of {r['draws_planned']})" for r in results if r["summary"]["draws"] < r["draws_planned"]]
    if fewer:
        lines.append(f"Fewer draws than planned: {', '.join(fewer)}.")
    same = [r["name"] for r in results if r["summary"]["draws"] > 1 and r["summary"]["distinct_plans"] == 1]
    if same:
        lines.append(f"The same plan (every new layer standing for the same original layers) in every draw: {', '.join(same)}.")
    unmeasured = [f"{r['name']} (draws {', '.join(str(d['seed']) for d in r['per_draw'] if d.get('loss') is None)})"
                  for r in results if any(d.get("loss") is None for d in r["per_draw"])]
    if unmeasured:
        lines.append(f"Plan only, losses and perplexity not measured (`--plans-only`): {', '.join(unmeasured)}; "
                     "their chosen layers count in the agreement columns, the loss columns say over how many draws they are.")
    moved = [text for r in results if (text := coefficient_ranges(r["per_draw"]))]
    if moved:
        lines.append("Merge coefficients of the same group across draws (each coefficient's min–max): " + "; ".join(
            f"{r['name']} {text}" for r, text in ((r, coefficient_ranges(r["per_draw"])) for r in results) if text) + ".")
    depths = [f"{r['name']} ({'/'.join(map(str, r['summary']['layers_after']))})" for r in results if len(r["summary"]["layers_after"]) > 1]
    if depths:
        lines.append(f"Depth after compression differs between draws: {', '.join(depths)}.")
    return lines


def coefficient_ranges(per_draw: Sequence[Mapping[str, Any]]) -> str:
    """Every merged group that occurs with coefficients in at least two draws: each coefficient's min–max over them
    (a merge's weights move with the draw even when its layers do not); "" when there is none."""
    by_group: dict[tuple[int, ...], list[list[float]]] = {}
    for draw in per_draw:
        for merge in draw.get("merges") or []:
            if merge.get("coefficients") is not None:
                by_group.setdefault(tuple(merge["stands_for"]), []).append(merge["coefficients"])
    parts = []
    for group, values in sorted(by_group.items()):
        if len(values) > 1:
            spans = ", ".join(f"{min(c):.3g}–{max(c):.3g}" for c in zip(*values))
            parts.append(f"[{ranges(list(group))}]: {spans} ({len(values)} draws)")
    return "; ".join(parts)


def run_context(params: Mapping[str, Any], held_out_params: Mapping[str, Any], source: Mapping[str, Any],
                records: Sequence[Mapping[str, Any]], seeds: Sequence[int], common: Sequence[str], held_out: Sequence[str],
                date: str | None = None) -> dict[str, Any]:
    """The settings every method's results share (stored with each and printed above the table)."""
    measured = [r for r in records if r.get("measure")] or list(records)  # plan-only draws measured nothing
    first = min(measured, key=lambda r: r["seed"])
    dense = {r["seed"]: r["dense_loss"] for r in measured}
    return {
        "model": params["model"]["name"], "quantization": source.get("quantization"), "seeds": list(seeds),
        "calibration": params["data"]["calibration"], "held_out": held_out_params["data"]["calibration"],
        "held_out_overrides": list(held_out), "common_overrides": list(common), "perplexity": params["eval"]["perplexity"],
        "dense_perplexity": first["dense_perplexity"], "dense_loss": spread(dense.values()),
        "dense_held_out_loss": first["dense_held_out_loss"],
        "device": "; ".join(sorted({r["device"] for r in records})), "dtype": "; ".join(sorted({r["measure"]["dtype"] for r in measured if r.get("measure")})) or "not measured",
        "date": date or datetime.date.today().isoformat(),
    }


def _ppl_text(values: Mapping[str, float] | None) -> str:
    if not values:
        return "not measured"
    return ", ".join(f"{name} {value:.2f}" for name, value in values.items())


def report_markdown(results: Sequence[Mapping[str, Any]], context: Mapping[str, Any], title: bool = True) -> str:
    """``table.md``: the settings, the table and the notes, all from the stored numbers (``title=False``: without the heading)."""
    cal, held = context["calibration"], context["held_out"]
    ppl = context["perplexity"]
    lines = [
        *([f"# Calibration stability: {context['model']}", ""] if title else []),
        f"- Model: {context['model']}; weights: {context['quantization']}."
        + (" Dequantised weights are not the full-precision model: these numbers describe the dequantised one."
           if "dequantised" in str(context["quantization"]) else ""),
        f"- Draws: `data.calibration.seed` = {', '.join(map(str, context['seeds']))} "
        f"({cal['num_blocks']} windows x {cal['seq_len']} tokens of `{cal['source']}`, chunking `{cal['chunking']}`, "
        f"BOS {'on' if cal['add_bos'] else 'off'}); every other setting as each method's run-list entry.",
        "- Chosen layers: removed or merged original layers (every member of a merged group). "
        "Mean Jaccard over all pairs of draws; chance = expected Jaccard of uniformly random sets of the same sizes.",
        f"- Loss: mean next-token NLL (nats) of the compressed checkpoint; on its own draw, minus the dense model's on "
        f"the same draw, and on the held-out set ({held['num_blocks']} windows x {held['seq_len']} tokens of `{held['source']}`, "
        f"chunking `{held['chunking']}`, seed {held['seed']}: no draw reads it). Spreads are mean ± sd [min, max] over draws.",
        f"- Perplexity: WikiText-2 test, {ppl['seq_len']}-token windows, at most {ppl['max_windows']} windows, BOS "
        f"{'on' if ppl['add_bos'] else 'off'} (`eval.perplexity`); dense: {_ppl_text(context['dense_perplexity'])}.",
        f"- Dense loss on the draws: {format_spread(context['dense_loss'])}; on the held-out set: "
        f"{'not measured' if context['dense_held_out_loss'] is None else format(context['dense_held_out_loss'], '.4f')}.",
        f"- Device: {context['device']}, {context['dtype']}; measured {context['date']}.",
        "",
        stability_table([{"name": r["name"], "summary": r["summary"]} for r in results], held_out=held["source"]).rstrip("\n"),
    ]
    extra = notes(results)
    if extra:
        lines += ["", *(f"- {line}" for line in extra)]
    lines += ["", "Wall time per draw (seconds; compress = the compress stage, measure = losses and perplexity of the compressed "
              "checkpoint, the held-out part once per distinct checkpoint):", "", *cost_table(results)]
    return "\n".join(lines) + "\n"


def cost_table(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: per method, the compress and measure wall times over its draws."""
    rows = []
    for r in results:
        draws = r["per_draw"]
        rows.append([r["name"], str(len(draws)), format_spread(spread(d.get("compress_seconds") for d in draws), ".0f", of=len(draws)),
                     format_spread(spread(d.get("measure_seconds") for d in draws), ".0f", of=len(draws))])
    return markdown_table(["method", "K", "compress s", "measure s"], rows)


DOC_BEGIN = "<!-- calibration-stability table: generated by scripts/calibration_stability.py --doc -->"
DOC_END = "<!-- end of the generated table -->"


def replace_generated(text: str, block: str, begin: str = DOC_BEGIN, end: str = DOC_END) -> str:
    """``text`` with everything between the ``begin`` and ``end`` marker lines replaced by ``block``."""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"the document needs one line {begin!r} followed by one line {end!r}; add them where the table goes")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block.strip()}\n{end}{tail}"


def write_results(out: str | Path, results: Sequence[Mapping[str, Any]], context: Mapping[str, Any]) -> None:
    """``<out>/<method>.json`` per method (with ``context``) and ``<out>/table.md``."""
    out = Path(out)
    for result in results:
        write_json(out / f"{result['name']}.json", {**result, "context": dict(context)})
    with atomic_file(out / "table.md") as handle:
        handle.write(report_markdown(results, context))


# ------------------------------------------------------------------------------------------------
# running: every (method, draw) through the pipeline's stages, under one working folder


@dataclass(frozen=True)
class MethodEntry:
    """A method as the runner takes it: a name (its result files) and the Hydra overrides that select it."""

    name: str
    overrides: tuple[str, ...]


def parse_entry(text: str) -> MethodEntry:
    """``"name:override,override"`` -> :class:`MethodEntry` (e.g. ``"sleb-r4:method=sleb,method.num_remove=4"``)."""
    name, sep, rest = text.partition(":")
    overrides = tuple(o.strip() for o in rest.split(",") if o.strip())
    if not sep or not name or not overrides:
        raise ConfigError(f"--entry {text!r}: write NAME:OVERRIDE[,OVERRIDE...], e.g. 'sleb-r4:method=sleb,method.num_remove=4'.")
    return MethodEntry(name, overrides)


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# The text files of the data stage's evaluation folder, per ``eval.perplexity.datasets`` name (as the evaluate stage reads them).
PERPLEXITY_TEXT = {"wikitext2": "wikitext2_test.txt", "c4": "c4.txt"}

# The sections a draw's calibration blocks and dense statistics depend on: entries that agree on them share the draw.
DRAW_SECTIONS = ("model", "data", "capture", "hardware", "runtime")


def draw_key(params: Mapping[str, Any]) -> str:
    """Which draw folder a run reads: a digest of what the data and capture stages read (the benchmarks aside)."""
    sections = {k: params.get(k) for k in DRAW_SECTIONS}
    sections["data"] = {k: v for k, v in (sections["data"] or {}).items() if k != "benchmarks"}
    return _digest(sections)


@dataclass
class Stages:
    """The pipeline's stage entry points, run with the working directory set to a folder of the runner's."""

    base: Callable[[], None]
    data: Callable[[], None]
    capture: Callable[[], None]
    compress: Callable[[], None]


@dataclass
class StabilityRunner:
    """Each method on each calibration draw, through the pipeline's own ``base``/``data``/``capture``/``compress``
    stages, every stage in a folder of ``work`` laid out like a DVC workspace (links to the shared outputs).

    Done once: the base checkpoint (per model), each draw's blocks and dense statistics (per draw, shared by
    every method), the dense model's losses and perplexity, the held-out loss and perplexity of every
    distinct compressed model (``measures/``, by the weights' digest). Per (method, draw): compress, then
    :func:`measure` on the compressed checkpoint, which is deleted afterwards (its ``plan.json`` stays).
    A (method, draw) whose ``result.json`` exists is skipped, so a killed run continues where it stopped.
    """

    work: Path
    stages: Stages
    compose: Callable[[list[str]], dict]  # overrides -> composed, validated params
    common: tuple[str, ...] = ()
    held_out: tuple[str, ...] = ()  # overrides turning a draw's calibration into the held-out set
    progress: Callable[[str], None] = field(default=lambda message: None)
    # False: compress and keep the plan, measure nothing (the chosen layers for the agreement at the cost of the
    # compress stage alone); a later run with True measures those draws again from a fresh compress.
    measure_draws: bool = True

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        self._windows: dict = {}  # perplexity windows per text, tokenized once

    def params(self, entry: MethodEntry, seed: int) -> dict:
        return self.compose([*self.common, *entry.overrides, f"data.calibration.seed={seed}"])

    # --- shared outputs --------------------------------------------------------------------------
    def base(self, params: Mapping[str, Any]) -> Path:
        """The base checkpoint of ``params.model`` (built on first use)."""
        folder = self.work / "base" / _digest(params["model"])
        checkpoint = folder / "artifacts" / "base"
        with _locked(folder):
            if not (checkpoint / "config.json").exists():
                self.progress(f"base checkpoint of {params['model'].get('name')}")
                self._in(folder, params, self.stages.base)
        return checkpoint

    def draw(self, params: Mapping[str, Any], with_capture: bool = True) -> Path:
        """A draw's folder: ``data/prepared/{calibration,eval}`` and (``with_capture``) ``artifacts/capture``."""
        folder = self.work / "draws" / draw_key(params)
        base = self.base(params)
        draw_params = {**params, "data": {**params["data"], "benchmarks": []}}  # no benchmark files: nothing is evaluated here
        with _locked(folder):
            if not (folder / "data" / "prepared" / "calibration" / "blocks.safetensors").exists():
                self.progress(f"calibration draw {params['data']['calibration']}")
                self._link(folder / "artifacts" / "base", base)
                self._in(folder, draw_params, self.stages.data)
            if with_capture and not (folder / "artifacts" / "capture" / "stats.safetensors").exists():
                self.progress(f"dense statistics of draw {params['data']['calibration']['seed']}")
                self._in(folder, draw_params, self.stages.capture)
        return folder

    def dense(self, params: Mapping[str, Any], held_out: Path) -> dict:
        """The dense model's loss on the draw of ``params``, on the held-out set and its perplexity (measured once)."""
        draw = self.draw(params)
        path = draw / f"dense-{_digest([held_out.name, params['eval']['perplexity']])}.json"  # per held-out set and perplexity settings
        with _locked(path):
            if not path.exists():
                self.progress(f"dense losses of draw {params['data']['calibration']['seed']}")
                write_json(path, measure(self.base(params), draw, held_out, params, self._windows, self.work / "measures"))
        return read_json(path)

    def held_out_draw(self, entry: MethodEntry) -> Path:
        """The held-out blocks: ``entry``'s settings with the :attr:`held_out` overrides (no statistics needed)."""
        return self.draw(self.compose([*self.common, *entry.overrides, *self.held_out]), with_capture=False)

    # --- one method on one draw ------------------------------------------------------------------
    def run_draw(self, entry: MethodEntry, seed: int) -> dict:
        """Compress with ``entry`` on draw ``seed`` and measure; returns (and stores) the draw's record."""
        params = self.params(entry, seed)
        folder = self.work / "runs" / entry.name / f"seed-{seed}"
        with _locked(folder):
            return self._run_draw(entry, seed, params, folder)

    def _run_draw(self, entry: MethodEntry, seed: int, params: dict, folder: Path) -> dict:
        result = folder / "result.json"
        if result.exists():
            record = read_json(result)
            record.setdefault("merges", merged_layers(read_json(folder / "plan.json")))  # records written before merges were kept
            if record["params_digest"] != _digest(params):
                raise ConfigError(
                    f"{result} was made with other settings than {entry.name} composes now ({list(entry.overrides)}, "
                    f"data.calibration.seed={seed}). Delete {folder} to recompute it, or use another --out."
                )
            if record.get("loss") is not None or not self.measure_draws:
                return record
            result.unlink()  # a plan-only draw, now to be measured: compressed again (the checkpoint was not kept)
        draw = self.draw(params)
        base = self.base(params)
        for link, target in ((folder / "artifacts" / "base", base),
                             (folder / "artifacts" / "capture", draw / "artifacts" / "capture"),
                             (folder / "data" / "prepared" / "calibration", draw / "data" / "prepared" / "calibration")):
            self._link(link, target)
        self.progress(f"{entry.name} on draw {seed}: compress")
        compressed = folder / "artifacts" / "compressed"
        self._in(folder, params, self.stages.compress)
        plan = read_json(compressed / "plan.json")
        write_json(folder / "plan.json", plan)
        timing = read_json(folder / "metrics" / "compress_time.json")
        if self.measure_draws:
            held_out = self.held_out_draw(entry)
            dense = self.dense(params, held_out)
            self.progress(f"{entry.name} on draw {seed}: measure")
            began = time.perf_counter()
            measured = measure(compressed, draw, held_out, params, self._windows, self.work / "measures")
            measure_seconds = round(time.perf_counter() - began, 3)
        else:
            dense = {"loss": None, "held_out_loss": None, "perplexity": None}
            measured = {"loss": None, "held_out_loss": None, "perplexity": None, "settings": None}
            measure_seconds = None
        record = {
            "entry": entry.name, "overrides": list(entry.overrides), "seed": seed, "params_digest": _digest(params),
            "original_layers": plan["original_layers"], "groups": plan_groups(plan), "chosen": chosen_layers(plan),
            "removed": plan.get("removed"), "merges": merged_layers(plan),
            "loss": measured["loss"], "dense_loss": dense["loss"], "held_out_loss": measured["held_out_loss"],
            "dense_held_out_loss": dense["held_out_loss"], "perplexity": measured["perplexity"],
            "dense_perplexity": dense["perplexity"], "compress_seconds": timing["seconds"], "measure_seconds": measure_seconds, "device": timing["device"],
            "measure": measured["settings"],
        }
        shutil.rmtree(compressed)  # the checkpoint is large and the plan says what it was
        write_json(result, record)
        return record

    # --- helpers -----------------------------------------------------------------------------------
    def _in(self, folder: Path, params: Mapping[str, Any], stage: Callable[[], None]) -> None:
        """Run ``stage`` with ``folder`` as the working directory and ``params`` as its ``params.yaml``."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))
        with contextlib.chdir(folder):
            stage()

    @staticmethod
    def _link(link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() == target.resolve():
                return
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        os.symlink(target, link, target_is_directory=True)


def checkpoint_digest(checkpoint: Path) -> str:
    """sha256 over a checkpoint's config and weight files: two draws that wrote the same model get the same digest."""
    digest = hashlib.sha256()
    for path in sorted([checkpoint / "config.json", *checkpoint.glob("*.safetensors")]):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (created beside it): two runs over one working folder make each
    shared output once, the second waits and then finds it made."""
    import fcntl

    lock = path.parent / f"{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measure(checkpoint: Path, draw: Path, held_out: Path, params: Mapping[str, Any], windows: dict | None = None,
            cache: Path | None = None) -> dict:
    """Mean next-token NLL of ``checkpoint`` on the draw's calibration blocks and on the held-out blocks, and
    its perplexity at ``params.eval.perplexity`` (the draw's own copy of the evaluation text), as the
    pipeline runs them (``params.runtime``, ``params.hardware``; ``capture.batch_size`` for the losses).

    The perplexity is :func:`layerfold.evaluation.perplexity_layerwise.perplexity`'s: the same windows
    (:func:`~layerfold.evaluation.perplexity.perplexity_windows`) scored by the same
    :func:`~layerfold.execution.token_nll`; ``windows`` (a dict kept by the caller) keeps each text's windows,
    so a text is tokenized once for every model measured rather than once per model. What does not depend
    on the draw (held-out loss, perplexity) is kept in ``cache`` under the checkpoint's digest and the
    settings: a method that writes the same model on several draws is scored on them once.
    """
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from layerfold import execution
    from layerfold.evaluation.perplexity import perplexity_result, perplexity_windows
    from layerfold.models import load_checkpoint
    from layerfold.models.sources import resolve_device, resolve_dtype

    seed = params["runtime"]["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    hardware = OmegaConf.create(params["hardware"])
    device = resolve_device(params["runtime"]["device"])
    dtype = resolve_dtype(params["runtime"]["dtype"], device)
    cfg = params["eval"]["perplexity"]
    settings = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "perplexity": dict(cfg)}
    if hardware.mode == "resident":
        source, tokenizer = load_checkpoint(checkpoint, device, dtype)
    else:
        source, tokenizer = checkpoint, AutoTokenizer.from_pretrained(checkpoint)

    def summed_nll(blocks: torch.Tensor, batch_size: int) -> tuple[float, int]:
        total, count, _ = execution.token_nll(source, blocks, hardware, device, dtype, batch_size)
        return total, count

    def calibration_loss(folder: Path) -> float:
        total, count = summed_nll(load_file(folder / "data" / "prepared" / "calibration" / "blocks.safetensors")["input_ids"],
                                  params["capture"]["batch_size"])
        return total / count

    def shared() -> dict:
        windows_ = {} if windows is None else windows
        perplexity = {}
        for name in cfg["datasets"]:
            text = (draw / "data" / "prepared" / "eval" / PERPLEXITY_TEXT[name]).read_text(encoding="utf-8")
            key = (hashlib.sha256(text.encode()).hexdigest(), len(tokenizer), cfg["seq_len"], cfg["max_windows"], cfg["add_bos"])
            if key not in windows_:
                windows_[key] = perplexity_windows(tokenizer, text, cfg["seq_len"], cfg["max_windows"], cfg["add_bos"])
            blocks, tokens_in_text = windows_[key]
            perplexity[name] = perplexity_result(*summed_nll(blocks, cfg["batch_size"]), blocks, tokens_in_text, cfg["add_bos"])["perplexity"]
        return {"held_out_loss": calibration_loss(held_out), "perplexity": perplexity}

    if cache is None:
        model_level = shared()
    else:
        key = _digest([checkpoint_digest(checkpoint), held_out.name, settings, params["hardware"], params["capture"]["batch_size"]])
        path = cache / f"{key}.json"
        with _locked(path):
            if not path.exists():
                write_json(path, shared())
        model_level = read_json(path)
    return {"loss": calibration_loss(draw), **model_level, "settings": settings}
