"""Comparisons: pure functions with a tolerance and a verdict, shared by every adapter."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def tensor_differences(released: Mapping[str, torch.Tensor], layerfold: Mapping[str, torch.Tensor], tolerance: float,
                       name: str = "weights", gate: bool = True) -> dict:
    """Max abs difference per tensor of two state dicts; passes when both hold the same names and
    shapes and every difference is within ``tolerance`` (a NaN difference never passes)."""
    per_tensor: dict[str, float] = {}
    only_released = sorted(set(released) - set(layerfold))
    only_layerfold = sorted(set(layerfold) - set(released))
    shape_mismatch = []
    for key in sorted(set(released) & set(layerfold)):
        a, b = released[key], layerfold[key]
        if tuple(a.shape) != tuple(b.shape):
            shape_mismatch.append({"tensor": key, "released": list(a.shape), "layerfold": list(b.shape)})
            continue
        diff = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
        per_tensor[key] = float(diff.max()) if diff.numel() else 0.0
    worst_key = max(per_tensor, key=lambda k: (math.isnan(per_tensor[k]), per_tensor[k]), default=None)
    worst = per_tensor[worst_key] if worst_key is not None else 0.0
    passed = (not only_released and not only_layerfold and not shape_mismatch and bool(per_tensor)
              and all(v <= tolerance for v in per_tensor.values()))
    return {
        "name": name, "what": "max |released - layerfold| of every tensor of the resulting state dict",
        "gate": gate, "passed": passed, "tolerance": tolerance, "max_abs_diff": worst, "worst_tensor": worst_key,
        "tensors_compared": len(per_tensor), "only_in_released": only_released, "only_in_layerfold": only_layerfold,
        "shape_mismatch": shape_mismatch, "per_tensor_max_abs_diff": {k: float(f"{v:.3g}") for k, v in per_tensor.items()},
    }


def same_sequence(name: str, what: str, released: Sequence, layerfold: Sequence, gate: bool = True) -> dict:
    """Exact equality of two decisions (chosen layers, merge windows, accept/reject)."""
    released, layerfold = _plain(released), _plain(layerfold)
    return {"name": name, "what": what, "gate": gate, "passed": released == layerfold, "released": released, "layerfold": layerfold}


def value_differences(name: str, what: str, released: Sequence[float], layerfold: Sequence[float], tolerance: float,
                      gate: bool = True) -> dict:
    """Max abs difference of two equally long lists of scores; a length mismatch or NaN fails."""
    out = {"name": name, "what": what, "gate": gate, "tolerance": tolerance,
           "released": [_num(v) for v in released], "layerfold": [_num(v) for v in layerfold]}
    if len(released) != len(layerfold):
        return {**out, "passed": False, "max_abs_diff": None, "note": f"lengths differ: {len(released)} vs {len(layerfold)}"}
    diffs = [abs(float(a) - float(b)) for a, b in zip(released, layerfold)]
    worst = max(diffs, default=0.0)
    return {**out, "passed": all(d <= tolerance for d in diffs), "max_abs_diff": worst}


def verdict(comparisons: Sequence[dict]) -> bool:
    """A method passes when every gating comparison passes (and there is at least one)."""
    gating = [c for c in comparisons if c.get("gate", True)]
    return bool(gating) and all(c["passed"] for c in gating)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, torch.Tensor)) and np.ndim(value) == 0:
        return int(value)
    return value


def _num(value: Any) -> float | None:
    value = float(value)
    return None if not math.isfinite(value) else float(f"{value:.8g}")
