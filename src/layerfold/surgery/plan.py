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
