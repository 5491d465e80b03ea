"""A compression plan applied lazily, one layer at a time: the compressed model never exists as a whole.

Every merge layerfold's methods write through :func:`layerfold.surgery.merge_weights` is linear in
the layers' weights (LaCo's RDSC in both forms, MKA's ``alpha`` merge), and so is any sequence of such
merges: each layer of the compressed stack is ``sum_j c_j * theta_j`` over original layers ``j`` for
its linear weights and biases, with the normalisation weights (and anything else) of one *base*
original layer, as :func:`~layerfold.surgery.merge_weights` keeps them. :class:`WeightedLayerPlan`
tracks those coefficients through the same ``remove`` / ``merge(base, others, combine)`` calls the
methods make on a :class:`~layerfold.surgery.LayerPlan`, and writes them into ``plan.json``
(``layers[k].coefficients``, ``layers[k].base``) beside the usual ``stands_for``.

A layer may also *stand in* for others (``stand_in(base, others, init)``: LLM-Streamline's
replacement): it keeps ``base``'s weights (coefficient 1, the others 0) and some of its tensors get new
values, stated as a :class:`~layerfold.models.replacement.TensorInit` (zero attention output, a freshly
drawn FFN from a seeded generator) and written to ``plan.json`` as ``layers[k].init``.

:class:`PlannedLayerLoader` turns such a plan and a loader of the original model into a loader of
the compressed one: new layer ``k`` is loaded as its original layer, or as the weighted sum of its
original layers, then re-initialised where its recipe says, when it is asked for. Merges that are not
elementwise (CoMe's concatenation) and layers of another class (LLM-Streamline's ReLU-MLP replacement)
build new tensors out of reach of a plan; they need the compressed checkpoint itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from transformers import PretrainedConfig

from layerfold.execution.loaders import LayerLoader, StateDict, check_index
from layerfold.models import layer_config
from layerfold.models.adapters import get_adapter
from layerfold.models.replacement import TensorInit
from layerfold.surgery.merge import Combine
from layerfold.surgery.plan import LayerPlan


class PlanError(ValueError):
    """A plan that cannot be applied layer by layer; the message names the layer and the fix."""


@dataclass(frozen=True)
class LayerRecipe:
    """How one layer of the compressed stack is built from the original layers."""

    stands_for: tuple[int, ...]  # original layers, ascending
    coefficients: tuple[float, ...]  # weight of each original layer in the linear weights and biases
    base: int  # the original layer whose other tensors (norms) the new layer keeps
    init: TensorInit | None = None  # new values for some tensors, applied after the weights are built
    concat: bool = False  # a concatenation merge (CoMe): built from the plan's ConcatBuild, not from coefficients
    side: bool = False  # a module of another class (the plan's SideLayer), written to the side file

    @property
    def is_copy(self) -> bool:
        """True when the layer is one original layer unchanged."""
        return len(self.stands_for) == 1 and self.coefficients == (1.0,) and self.init is None and not (self.concat or self.side)


def coefficients_of(combine: Combine, num_others: int) -> list[float]:
    """The weights ``[c_base, c_other_1, ...]`` of a linear ``combine``, read off by feeding it unit vectors.

    A combine that is not linear (its output on random tensors differs from the weighted sum) cannot be
    applied lazily and raises :class:`PlanError`.
    """
    size = num_others + 1
    units = torch.eye(size, dtype=torch.float64)
    weights = combine(units[0], list(units[1:])).tolist()
    probe = torch.randn(size, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = sum(w * p for w, p in zip(weights, probe))
    if not torch.allclose(combine(probe[0], list(probe[1:])), expected, atol=1e-9):
        raise PlanError(f"The merge rule {getattr(combine, '__name__', combine)!r} is not a weighted sum of the layers; a plan can only apply linear merges.")
    return weights


@dataclass(frozen=True, eq=False)
class SideLayer:
    """A plan build that is a whole module of another class (see :meth:`WeightedLayerPlan.swap`)."""

    layer: Any


# How one layer was built, step by step: an original layer index, or ``(combine, base build, other builds)``.
Build = Union[int, tuple[Combine, "Build", tuple["Build", ...]]]


class WeightedLayerPlan(LayerPlan):
    """A :class:`LayerPlan` that also records each layer's merge coefficients over the original layers.

    Beside the coefficients (what ``plan.json`` can hold) it keeps each layer's *builds*: the merge
    rules in the order they were applied. :class:`PlannedLayerLoader` replays them with the
    arithmetic of :func:`~layerfold.surgery.merge_weights` (float32, cast back after every merge), so
    a merged layer equals the one a resident merge writes bit for bit, not only to rounding. ``inits``
    holds each layer's re-initialisation (:meth:`stand_in`), None for most.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        self.coefficients: list[dict[int, float]] = [{i: 1.0} for i in range(num_layers)]
        self.bases: list[int] = list(range(num_layers))
        self.builds: list[Build | None] = list(range(num_layers))
        self.inits: list[TensorInit | None] = [None] * num_layers
        self.concats: list[Any] = [None] * num_layers  # concatenation merges (CoMe), each layer's ConcatBuild or None

    def remove(self, positions) -> None:
        drop = set(positions)
        self.coefficients = [c for i, c in enumerate(self.coefficients) if i not in drop]
        self.bases = [b for i, b in enumerate(self.bases) if i not in drop]
        self.builds = [b for i, b in enumerate(self.builds) if i not in drop]
        self.inits = [t for i, t in enumerate(self.inits) if i not in drop]
        self.concats = [c for i, c in enumerate(self.concats) if i not in drop]
        super().remove(drop)

    def merge(self, base: int, others, combine: Combine | None = None) -> None:
        """Layer ``base`` becomes ``combine(base, others)`` (positions in the current stack); ``others`` are removed.

        Without ``combine`` the plan only records the grouping, as :class:`LayerPlan` does, and the
        merged layer cannot be loaded (the weights are unknown).
        """
        others = [o for o in dict.fromkeys(others) if o != base]  # in the caller's order: merge_weights passes them so
        # A re-initialised layer's weights are not a sum of original layers: merging it leaves the result unknown.
        unknown = combine is None or any(self.coefficients[p] is None or self.inits[p] is not None for p in [base, *others])
        if unknown:
            merged: dict[int, float] | None = None
        else:
            weights = coefficients_of(combine, len(others))
            merged = {}
            for weight, position in zip(weights, [base, *others]):
                for original, c in self.coefficients[position].items():
                    merged[original] = merged.get(original, 0.0) + weight * c
        self.coefficients[base] = merged  # type: ignore[assignment]
        parts = [self.builds[p] for p in [base, *others]]
        known = not unknown and all(b is not None for b in parts)
        self.builds[base] = (combine, parts[0], tuple(parts[1:])) if known else None
        self.inits[base] = None
        self.concats[base] = None
        super().merge(base, others)  # groups; calls self.remove(others), which drops their coefficients

    def stand_in(self, base: int, others, init: TensorInit | None = None) -> None:
        """Layer ``base``, re-initialised by ``init``, stands for itself and ``others`` (positions), which are removed.

        Its weights stay ``base``'s (coefficient 1 on ``base``'s originals, 0 on the others'), then
        ``init`` gives some tensors new values. A layer that already has an init cannot take a second one.
        """
        others = [o for o in dict.fromkeys(others) if o != base]
        if init is not None and self.inits[base] is not None:
            raise PlanError(f"plan layer {base} is already re-initialised ({self.inits[base]}); a second re-initialisation is not supported.")
        if self.coefficients[base] is not None:
            self.coefficients[base] = {**self.coefficients[base], **{original: 0.0 for o in others for original in self.groups[o]}}
        self.inits[base] = init if init is not None else self.inits[base]
        LayerPlan.merge(self, base, others)  # groups only; self.remove(others) drops the others' entries

    def concat(self, base: int, others, build: Any) -> None:
        """Layer ``base`` becomes the concatenation merge ``build`` of itself and ``others`` (positions; a
        :class:`~layerfold.execution.concat.ConcatBuild` over their current builds), which are removed.

        Not a weighted sum: the layer has no coefficients, and it can be built only while this plan is in
        memory (:class:`PlannedLayerLoader` replays the build from the window's layers)."""
        others = [o for o in dict.fromkeys(others) if o != base]
        if any(self.inits[p] is not None for p in [base, *others]):
            raise PlanError(f"plan layers {[base, *others]}: a re-initialised layer cannot be concatenated with others.")
        self.coefficients[base] = None  # type: ignore[assignment]
        self.builds[base] = build
        self.concats[base] = build
        LayerPlan.merge(self, base, others)  # groups; self.remove(others) drops their entries

    def swap(self, base: int, others, layer: Any) -> None:
        """Layer ``base`` becomes ``layer``, a module of a class the architecture does not have (LLM-Streamline's
        ReLU-MLP replacement), standing for itself and ``others`` (positions), which are removed. It has no
        coefficients (``plan.json`` records the grouping only, as resident); :class:`PlannedLayerLoader` lists
        it in ``side_layers`` for the checkpoint writer."""
        others = [o for o in dict.fromkeys(others) if o != base]
        self.coefficients[base] = None  # type: ignore[assignment]
        self.builds[base] = SideLayer(layer)
        self.inits[base] = None
        self.concats[base] = None
        LayerPlan.merge(self, base, others)

    def builds_of(self, positions) -> tuple:
        """The current builds of layers ``positions`` (a concatenation merge needs them all known)."""
        parts = tuple(self.builds[p] for p in positions)
        if any(part is None for part in parts):
            raise PlanError(f"plan layers {list(positions)}: a layer's weights are unknown (merged without a rule); it cannot be concatenated.")
        return parts

    def copy(self) -> WeightedLayerPlan:
        """An independent copy (lists copied, merge rules shared: they are never changed)."""
        other = WeightedLayerPlan(self.original_layers)
        other.groups = [list(g) for g in self.groups]
        other.coefficients = [None if c is None else dict(c) for c in self.coefficients]
        other.bases, other.builds, other.inits = list(self.bases), list(self.builds), list(self.inits)
        other.concats = list(self.concats)
        return other

    def to_json(self) -> dict:
        plan = super().to_json()
        for entry, coefficients, base, init, concat in zip(plan["layers"], self.coefficients, self.bases, self.inits, self.concats):
            if coefficients is not None:
                entry["coefficients"] = [coefficients.get(o, 0.0) for o in entry["stands_for"]]
            entry["base"] = base
            if init is not None:
                entry["init"] = init.to_json()
            if concat is not None:
                entry["concat"] = concat.to_json()
        return plan


def recipes_from_plan(plan: dict, builds: Sequence[Any] | None = None,
                      inits: Sequence[TensorInit | None] | None = None) -> list[LayerRecipe]:
    """One :class:`LayerRecipe` per layer of a ``plan.json``-shaped dict.

    A layer standing for one original layer needs nothing more; a merged layer needs ``coefficients``
    (written by :class:`WeightedLayerPlan`). ``base`` defaults to the first original layer, the one
    :func:`~layerfold.surgery.merge_weights` keeps the norms of in every layerfold method. ``init``
    (optional) is the layer's re-initialisation; ``inits`` (one per layer) replaces what ``plan.json`` says of it
    with the objects a plan still in memory holds (a fold whose values ``plan.json`` only describes).
    """
    recipes = []
    for k, entry in enumerate(plan["layers"]):
        stands_for = tuple(int(i) for i in entry["stands_for"])
        if not stands_for or not all(0 <= i < plan["original_layers"] for i in stands_for):
            raise PlanError(f"plan layer {k} stands for {list(stands_for)}, outside the original layers 0..{plan['original_layers'] - 1}.")
        coefficients = entry.get("coefficients")
        if builds is not None and isinstance(builds[k], SideLayer):
            base = int(entry.get("base", stands_for[0]))
            recipes.append(LayerRecipe(stands_for, tuple(1.0 if i == base else 0.0 for i in stands_for), base, None, side=True))
            continue
        if entry.get("concat") is not None:
            if builds is None or builds[k] is None:
                raise PlanError(
                    f"plan layer {k} is a concatenation merge of original layers {list(stands_for)} (CoMe); its tensors are "
                    "rebuilt only from the plan in memory. Run the compressed checkpoint itself with SafetensorsLayerLoader."
                )
            base = int(entry.get("base", stands_for[0]))
            recipes.append(LayerRecipe(stands_for, tuple(1.0 if i == base else 0.0 for i in stands_for), base, None, concat=True))
            continue
        if coefficients is None:
            if len(stands_for) > 1:
                raise PlanError(
                    f"plan layer {k} merges original layers {list(stands_for)} but records no merge coefficients, so its weights are "
                    "unknown. Build the plan with layerfold.execution.WeightedLayerPlan (merge(base, others, combine)), or run the "
                    "compressed checkpoint itself with SafetensorsLayerLoader."
                )
            coefficients = [1.0]
        if len(coefficients) != len(stands_for):
            raise PlanError(f"plan layer {k}: {len(coefficients)} coefficients for {len(stands_for)} original layers {list(stands_for)}.")
        base = int(entry.get("base", stands_for[0]))
        if base not in stands_for:
            raise PlanError(f"plan layer {k}: base layer {base} is not one of the layers it stands for, {list(stands_for)}.")
        if inits is not None:
            init = inits[k]
        else:
            init = TensorInit.from_json(entry["init"]) if entry.get("init") is not None else None
        recipes.append(LayerRecipe(stands_for, tuple(float(c) for c in coefficients), base, init))
    return recipes


class PlannedLayerLoader:
    """The compressed stack of ``plan`` over ``base`` (a loader of the original model), built layer by layer on request.

    ``plan`` is a :class:`WeightedLayerPlan`, a ``plan.json``-shaped dict, or a list of :class:`LayerRecipe`.
    Merged linear weights are summed in float32 and cast back, as :func:`~layerfold.surgery.merge_weights` does;
    a recipe's ``init`` is applied last, in the requested dtype (the values :class:`TensorInit` gives a resident layer).
    """

    def __init__(self, base: LayerLoader, plan: WeightedLayerPlan | dict | Sequence[LayerRecipe]) -> None:
        # A plan still in memory replays its merges exactly (see WeightedLayerPlan); plan.json has coefficients only.
        self.builds: list[Build | None] | None = list(plan.builds) if isinstance(plan, WeightedLayerPlan) else None
        inits = list(plan.inits) if isinstance(plan, WeightedLayerPlan) else None
        if isinstance(plan, WeightedLayerPlan):
            plan = plan.to_json()
        if isinstance(plan, dict):
            if plan["original_layers"] != base.num_layers:
                raise PlanError(
                    f"The plan describes a model of {plan['original_layers']} original layers but the loaded model has "
                    f"{base.num_layers}; it belongs to another model. Re-run compress on this one."
                )
            plan = recipes_from_plan(plan, self.builds, inits)
        self.base = base
        self.recipes = list(plan)
        self.adapter = get_adapter(base.config)
        for k, recipe in enumerate(self.recipes):
            if not all(0 <= i < base.num_layers for i in recipe.stands_for):
                raise PlanError(f"plan layer {k} stands for {list(recipe.stands_for)}, outside the model's layers 0..{base.num_layers - 1}.")
        self._config = self._planned_config(base.config)
        # layers of another class (the plan's SideLayer modules): not built here, the checkpoint writer puts them in the side file
        self.side_layers = {k: self.builds[k].layer for k, recipe in enumerate(self.recipes) if recipe.side}

    def _planned_config(self, original: PretrainedConfig) -> PretrainedConfig:
        """The original config with the new depth and its layer entries following each layer's base (as ``remove_layers`` keeps them)."""
        return layer_config.trimmed(original, [r.base for r in self.recipes])

    @property
    def config(self) -> PretrainedConfig:
        return self._config

    @property
    def num_layers(self) -> int:
        return len(self.recipes)

    def load_layer(self, index: int, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        check_index(index, self.num_layers)
        if index in self.side_layers:
            raise PlanError(f"plan layer {index} is a layer of another class ({type(self.side_layers[index]).__name__}); it is not "
                            "built from the original layers but stored as it is (side_layers, the checkpoint's side file).")
        state = self._weights(index, device, dtype)
        init = self.recipes[index].init
        return state if init is None else init.apply(state)

    def _weights(self, index: int, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        """Layer ``index`` before its re-initialisation: an original layer, or the weighted sum of its originals."""
        recipe = self.recipes[index]
        if recipe.concat:
            return self._replay(self.builds[index], device, dtype)
        if len(recipe.stands_for) == 1 and recipe.coefficients == (1.0,):
            return self.base.load_layer(recipe.stands_for[0], device, dtype)
        if self.builds is not None and self.builds[index] is not None:
            return self._replay(self.builds[index], device, dtype)
        parts = {i: self.base.load_layer(i, device, dtype) for i, c in zip(recipe.stands_for, recipe.coefficients) if c != 0.0 or i == recipe.base}
        state = dict(parts[recipe.base])
        merged = set(self.adapter.merged_keys(state))
        for key in state:
            if key not in merged:
                continue  # norms stay the base layer's
            total = None
            for i, c in zip(recipe.stands_for, recipe.coefficients):
                if i in parts:  # tensor by tensor: one float32 temporary at a time, never a float32 copy of the layer
                    term = c * parts[i][key].float()
                    total = term if total is None else total + term
            state[key] = total.to(dtype)
        return state

    def _replay(self, build: Build, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        """The layer ``build`` describes, merged as :func:`~layerfold.surgery.merge_weights` merges in place.

        Every tensor outside the norms (:meth:`LayerAdapter.merged_keys`): ``combine(base.float(), [other.float(), ...]).to(dtype)``;
        the norms are the base's.
        """
        if isinstance(build, int):
            return self.base.load_layer(build, device, dtype)
        if hasattr(build, "apply"):  # a concatenation merge (ConcatBuild): the window's layers, then their parts
            return build.apply([self._replay(part, device, dtype) for part in build.parts])
        combine, base, others = build
        state = dict(self._replay(base, device, dtype))
        parts = [self._replay(other, device, dtype) for other in others]
        for key in self.adapter.merged_keys(state):
            state[key] = combine(state[key].float(), [part[key].float() for part in parts]).to(dtype)
        return state

    def load_outer(self, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        return self.base.load_outer(device, dtype)
