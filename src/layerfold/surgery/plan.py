"""The plan: for every layer of the compressed model, the original layers it stands for."""

from __future__ import annotations

from collections.abc import Iterable


class LayerPlan:
    """Kept in lockstep with the layer stack by every surgery call, so it can never drift from the model."""

    def __init__(self, num_layers: int) -> None:
        self.groups: list[list[int]] = [[i] for i in range(num_layers)]
        self.original_layers = num_layers

    def remove(self, positions: Iterable[int]) -> None:
        drop = set(positions)
        self.groups = [g for i, g in enumerate(self.groups) if i not in drop]

    def merge(self, base: int, others: Iterable[int]) -> None:
        """Layer ``base`` absorbs ``others`` (positions in the current stack), which are then removed."""
        others = sorted(set(others) - {base})
        self.groups[base] = sorted(self.groups[base] + [o for i in others for o in self.groups[i]])
        self.remove(others)

    def removed(self) -> list[int]:
        """Original layers that no new layer stands for (pure deletions)."""
        kept = {o for g in self.groups for o in g}
        return [i for i in range(self.original_layers) if i not in kept]

    def to_json(self) -> dict:
        return {
            "original_layers": self.original_layers,
            "layers": [{"index": i, "stands_for": g} for i, g in enumerate(self.groups)],
            "merged": [g for g in self.groups if len(g) > 1],
            "removed": self.removed(),
        }


def _spans(layers: Iterable[int], joiner: str = ", ") -> str:
    """``[11, 12, 13, 14, 20]`` -> ``"11-14, 20"`` (runs of three or more as a range)."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return joiner.join(f"{r[0]}-{r[-1]}" if len(r) > 2 else joiner.join(map(str, r)) for r in runs)


def describe_plan(plan: dict, most: int = 5) -> str:
    """A plan (``plan.json``'s dict) in one line: ``removed layers 11-18 (8 of 30); merged 23+24+25 -> 23``.

    At most ``most`` merges are named (the rest counted), so the line stays short on deep models; the whole
    plan is in ``plan.json``.
    """
    original, removed = plan["original_layers"], plan.get("removed") or []
    parts = [f"removed layer{'s' if len(removed) > 1 else ''} {_spans(removed)} ({len(removed)} of {original})"] if removed else []
    merges = [layer for layer in plan["layers"] if len(layer["stands_for"]) > 1]
    named = [f"{_spans(m['stands_for'], '+')} -> {m['index']}" for m in merges[:most]]
    if len(merges) > most:
        named.append(f"{len(merges) - most} more")
    if merges:
        parts.append(f"merged {', '.join(named)} ({sum(len(m['stands_for']) for m in merges)} of {original} layers into {len(merges)})")
    return "; ".join(parts) or f"all {original} layers kept"
