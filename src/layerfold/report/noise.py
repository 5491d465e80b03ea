"""Differences between two models' accuracies with their standard errors, and whether they are
outside the noise.

Where both metrics files carry per-document correctness on the same documents (``per_doc``, written
by :class:`layerfold.evaluation.harness.LmEvalRunner`), the difference is *paired*: its standard
error is that of the per-document differences, ``sd(c_i - d_i) / sqrt(n)``, which is smaller than
the unpaired one because both models find the same questions hard. Otherwise the two reported
stderrs are combined as independent, ``sqrt(se_d^2 + se_c^2)``. A difference is significant when it
is more than ``Z`` standard errors from zero (95 %, two-sided).
"""

from __future__ import annotations

import math
from typing import Any

from layerfold.evaluation.harness import unpack_bits

Z = 1.96


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def per_doc(result: dict | None, metric: str) -> list[float] | None:
    """Per-document 0/1 values of ``metric`` in one task result, or None when not recorded."""
    rows = ((result or {}).get("per_doc") or {}).get(metric)
    return unpack_bits(rows) if rows else None


def difference(base: dict | None, other: dict | None, metric: str) -> dict[str, Any]:
    """``other - base`` for one task's ``metric``: ``{diff, se, paired, significant}`` (None where unknown)."""
    b, o = _num((base or {}).get(metric)), _num((other or {}).get(metric))
    out: dict[str, Any] = {"diff": None, "se": None, "paired": False, "significant": None}
    if b is None or o is None:
        return out
    out["diff"] = o - b
    xb, xo = per_doc(base, metric), per_doc(other, metric)
    same_docs = (base or {}).get("doc_ids") == (other or {}).get("doc_ids")
    if xb is not None and xo is not None and same_docs and len(xb) == len(xo) > 1:
        d = [y - x for x, y in zip(xb, xo)]
        mean = sum(d) / len(d)
        var = sum((v - mean) ** 2 for v in d) / (len(d) - 1)
        out["se"], out["paired"] = math.sqrt(var / len(d)), True
    else:
        sb, so = _num((base or {}).get(f"{metric}_stderr")), _num((other or {}).get(f"{metric}_stderr"))
        if sb is not None and so is not None:
            out["se"] = math.sqrt(sb**2 + so**2)
    if out["se"] is not None:
        out["significant"] = abs(out["diff"]) > Z * out["se"]
    return out


def mean_difference(diffs: list[dict[str, Any]]) -> dict[str, Any]:
    """Difference of unweighted task averages: the mean of the task differences, with the standard
    error of a mean of independent estimates, ``sqrt(sum se_t^2) / T``."""
    out: dict[str, Any] = {"diff": None, "se": None, "paired": False, "significant": None}
    if not diffs or any(d["diff"] is None for d in diffs):
        return out
    out["diff"] = sum(d["diff"] for d in diffs) / len(diffs)
    out["paired"] = all(d["paired"] for d in diffs)
    if all(d["se"] is not None for d in diffs):
        out["se"] = math.sqrt(sum(d["se"] ** 2 for d in diffs)) / len(diffs)
        out["significant"] = abs(out["diff"]) > Z * out["se"]
    return out


def mean_stderr(stderrs: list[float | None]) -> float | None:
    """Standard error of an unweighted mean of independent task accuracies."""
    if not stderrs or any(_num(s) is None for s in stderrs):
        return None
    return math.sqrt(sum(s**2 for s in stderrs)) / len(stderrs)  # type: ignore[operator]
