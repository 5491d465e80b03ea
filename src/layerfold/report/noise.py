"""Differences between two models' accuracies with their standard errors, and whether they are
outside the noise.

Where both metrics files carry per-document correctness on the same documents (``per_doc``, written
by :class:`layerfold.evaluation.runner.LmEvalRunner`), the difference is *paired*: its standard
error is that of the per-document differences, ``sd(c_i - d_i) / sqrt(n)``, which is smaller than
the unpaired one because both models find the same questions hard. Otherwise the two reported
stderrs are combined as independent, ``sqrt(se_d^2 + se_c^2)``. A difference is significant when it
is more than ``Z`` standard errors from zero (95 %, two-sided).
"""

from __future__ import annotations

import math
from typing import Any

from layerfold.evaluation.results import unpack_bits

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


def verdict(diff: dict[str, Any]) -> str | None:
    """"ahead", "behind" or "within noise" for a difference from :func:`difference` / :func:`mean_difference`
    (beyond ``Z`` standard errors or not); None without a standard error."""
    if diff.get("diff") is None or diff.get("se") is None:
        return None
    if not diff.get("significant"):
        return "within noise"
    return "ahead" if diff["diff"] > 0 else "behind"


def retained_interval(dense: float | None, diff: dict[str, Any]) -> dict[str, float | None]:
    """Retained % of dense, ``100 (dense + Δ) / dense``, with its 95 % interval from the paired Δ:
    ``100 (1 + (Δ ± Z se) / dense)``. The dense score is treated as fixed: the paired Δ carries the
    comparison's noise (the documents both models saw), the dense score's own sampling noise would
    move both ends by the same factor."""
    out: dict[str, float | None] = {"retained_pct": None, "low": None, "high": None}
    d, se = _num(diff.get("diff")), _num(diff.get("se"))
    if dense is None or dense <= 0 or d is None:
        return out
    out["retained_pct"] = 100.0 * (1.0 + d / dense)
    if se is not None:
        out["low"], out["high"] = 100.0 * (1.0 + (d - Z * se) / dense), 100.0 * (1.0 + (d + Z * se) / dense)
    return out


def marginal_homogeneity(before: list[int], after: list[int]) -> dict[str, Any]:
    """Stuart-Maxwell test that two paired answer distributions over the same documents are the same.

    ``before[i]`` and ``after[i]`` are the classes two models chose on document ``i``. The statistic is
    ``d' S⁻ d`` over the classes, with ``d`` the difference of the two models' class counts and ``S`` its
    covariance under the null (``S_jj = n_j. + n_.j - 2 n_jj``, ``S_jk = -(n_jk + n_kj)``, ``n`` the paired
    table); ``S⁻`` is a generalised inverse, so classes neither model moved to or from add nothing, and
    the degrees of freedom are the rank of ``S``. With two classes it is McNemar's test (no continuity
    correction). Returns ``{statistic, df, p, n}``; ``p`` is 1 when the two agree on every document.
    """
    import numpy as np
    from scipy.stats import chi2

    if len(before) != len(after):
        raise ValueError(f"paired answers need the same documents ({len(before)} vs {len(after)})")
    n = len(before)
    k = max([*before, *after], default=-1) + 1
    table = np.zeros((k, k))
    for a, b in zip(before, after):
        table[a, b] += 1
    d = table.sum(axis=1) - table.sum(axis=0)
    s = -(table + table.T)
    np.fill_diagonal(s, table.sum(axis=1) + table.sum(axis=0) - 2 * np.diag(table))
    rank = int(np.linalg.matrix_rank(s)) if k else 0
    if rank == 0:
        return {"statistic": 0.0, "df": 0, "p": 1.0, "n": n}
    statistic = float(d @ np.linalg.pinv(s) @ d)
    return {"statistic": statistic, "df": rank, "p": float(chi2.sf(statistic, rank)), "n": n}


def rank_agreement(scores: list[float], perplexities: list[float]) -> dict[str, Any]:
    """Spearman's rank correlation between a score (higher is better) and perplexity (lower is better),
    signed so that +1 means the two rank every run the same way: ``rho = -spearman(score, perplexity)``."""
    from scipy.stats import spearmanr

    pairs = [(s, p) for s, p in zip(scores, perplexities) if _num(s) is not None and _num(p) is not None]
    if len(pairs) < 3:
        return {"rho": None, "n": len(pairs)}
    result = spearmanr([s for s, _ in pairs], [p for _, p in pairs])
    rho = _num(float(result.statistic))
    return {"rho": None if rho is None else -rho, "n": len(pairs)}
