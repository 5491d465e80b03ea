"""Which answer a model chose on each document, and what a model that reads nothing would score.

lm-eval keeps only each document's 0/1 result; the answer behind it is in its per-sample log: a
multiple-choice document's ``filtered_resps`` hold one (log-likelihood, is-greedy) pair per choice, and
lm-eval's ``process_results`` takes ``argmax`` of the log-likelihoods (``acc``) and of the
log-likelihoods divided by each choice's length in characters (``acc_norm``). :func:`chosen_answers`
repeats that computation on the logged values and checks it against lm-eval's own 0/1 for every
document, so a stored answer is the one lm-eval scored.

:func:`answer_floor` is the score a model gets without reading the question: *chance* (the mean over the
documents of 1 / number of choices) and the *majority* rate (the share of the most common gold answer
position, or for an open-vocabulary task such as LAMBADA the share of the most common target word), both
over the documents actually scored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"  # one character per document: answer index < 36
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def pack_digits(values: Sequence[int], width: int = 100) -> list[str]:
    """Small non-negative integers (answer indices, choice counts) as rows of ``width`` characters, one
    per value (``0-9a-z``): compact in JSON, a list like ``pack_bits``'s rows."""
    if any(not 0 <= int(v) < len(DIGITS) for v in values):
        raise ValueError(f"pack_digits stores values 0..{len(DIGITS) - 1}; got {max(values)}")
    text = "".join(DIGITS[int(v)] for v in values)
    return [text[i:i + width] for i in range(0, len(text), width)] or [""]


def unpack_digits(rows: Sequence[str]) -> list[int]:
    """Inverse of :func:`pack_digits`."""
    return [DIGITS.index(c) for c in "".join(rows)]


def gold_index(task: Any, doc: dict) -> int | None:
    """The gold choice of a multiple-choice document exactly as lm-eval's ``process_results`` finds it
    (``doc_to_text`` for multiple-input tasks such as WinoGrande, else ``doc_to_target``; a string target
    is looked up among the choices); None where lm-eval would flag it (out of range, several targets)."""
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, list) or task.multiple_target:
        return None
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else None
    return int(gold) if 0 <= int(gold) < len(choices) else None


def chosen_answers(task: Any, sample: dict[str, Any]) -> dict[str, Any] | None:
    """One logged multiple-choice sample's answers: ``{"acc": index, "acc_norm": index, "gold": index,
    "choices": count, "labels": choice texts}``, or None when the sample is not a plain multiple-choice
    one (mutual-information scoring, several targets) or lm-eval's recorded 0/1 disagrees with the
    recomputation (then nothing is stored rather than a guess)."""
    doc = sample["doc"]
    choices = task.doc_to_choice(doc)
    lls = np.array([float(resp[0]) for resp in sample["filtered_resps"]])
    if len(lls) != len(choices):
        return None
    gold = gold_index(task, doc)
    if gold is None:
        return None
    completion_len = np.array([float(len(c)) for c in choices])
    answer = {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(lls / completion_len)), "gold": gold,
              "choices": len(choices), "labels": list(choices)}
    for metric in ("acc", "acc_norm"):
        if metric in sample and float(sample[metric]) != float(answer[metric] == gold):
            return None
    return answer


def answer_floor(gold: Sequence[int], choices: Sequence[int], labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Chance and majority rate of a multiple-choice task over the documents scored.

    ``gold``: each document's gold index; ``choices``: its number of choices; ``labels``: the choice texts
    when every document has the same ones (BoolQ's no/yes), used to name the majority class.
    """
    n = len(gold)
    if n == 0 or len(choices) != n:
        raise ValueError(f"answer_floor needs one gold index and one choice count per document ({n} vs {len(choices)})")
    counts = Counter(int(g) for g in gold)
    top, count = max(sorted(counts.items()), key=lambda kv: kv[1])  # ties: the lowest index
    return {
        "n": n,
        "chance": sum(1.0 / k for k in choices) / n,
        "majority": count / n,
        "majority_class": class_name(top, labels),
        "class_shares": {class_name(k, labels): counts[k] / n for k in sorted(counts)},
    }


def target_floor(targets: Sequence[str]) -> dict[str, Any]:
    """The floor of an open-vocabulary task (LAMBADA): no finite set of choices, so chance is 0 (a
    uniform guess over the vocabulary is ~1/49k per token); the majority rate is the share of the most
    common target, what a model that always predicts that word scores."""
    if not targets:
        raise ValueError("target_floor needs at least one target")
    counts = Counter(targets)
    top, count = max(sorted(counts.items()), key=lambda kv: kv[1])
    return {"n": len(targets), "chance": 0.0, "majority": count / len(targets), "majority_class": top.strip() or top,
            "class_shares": None}


def class_name(index: int, labels: Sequence[str] | None) -> str:
    """A class's name: the choice text where every document shares the choices (``yes``), else its
    position as a letter (``A`` is the first choice)."""
    if labels is not None and 0 <= index < len(labels):
        return str(labels[index]).strip() or LETTERS[index]
    return LETTERS[index] if index < len(LETTERS) else str(index)


def shared_labels(per_doc_labels: Sequence[Sequence[str]]) -> list[str] | None:
    """The choice texts if every document has the same ones and they are short (a class name), else None."""
    if not per_doc_labels:
        return None
    first = list(per_doc_labels[0])
    if all(list(labels) == first for labels in per_doc_labels) and all(len(str(label)) <= 20 for label in first):
        return first
    return None

