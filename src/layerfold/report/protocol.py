"""The headline protocol: which tasks count, the headline and its noise, answer drift, collapse, and
whether the headline agrees with perplexity.

A task average is only a measurement of the model if every task in it measures the model. A small
model sits at chance on some tasks and below the majority class on others (SmolLM2-135M: MMLU,
WinoGrande, ARC-Challenge at chance; BoolQ below always-"yes"); averaging those in rewards any model
that drifts towards a label prior. So (``docs/protocol.md`` says the same for readers):

1. **Informative tasks** are decided from the dense model (:func:`informative_tasks`). A task's
   *floor* is the larger of its chance rate (mean of 1 / number of choices) and its majority-class rate
   (the share of the most common gold answer), both over the documents scored
   (:func:`layerfold.evaluation.answers.answer_floor`). A task counts when the dense model's accuracy is
   above its floor by more than ``Z`` = 1.96 of its standard errors. ``eval.headline.tasks`` can fix the
   list instead (a paper's task set); the rule is then ``fixed`` and says so.
2. **The headline** is the mean over those tasks of each task's reported metric (acc_norm for
   HellaSwag, ARC-Challenge, OpenBookQA; acc otherwise: :data:`layerfold.report.tables.REPORTED_METRIC`),
   with the paired difference to dense ± its standard error and the retained % with its interval
   (:mod:`layerfold.report.noise`). "ahead", "behind" and "within noise" are decided on it alone.
3. **Answer drift**: a model's answer distribution on a task against dense's on the same documents,
   by the Stuart-Maxwell test of marginal homogeneity (McNemar's for two choices); a run is marked
   ``drift`` when some task's p-value is below ``DRIFT_ALPHA`` / (tasks tested) (Bonferroni over the
   run's tasks), naming the class whose share grew most.
4. **Collapse**: WikiText-2 perplexity above ``COLLAPSE_FACTOR`` x dense. A collapsed run is ranked
   after every working one (:func:`ranking`); the comparison also reports Spearman's rank agreement
   between headline and perplexity and every pair where the headline puts A above B while A's
   perplexity is at least ``INVERSION_FACTOR`` x B's.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from layerfold.evaluation.answers import class_name, unpack_digits
from layerfold.evaluation.results import unpack_bits
from layerfold.report.noise import (
    Z, difference, marginal_homogeneity, mean_difference, mean_stderr, rank_agreement, retained_interval, verdict,
)
from layerfold.report.tables import num, reported_metric

COLLAPSE_FACTOR = 10.0  # WikiText-2 perplexity above this multiple of dense: "collapsed"
INVERSION_FACTOR = 3.0  # a headline ranking A above B while A's perplexity is at least this multiple of B's
DRIFT_ALPHA = 0.05  # family-wise over a run's tasks (Bonferroni)

RULE_TEXT = (f"a task counts when the dense model's accuracy exceeds its floor, max(chance, majority class) over the documents "
             f"scored, by more than {Z} standard errors")


def _task(metrics: Mapping[str, Any] | None, task: str) -> dict[str, Any] | None:
    return ((metrics or {}).get("lm_eval") or {}).get(task)


def task_floor(result: Mapping[str, Any] | None, facts: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """A task's floor (chance, majority) from its stored answers, else from ``facts`` (the same numbers
    computed from the task's documents, for results recorded before answers were stored)."""
    floor = ((result or {}).get("answers") or {}).get("floor")
    if floor is None and facts is not None:
        floor = facts.get("floor")
    return floor


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f} %"


def informative_tasks(dense: Mapping[str, Any], tasks: Sequence[str], setting: Any = "auto",
                      facts: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Decide which of ``tasks`` count toward the headline, from the dense model's results.

    ``setting`` is ``eval.headline.tasks``: ``"auto"`` (the rule) or a list of task names (used as given).
    ``facts``: per task, ``{"floor": ...}`` for results that carry no answers (:func:`task_floor`).

    Returns ``{"rule": "auto" | "fixed", "text": the rule in words, "tasks": [counted], "excluded":
    [{"task", "reason"}], "decisions": {task: {metric, dense, se, chance, majority, floor, floor_kind, z,
    informative, reason}}}``.
    """
    decisions = {}
    for task in tasks:
        result = _task(dense, task)
        metric = reported_metric(task, result) or "acc"
        value, se = num((result or {}).get(metric)), num((result or {}).get(f"{metric}_stderr"))
        floor = task_floor(result, (facts or {}).get(task))
        chance, majority = (num(floor.get("chance")), num(floor.get("majority"))) if floor else (None, None)
        level = None if chance is None or majority is None else max(chance, majority)
        kind = None if level is None else "chance" if chance >= majority else f"majority class ({floor.get('majority_class')})"
        z = None if level is None or value is None or not se else (value - level) / se
        informative = z is not None and z > Z
        if value is None:
            reason = "no dense result"
        elif level is None:
            reason = "floor unknown (no per-document answers to compute chance and majority rate from)"
        else:
            relation = "above" if informative else "not above"
            reason = (f"dense {metric} {_pct(value)} ± {_pct(se) if se else '—'} is {relation} its floor {_pct(level)} "
                      f"({kind}; chance {_pct(chance)}, majority {_pct(majority)}) by more than {Z} se"
                      + (f" (z = {z:+.1f})" if z is not None else ""))
        decisions[task] = {"metric": metric, "dense": value, "se": se, "chance": chance, "majority": majority,
                           "majority_class": floor.get("majority_class") if floor else None, "floor": level,
                           "floor_kind": kind, "z": z, "informative": informative, "reason": reason}
    if isinstance(setting, str):
        if setting != "auto":
            raise ValueError(f"eval.headline.tasks={setting!r}: use auto or a list of lm-eval task names")
        known = [t for t in tasks if decisions[t]["floor"] is not None]
        if not known:  # results recorded before answers were stored: nothing to decide from
            return {"rule": "auto", "text": RULE_TEXT + "; no task's floor is known here, so every task counts",
                    "tasks": list(tasks), "excluded": [], "decisions": decisions}
        chosen = [t for t in tasks if decisions[t]["informative"]]
        return {"rule": "auto", "text": RULE_TEXT, "tasks": chosen,
                "excluded": [{"task": t, "reason": decisions[t]["reason"]} for t in tasks if t not in chosen],
                "decisions": decisions}
    fixed = [str(t) for t in setting]
    unknown = [t for t in fixed if t not in tasks]
    if unknown:
        raise ValueError(f"eval.headline.tasks lists {unknown}, which the runs did not evaluate ({list(tasks)}); "
                         "list tasks from eval.lm_eval.tasks, or use auto")
    return {"rule": "fixed", "text": "a fixed task list (eval.headline.tasks), not decided from the dense model",
            "tasks": [t for t in tasks if t in fixed],
            "excluded": [{"task": t, "reason": "not in the fixed list eval.headline.tasks"} for t in tasks if t not in fixed],
            "decisions": decisions}


def rule_lines(decision: Mapping[str, Any]) -> list[str]:
    """The rule, the counted tasks and every excluded task with its reason, as Markdown lines."""
    label = "auto" if decision["rule"] == "auto" else "**fixed list**"
    lines = [f"**Headline** = mean over the informative tasks ({label}: {decision['text']}).",
             f"- counted ({len(decision['tasks'])}): {', '.join(decision['tasks']) or 'none'}"]
    lines += [f"- excluded: {e['task']}: {e['reason']}" for e in decision["excluded"]]
    return lines


def rule_line(decision: Mapping[str, Any], width: int = 120) -> str:
    """One line for a narrow table: the rule and the counted/excluded task names."""
    excluded = ", ".join(e["task"] for e in decision["excluded"]) or "none"
    text = f"headline: {decision['rule']} over {', '.join(decision['tasks']) or 'no task'}; excluded: {excluded}"
    return text if len(text) <= width else text[: width - 1] + "…"


def headline(metrics: Mapping[str, Any] | None, tasks: Sequence[str]) -> dict[str, float | None]:
    """``{"value", "se"}``: the mean reported metric over ``tasks`` and its standard error (independent tasks)."""
    values, ses = [], []
    for task in tasks:
        result = _task(metrics, task)
        metric = reported_metric(task, result) or "acc"
        values.append(num((result or {}).get(metric)))
        ses.append(num((result or {}).get(f"{metric}_stderr")))
    if not tasks or any(v is None for v in values):
        return {"value": None, "se": None}
    return {"value": sum(values) / len(values), "se": mean_stderr(ses)}  # type: ignore[arg-type]


def headline_difference(metrics: Mapping[str, Any] | None, dense: Mapping[str, Any] | None, tasks: Sequence[str]) -> dict[str, Any]:
    """The headline of ``metrics`` against ``dense``: ``{diff, se, paired, significant, verdict, retained_pct,
    low, high}``; differences paired per task over the same documents where both have per-document results."""
    diffs = []
    for task in tasks:
        mine, theirs = _task(metrics, task), _task(dense, task)
        metric = reported_metric(task, *(r for r in (mine, theirs) if r is not None)) or "acc"
        diffs.append(difference(theirs, mine, metric))
    out = mean_difference(diffs) if tasks else {"diff": None, "se": None, "paired": False, "significant": None}
    out["verdict"] = verdict(out)
    out.update(retained_interval(headline(dense, tasks)["value"], out))
    return out


# ------------------------------------------------------------------------------------------------
# answer drift


def chosen_answers(result: Mapping[str, Any] | None, metric: str, facts: Mapping[str, Any] | None = None) -> list[int] | None:
    """The answer index a model chose on each document for ``metric``: stored (``answers.chosen``), or for
    a two-choice task derived exactly from its 0/1 result and the gold answers in ``facts`` (a wrong answer
    is the other choice); None where neither is possible."""
    answers = (result or {}).get("answers") or {}
    if answers.get("chosen", {}).get(metric):
        return unpack_digits(answers["chosen"][metric])
    correct = ((result or {}).get("per_doc") or {}).get(metric)
    if not correct or not facts or not facts.get("gold") or set(unpack_digits(facts.get("choices") or [])) != {2}:
        return None
    gold, bits = unpack_digits(facts["gold"]), unpack_bits(correct)
    if len(gold) != len(bits):
        return None
    return [g if b else 1 - g for g, b in zip(gold, bits)]


def _labels(result: Mapping[str, Any] | None, facts: Mapping[str, Any] | None) -> list[str] | None:
    return ((result or {}).get("answers") or {}).get("labels") or (facts or {}).get("labels")


def task_drift(dense: Mapping[str, Any] | None, other: Mapping[str, Any] | None, task: str,
               facts: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """``other``'s answer distribution on ``task`` against dense's on the same documents (Stuart-Maxwell);
    ``{test, p, statistic, df, n, shares_dense, shares, to, shift, derived}`` or None without answers."""
    mine, theirs = _task(other, task), _task(dense, task)
    if mine is None or theirs is None or (mine.get("doc_ids") != theirs.get("doc_ids")):
        return None
    metric = reported_metric(task, mine, theirs) or "acc"
    a, b = chosen_answers(theirs, metric, facts), chosen_answers(mine, metric, facts)
    if a is None or b is None or len(a) != len(b) or not a:
        return None
    test = marginal_homogeneity(a, b)
    labels = _labels(mine, facts) or _labels(theirs, facts)
    k = max(a + b) + 1
    shares_dense = [a.count(c) / len(a) for c in range(k)]
    shares = [b.count(c) / len(b) for c in range(k)]
    grown = max(range(k), key=lambda c: shares[c] - shares_dense[c])
    return {"test": "McNemar" if k <= 2 else "Stuart-Maxwell", "metric": metric, **test,
            "shares_dense": {class_name(c, labels): shares_dense[c] for c in range(k)},
            "shares": {class_name(c, labels): shares[c] for c in range(k)},
            "to": class_name(grown, labels), "shift": shares[grown] - shares_dense[grown],
            "derived": not bool(((mine.get("answers") or {}).get("chosen") or {}).get(metric))}


def run_drift(dense: Mapping[str, Any] | None, other: Mapping[str, Any] | None, tasks: Sequence[str],
              facts: Mapping[str, Mapping[str, Any]] | None = None, alpha: float = DRIFT_ALPHA) -> dict[str, Any]:
    """Every task's drift test for one run and the tasks beyond noise after Bonferroni over the tasks tested:
    ``{tested: [tasks], untested: [tasks], threshold, tasks: {task: task_drift}, drifted: [{task, to, shift, p}]}``."""
    results = {t: task_drift(dense, other, t, (facts or {}).get(t)) for t in tasks}
    tested = [t for t, r in results.items() if r is not None]
    threshold = alpha / len(tested) if tested else None
    drifted = [{"task": t, "to": results[t]["to"], "shift": results[t]["shift"], "p": results[t]["p"],
                "from_share": results[t]["shares_dense"][results[t]["to"]], "share": results[t]["shares"][results[t]["to"]]}
               for t in tested if results[t]["p"] < threshold]  # type: ignore[operator]
    return {"tested": tested, "untested": [t for t in tasks if t not in tested], "threshold": threshold,
            "tasks": {t: r for t, r in results.items() if r is not None}, "drifted": drifted}


def drift_mark(drift: Mapping[str, Any] | None) -> str:
    """``drift: boolq_notitle→yes (4→97 %)`` (the class whose share of the answers grew most, dense's share
    and the run's) for the tables; empty when nothing drifted."""
    if not drift or not drift.get("drifted"):
        return ""
    return "drift: " + ", ".join(f"{d['task']}→{d['to']} ({100 * d['from_share']:.0f}→{100 * d['share']:.0f} %)" for d in drift["drifted"])


# ------------------------------------------------------------------------------------------------
# collapse, rank agreement, ranking


def wikitext2_ppl(metrics: Mapping[str, Any] | None) -> float | None:
    return num((((metrics or {}).get("perplexity") or {}).get("wikitext2") or {}).get("perplexity"))


def collapsed(ppl: float | None, dense_ppl: float | None, factor: float = COLLAPSE_FACTOR) -> bool | None:
    """WikiText-2 perplexity above ``factor`` x dense's; None when either is unknown."""
    if ppl is None or dense_ppl is None:
        return None
    return ppl > factor * dense_ppl


def ranking(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows (with ``headline`` and ``collapsed``) best first: working runs by headline, then collapsed
    runs by headline, then runs without a headline. A collapsed model is not a working language model,
    whatever a task average says, so it never ranks above one."""
    def key(row: Mapping[str, Any]) -> tuple:
        value = num(row.get("headline"))
        return (value is None, bool(row.get("collapsed")), -(value or 0.0))

    return sorted(rows, key=key)


def perplexity_agreement(rows: Sequence[Mapping[str, Any]], metrics_by_run: Mapping[str, Mapping[str, Any]],
                         tasks: Sequence[str], factor: float = INVERSION_FACTOR) -> dict[str, Any]:
    """Spearman's rank agreement between headline and WikiText-2 perplexity over ``rows`` (+1: the same
    order), and every pair where the headline puts A above B while A's perplexity is >= ``factor`` x B's,
    with the paired headline difference A - B."""
    scored = [r for r in rows if num(r.get("headline")) is not None and num(r.get("wikitext2_ppl")) is not None]
    agreement = rank_agreement([r["headline"] for r in scored], [r["wikitext2_ppl"] for r in scored])
    inversions = []
    for a, b in itertools.permutations(scored, 2):
        if a["headline"] > b["headline"] and a["wikitext2_ppl"] >= factor * b["wikitext2_ppl"]:
            d = headline_difference(metrics_by_run.get(a["run"]), metrics_by_run.get(b["run"]), tasks)
            inversions.append({"a": a["run"], "b": b["run"], "headline_a": a["headline"], "headline_b": b["headline"],
                               "ppl_a": a["wikitext2_ppl"], "ppl_b": b["wikitext2_ppl"], "diff": d["diff"], "se": d["se"],
                               "significant": d["significant"]})
    inversions.sort(key=lambda p: -(p["ppl_a"] / p["ppl_b"]))
    return {"rho": agreement["rho"], "n": agreement["n"], "factor": factor, "inversions": inversions}


# ------------------------------------------------------------------------------------------------
# the summary metric


# task names short enough for a `dvc exp show` cell (summary.json's drift)
SHORT_NAMES = {"boolq_notitle": "boolq", "winogrande": "wino", "hellaswag": "hswag", "arc_easy": "arc_e", "arc_challenge": "arc_c",
               "openbookqa": "obqa", "lambada_openai": "lambada"}


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def summary(dense: Mapping[str, Any], final: Mapping[str, Any] | None, decision: Mapping[str, Any],
            recover: Mapping[str, Any] | None = None, drift: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``metrics/summary.json``: one run's headline numbers, flat and short-keyed so that ``dvc exp show``
    fits them in 120 columns. Accuracies and differences in percentage points: ``headline`` ± ``se``,
    ``dense`` (its headline), ``delta`` ± ``delta_se``, ``verdict`` (ahead / behind / within noise),
    ``retained`` [``retained_lo``, ``retained_hi``] in %; ``rule``, ``tasks`` (the counted set, a list,
    which DVC's tables skip) and ``n_tasks``; WikiText-2 / C4 perplexity; ``lambada`` (acc, %) and
    ``lambada_ppl``; ``layers``, ``params_m`` (millions), ``train_tokens``; ``collapsed``; ``drift``
    (task→class of every drifted task, short names)."""
    final = final or {}
    tasks = decision["tasks"]
    mine, base = headline(final, tasks), headline(dense, tasks)
    diff = headline_difference(final, dense, tasks)
    ppl, dense_ppl = wikitext2_ppl(final), wikitext2_ppl(dense)
    lambada = _task(final, "lambada_openai") or {}
    pct = lambda v: None if v is None else _round(100 * v)  # noqa: E731
    out = {
        "headline": pct(mine["value"]), "se": pct(mine["se"]),
        "dense": pct(base["value"]),
        "delta": pct(diff["diff"]), "delta_se": pct(diff["se"]),
        "retained": _round(diff["retained_pct"], 1),
        "retained_lo": _round(diff["low"], 1), "retained_hi": _round(diff["high"], 1),
        "verdict": diff["verdict"],
        "rule": decision["rule"], "n_tasks": len(tasks), "tasks": list(tasks),
        "wiki2_ppl": _round(ppl), "c4_ppl": _round(num((((final.get("perplexity") or {}).get("c4")) or {}).get("perplexity"))),
        "lambada": pct(num(lambada.get("acc"))), "lambada_ppl": _round(num(lambada.get("perplexity"))),
        "layers": num((final.get("model") or {}).get("num_layers")),
        "params_m": _round((num((final.get("model") or {}).get("params_total")) or 0) / 1e6, 1) if (final.get("model") or {}).get("params_total") else None,
        "train_tokens": num((recover or {}).get("train_tokens_processed")),
        "collapsed": collapsed(ppl, dense_ppl),
        "drift": ", ".join(f"{SHORT_NAMES.get(d['task'], d['task'])}→{d['to']}" for d in (drift or {}).get("drifted", [])) or None,
    }
    if out["layers"] is not None:
        out["layers"] = int(out["layers"])
    if out["train_tokens"] is not None:
        out["train_tokens"] = int(out["train_tokens"])
    return out
