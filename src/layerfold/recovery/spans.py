"""From ``plan.json`` to spans: which original layers every layer of the compressed model stands in for.

Student layer ``k`` covers the original layers from the first one it stands for up to (not including)
the first one the next layer stands for; the last layer covers everything to the end. Original layers
that were removed outright are thereby absorbed by the kept layer before them (or by layer 0 when the
first layers were removed), so every student boundary ``k`` lines up with teacher boundary
``span[k].start``, and a layer-local target always exists.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlanMismatchError(ValueError):
    pass


@dataclass(frozen=True)
class Span:
    layer: int  # position in the compressed model
    start: int  # first original layer (teacher boundary entering the span)
    end: int  # one past the last original layer (teacher boundary leaving the span)

    @property
    def is_new(self) -> bool:
        """True when the layer stands in for more than one original layer (merged, replaced or absorbing removals)."""
        return self.end - self.start > 1


def plan_spans(plan: dict, student_layers: int, teacher_layers: int) -> list[Span]:
    """Validate ``plan`` against both models and return one :class:`Span` per student layer."""
    groups = [sorted(entry["stands_for"]) for entry in plan["layers"]]
    if plan["original_layers"] != teacher_layers:
        raise PlanMismatchError(
            f"plan.json describes a model of {plan['original_layers']} original layers but the dense model has {teacher_layers}; "
            "re-run compress on this base model (`dvc repro compress`)."
        )
    if len(groups) != student_layers:
        raise PlanMismatchError(
            f"plan.json lists {len(groups)} layers but the compressed model has {student_layers}; the plan and the "
            "checkpoint come from different runs. Re-run compress (`dvc repro compress`)."
        )
    for k, group in enumerate(groups):
        if not group or group != list(range(group[0], group[-1] + 1)):
            raise PlanMismatchError(f"plan.json layer {k} stands for {group}: layer-local training needs a non-empty run of consecutive original layers.")
        if not all(0 <= g < teacher_layers for g in group):
            raise PlanMismatchError(f"plan.json layer {k} stands for {group}, outside the dense model's layers 0..{teacher_layers - 1}.")
        if k and group[0] <= groups[k - 1][-1]:
            raise PlanMismatchError(f"plan.json layers {k - 1} and {k} stand for {groups[k - 1]} and {group}: spans must follow the original order.")
    starts = [0] + [g[0] for g in groups[1:]]
    ends = starts[1:] + [teacher_layers]
    return [Span(k, s, e) for k, (s, e) in enumerate(zip(starts, ends))]


def trainable_layers(spans: list[Span], trainable: str) -> list[int]:
    """Student layers whose parameters train: ``new`` (spans over several original layers) or ``layers``/``all`` (every layer)."""
    if trainable == "new":
        return [s.layer for s in spans if s.is_new]
    if trainable in ("layers", "all"):
        return [s.layer for s in spans]
    raise ValueError(f"recovery.trainable='{trainable}' is unknown; choose new, layers or all.")
