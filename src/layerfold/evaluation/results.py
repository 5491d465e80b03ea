"""lm-eval's output shaped into layerfold's results: each task's metrics and standard errors, each document's
0/1 result and answers, and the split between the metrics file (numbers) and the per-document output."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

def _metric_value(value: Any) -> float | None:
    # lm-eval reports a stderr it could not compute as the string "N/A".
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _flatten(results: dict[str, Any], name: str, leaves: list[str]) -> dict[str, float | None]:
    """``{"acc,none": x, "acc_stderr,none": s}`` -> ``{"acc": x, "acc_stderr": s, "n": docs}``."""
    out: dict[str, float | None] = {}
    for key, value in results["results"][name].items():
        metric, _, filter_name = key.partition(",")
        if filter_name == "none":
            out[metric] = _metric_value(value)
    n_samples = results.get("n-samples", {})
    out["n"] = sum(n_samples[leaf]["effective"] for leaf in leaves if leaf in n_samples)
    return out


def _leaf_tasks(results: dict[str, Any], name: str) -> list[str]:
    """Leaf task names under ``name`` in a results dict (``name`` itself for a plain task)."""
    children = results.get("group_subtasks", {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaf_tasks(results, child)]


def _per_doc(samples: list[dict[str, Any]], metrics: list[str]) -> dict[str, list[float]]:
    """Per-document metric values ordered by document id (lm-eval's ``log_samples`` output)."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return {m: [float(s[m]) for s in ordered] for m in metrics if ordered and m in ordered[0]}


def _answers(tasks: dict[str, Any], samples: dict[str, list[dict[str, Any]]], leaves: list[str], n: int) -> dict[str, Any] | None:
    """Each document's chosen answer, gold answer and number of choices (multiple-choice tasks), and the
    task's floor (:func:`layerfold.evaluation.answers.answer_floor`), over ``leaves`` in document order;
    None where a document's answer cannot be recovered exactly (then nothing is stored for the task)."""
    from layerfold.evaluation.answers import answer_floor, chosen_answers, pack_digits, shared_labels, target_floor

    ordered = [(tasks[leaf], s) for leaf in leaves for s in sorted(samples.get(leaf, []), key=lambda s: s["doc_id"])]
    if not ordered or len(ordered) != n:
        return None
    kinds = {task.OUTPUT_TYPE for task, _ in ordered}
    if kinds == {"loglikelihood"}:  # LAMBADA: one target per document, greedy match or not
        return {"floor": target_floor([str(task.doc_to_target(s["doc"])) for task, s in ordered])}
    if kinds != {"multiple_choice"}:
        return None
    picked = [chosen_answers(task, s) for task, s in ordered]
    if any(p is None for p in picked):
        log.warning("answers of %s not stored: a document's answer could not be recovered exactly", ", ".join(leaves))
        return None
    labels = shared_labels([p["labels"] for p in picked])
    gold, choices = [p["gold"] for p in picked], [p["choices"] for p in picked]
    return {
        "chosen": {m: pack_digits([p[m] for p in picked]) for m in ("acc", "acc_norm")},
        "gold": pack_digits(gold),
        "choices": pack_digits(choices),
        "labels": labels,
        "floor": answer_floor(gold, choices, labels),
    }



def task_result(results: dict[str, Any], tasks: dict[str, Any], name: str, samples: dict[str, list[int]] | None) -> dict[str, Any]:
    """One task's entry of :func:`layerfold.evaluation.runner.run_lm_eval`'s results from lm-eval's
    ``evaluate`` output (``log_samples=True``): its metrics (:func:`_flatten`), ``per_doc``, ``answers``
    and ``doc_ids``. ``tasks`` is the evaluated task dict's ``"tasks"``; ``samples`` lm-eval's ``samples=``."""
    leaves = _leaf_tasks(results, name)
    entry: dict[str, Any] = _flatten(results, name, leaves)
    metrics = [m for m in ("acc", "acc_norm") if entry.get(m) is not None]
    per_doc: dict[str, list[float]] = {m: [] for m in metrics}
    for leaf in sorted(leaves):
        for metric, values in _per_doc(results.get("samples", {}).get(leaf, []), metrics).items():
            per_doc[metric].extend(values)
    entry["per_doc"] = {m: pack_bits(v) for m, v in per_doc.items() if len(v) == entry["n"]}
    entry["answers"] = _answers(tasks, results.get("samples", {}), sorted(leaves), entry["n"])
    # which documents: None = every one; else the sampled indices per leaf task (a dict of
    # lists, which DVC's metric views skip, like per_doc)
    entry["doc_ids"] = None if samples is None else {leaf: samples[leaf] for leaf in sorted(leaves) if leaf in samples}
    return entry


# Per-document keys of a task's results: they go to the per-document output, not to the metrics file.
DOCUMENT_KEYS = ("per_doc", "doc_ids", "answers")


def split_documents(lm_eval_results: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``run_lm_eval``'s results as (aggregates per task, per-document data per task): the first is what
    a DVC metrics file holds (numbers), the second the plain per-document output."""
    aggregates = {task: {k: v for k, v in entry.items() if k not in DOCUMENT_KEYS} for task, entry in lm_eval_results.items()}
    documents = {task: {k: entry[k] for k in DOCUMENT_KEYS if k in entry} for task, entry in lm_eval_results.items()}
    return aggregates, documents


def merge_documents(metrics: dict[str, Any] | None, documents: dict[str, Any] | None) -> dict[str, Any] | None:
    """A metrics dict with each task's per-document data (an ``evaluate`` per-document output, whose
    ``lm_eval`` maps task -> per-document keys) put back beside its aggregates, as the readers use it.
    A metrics dict that still carries per-document data (older runs) is returned unchanged."""
    if metrics is None or not documents:
        return metrics
    per_task = documents.get("lm_eval") or {}
    lm_eval = {task: {**entry, **{k: v for k, v in (per_task.get(task) or {}).items() if k not in entry}}
               for task, entry in (metrics.get("lm_eval") or {}).items()}
    return {**metrics, "lm_eval": lm_eval} if lm_eval else metrics


def pack_bits(values: list[float], width: int = 100) -> list[str]:
    """0/1 values as rows of ``width`` characters: compact in JSON, and a list, which DVC's metrics
    views skip (they would otherwise show thousands of characters as one column)."""
    text = "".join("1" if v >= 0.5 else "0" for v in values)
    return [text[i:i + width] for i in range(0, len(text), width)] or [""]


def unpack_bits(rows: list[str]) -> list[float]:
    """Inverse of :func:`pack_bits`."""
    return [1.0 if c == "1" else 0.0 for c in "".join(rows)]


