"""The comparison's findings, written by code from its numbers (``findings.md``).

Every figure in the text comes from :func:`layerfold.report.collected.compare_records`: the informative
tasks and their floors, each run's headline and paired Δ vs dense, the pairs at the comparison depth,
collapse, drift, the rank agreement with perplexity, and the all-task average the comparison reported
before the headline, so that what changed is stated by the same code. A sentence is only written when
the numbers hold it ("ahead" only beyond 1.96 standard errors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from layerfold.report.protocol import ranking


def _pts(diff: float | None, se: float | None) -> str:
    if diff is None:
        return "—"
    return f"{100 * diff:+.2f}" + ("" if se is None else f" ± {100 * se:.2f}")


def _pct(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}" + ("" if se is None else f" ± {100 * se:.2f}") + " %"


def _ppl(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if value < 1e4 else f"{value:.2g}"


def _names(rows: Sequence[Mapping[str, Any]], with_delta: bool = True) -> str:
    if not rows:
        return "none"
    return ", ".join(f"{r['run']} ({_pts(r['diff'], r['diff_se'])})" if with_delta else r["run"] for r in rows)


def _pair(pairs: Sequence[Mapping[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """The pair ``a`` vs ``b`` oriented as ``a - b``."""
    for p in pairs:
        if (p["a"], p["b"]) == (a, b):
            return dict(p)
        if (p["a"], p["b"]) == (b, a):
            return {**p, "a": a, "b": b, "diff": None if p["diff"] is None else -p["diff"]}
    return None


def _pair_text(pair: Mapping[str, Any] | None) -> str:
    if pair is None or pair["diff"] is None:
        return "not compared"
    relation = "ahead of" if pair["ahead"] == pair["a"] else "behind" if pair["ahead"] == pair["b"] else "within noise of"
    return f"{pair['a']} is {relation} {pair['b']} ({_pts(pair['diff'], pair['se'])})"


def _verdict_word(verdict: str | None) -> str:
    return {"ahead": "ahead of dense", "behind": "behind dense", "within noise": "within noise of dense"}.get(verdict or "", "no verdict")


def findings_markdown(result: Mapping[str, Any], title: str, model: str | None = None) -> str:
    """``findings.md`` from :func:`layerfold.report.collected.compare_records`'s result; ``model`` names the
    weights the numbers belong to, as the records state them (:func:`layerfold.report.collected.model_caveat`)."""
    decision, rows, pairs = result["decision"], result["rows"], result["pairs"]
    tasks, layers = result["tasks"], result["compare_layers"]
    dense, runs = rows[0], rows[1:]
    at_depth = [r for r in runs if r["layers"] == layers]
    out = [f"# Findings: {title}", "",
           "Written by `layerfold.report.findings` from the numbers in `table.md` and `pairs.md`; Δ is paired over the same "
           "documents, and a run is ahead or behind only beyond 1.96 standard errors.", ""]

    # what counts -------------------------------------------------------------------------------------
    floored = [t for t in decision["tasks"] if (decision["decisions"].get(t) or {}).get("floor") is not None]
    unfloored = [t for t in decision["tasks"] if t not in floored]
    counted = [f"{t} (dense {_pct(decision['decisions'][t]['dense'])} vs floor {_pct(decision['decisions'][t]['floor'])})"
               for t in floored]
    out.append("## What the headline counts")
    out.append("")
    if decision["rule"] == "fixed":
        out.append(f"A fixed task list (eval.headline.tasks): {', '.join(decision['tasks'])}.")
    else:
        if floored or not unfloored:
            out.append(f"The dense model is above its floor (max of chance and the majority class) by more than 1.96 se on "
                       f"{len(floored)} of {len(tasks)} tasks: {'; '.join(counted) or 'none'}.")
        if unfloored:  # no documents to compute a floor from: counted unjudged, and said so
            out.append(f"No floor is known for {', '.join(unfloored)} (no per-document answers or task facts), so "
                       f"{'it counts' if len(unfloored) == 1 else 'they count'} without being judged informative.")
    for entry in decision["excluded"]:
        d = decision["decisions"].get(entry["task"], {})
        if d.get("floor") is not None and d.get("dense") is not None:
            out.append(f"- {entry['task']} excluded: dense {_pct(d['dense'], d['se'])} against a floor of {_pct(d['floor'])} "
                       f"({d['floor_kind']}).")
        else:
            out.append(f"- {entry['task']} excluded: {entry['reason']}.")
    out.append("")
    out.append(f"Dense headline: {_pct(dense['headline'], dense['headline_se'])} over {len(decision['tasks'])} task(s) "
               f"(the all-{len(tasks)} average: {_pct(dense['average'], dense['average_se'])}).")
    out.append("")

    # the comparison depth -------------------------------------------------------------------------------
    if at_depth:
        ordered = ranking(at_depth)
        working = [r for r in ordered if not r.get("collapsed")]
        out += [f"## At {layers} layers", ""]
        out.append("Ranking by headline (working runs first): "
                   + ", ".join(f"{r['run']} {_pts(r['diff'], r['diff_se'])}" + (" [collapsed]" if r.get("collapsed") else "")
                               for r in ordered) + ".")
        for word in ("ahead", "within noise", "behind"):
            group = [r for r in at_depth if r["verdict"] == word]
            out.append(f"- {_verdict_word(word).capitalize()}: {len(group)} run(s)" + (f": {_names(group)}" if group and word != "behind" else "") + ".")
        if len(working) >= 2:
            out.append(f"- The best working run: {working[0]['run']} ({_pts(working[0]['diff'], working[0]['diff_se'])}, "
                       f"{_verdict_word(working[0]['verdict'])}); {_pair_text(_pair(pairs, working[0]['run'], working[1]['run']))}.")
        trained = [r for r in working if r.get("recovery")]
        free = [r for r in working if not r.get("recovery")]
        if trained and free:
            out.append(f"- Best trained run {trained[0]['run']} vs best training-free run {free[0]['run']}: "
                       f"{_pair_text(_pair(pairs, trained[0]['run'], free[0]['run']))}.")
        if len(free) >= 2 and [r["run"] for r in free[:2]] != [r["run"] for r in working[:2]]:
            out.append(f"- Training-free, {_pair_text(_pair(pairs, free[0]['run'], free[1]['run']))}.")
        out.append("")

    # collapse and perplexity --------------------------------------------------------------------------------
    gone = [r for r in runs if r.get("collapsed")]
    consistency = result["consistency"]
    out += ["## Collapse and perplexity", ""]
    if gone:
        out.append(f"{len(gone)} run(s) collapsed (WikiText-2 perplexity above 10x dense's {_ppl(dense['wikitext2_ppl'])}): "
                   + ", ".join(f"{r['run']} (PPL {_ppl(r['wikitext2_ppl'])}, headline {_pts(r['diff'], r['diff_se'])})" for r in gone)
                   + ". They rank after every working run.")
    else:
        out.append("No run collapsed (WikiText-2 perplexity above 10x dense's).")
    if consistency["rho"] is not None:
        out.append(f"Rank agreement between headline and WikiText-2 perplexity over {consistency['n']} runs: Spearman "
                   f"{consistency['rho']:+.2f}; {len(consistency['inversions'])} pair(s) where the headline puts A above B "
                   f"although A's perplexity is at least {consistency['factor']:g}x B's"
                   + (": " + ", ".join(f"{p['a']} over {p['b']} ({_pts(p['diff'], p['se'])}, PPL ratio {p['ppl_a'] / p['ppl_b']:.3g})"
                                       for p in consistency["inversions"][:8])
                      + (", ..." if len(consistency["inversions"]) > 8 else "") if consistency["inversions"] else "") + ".")
    out.append("")

    # drift -----------------------------------------------------------------------------------------
    drifted = [r for r in runs if r.get("drift_mark")]
    tested = sorted({t for r in runs if r.get("drift") for t in r["drift"]["tested"]})
    out += ["## Answer drift", ""]
    if not tested:
        out.append("No task has per-document answers in these runs; drift is measured from the next run on.")
    else:
        out.append(f"Tested on {', '.join(tested)}: {len(drifted)} of {len(runs)} run(s) drifted"
                   + (": " + "; ".join(f"{r['run']} {r['drift_mark'].removeprefix('drift: ')}" for r in drifted) if drifted else "") + ".")
        untested = [t for t in tasks if t not in tested]
        if untested:
            out.append(f"Not tested (needs the stored answers of the next run): {', '.join(untested)}.")
    out.append("")

    # what changed ---------------------------------------------------------------------------------------
    out += [f"## What changed against the all-{len(tasks)} average", ""]
    changed = [r for r in runs if r["average_verdict"] != r["verdict"]]
    if changed:
        for r in changed:
            out.append(f"- {r['run']}: {r['average_verdict'] or 'no verdict'} on the all-task average "
                       f"({_pts(r['average_diff'], r['average_diff_se'])}) -> {r['verdict'] or 'no verdict'} on the headline "
                       f"({_pts(r['diff'], r['diff_se'])}).")
    else:
        out.append("No run's verdict against dense changed.")
    if at_depth:
        by_average = sorted(at_depth, key=lambda r: -(r["average"] or 0.0))
        by_headline = ranking(at_depth)
        out.append(f"- Order at {layers} layers, all-task average: {', '.join(r['run'] for r in by_average[:5])}; "
                   f"headline: {', '.join(r['run'] for r in by_headline[:5])}.")
        above = [(c, w) for c in at_depth if c.get("collapsed") for w in at_depth if not w.get("collapsed")
                 and (c["average"] or 0.0) > (w["average"] or 0.0)]
        if above:
            examples = ", ".join(f"{c['run']} over {w['run']}" for c, w in above[:4])
            out.append(f"- {len(above)} collapsed-over-working order(s) the all-task average gave at {layers} layers "
                       f"(e.g. {examples}); the headline ranking has none.")
    flipped = [(p, q) for p in result.get("pairs_all", []) for q in pairs if (p["a"], p["b"]) == (q["a"], q["b"]) and p["ahead"] != q["ahead"]]
    if flipped:
        def say(group: list, limit: int = 8) -> str:
            shown = "; ".join(f"{p['a']} − {p['b']}: {_pts(p['diff'], p['se'])} -> {_pts(q['diff'], q['se'])}" for p, q in group[:limit])
            return shown + (f"; and {len(group) - limit} more (pairs.md)" if len(group) > limit else "")

        reversed_ = [(p, q) for p, q in flipped if p["ahead"] and q["ahead"]]
        separated = [(p, q) for p, q in flipped if not p["ahead"] and q["ahead"]]
        merged = [(p, q) for p, q in flipped if p["ahead"] and not q["ahead"]]
        out.append(f"- {len(flipped)} of {len(pairs)} pair(s) at {layers} layers changed their verdict (Δ all tasks -> Δ headline):")
        for label, group in (("reversed (the other run is now ahead)", reversed_), ("now apart beyond noise", separated),
                             ("now within noise", merged)):
            if group:
                out.append(f"  - {label}, {len(group)}: {say(group)}.")
    out.append("")

    # depth -----------------------------------------------------------------------------------------------
    if result["curves"]:
        out += ["## Depth curves", "", "Headline Δ vs dense at each depth (layers removed: Δ ± se, WikiText-2 perplexity):", ""]
        for name, points in result["curves"].items():
            steps = [f"{p['removed']}: {_pts(p['diff'], p['diff_se'])}{'*' if p['significant'] else ''} (PPL {_ppl(p['wikitext2_ppl'])}"
                     + (", collapsed" if p.get("collapsed") else "") + ")" for p in points if p["run"] != "dense"]
            out.append(f"- {name}: {'; '.join(steps)}.")
        first = [pts[1] for pts in result["curves"].values() if len(pts) > 1]
        costly = [p["run"] for p in first if p["verdict"] == "behind"]
        out.append(f"- At the smallest depth step, behind dense beyond noise: {', '.join(costly) or 'none'}.")
        out.append("")

    if "lambada_openai" not in tasks:
        out.append("LAMBADA (OpenAI) is not in these runs.")
    out.append(f"These are one model's numbers ({model or 'model not recorded'}): they say what holds for it under this "
               "comparison's settings, not what the papers measured.")
    return "\n".join(out) + "\n"
