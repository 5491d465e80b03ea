"""Compensation of what layer removal breaks, applied after any removal method: the ``compensate`` config group.

    dvc exp run -S method=shortgpt -S compensate=prune_comp      # any method that only removes layers

A compensation is one file plus one ``conf/compensate/*.yaml``, registered by name like a method. The
compress stage runs the method, then the compensation, through one call
(:func:`compress_and_compensate`); no method knows about it.

Where the compressed model's stream enters a kept layer whose dense predecessor was removed, it stands
for a different point of the dense model than the layer expects: an **interface**. Layers ``a .. b - 1``
removed in a run leave the stream at dense boundary ``a`` where the next kept layer (dense index ``b``)
expects boundary ``b`` (:func:`interfaces`; a run at the end leaves it before the final norm).

Compensations:

- ``none``: nothing (the default).
- ``prune_comp`` (:mod:`~layerfold.compensate.prune_comp`): Prune&Comp's magnitude rescale, folded into
  the kept layers' output projections. Stock checkpoint.
- ``linear_patch`` (:mod:`~layerfold.compensate.linear_patch`): LinearPatch's Hadamard-rotation +
  channel-scale matrix at each interface. Not expressible by stock layers: saved beside the checkpoint
  (:mod:`layerfold.models.patches`), re-attached by ``layerfold.models.load_checkpoint``.

Both read the dense model's statistics at the interfaces; with a resident model the method has edited
it in place by then, so the dense stack is kept by reference (:class:`~layerfold.surgery.StackSnapshot`:
the layer modules, not copies; removal leaves the kept layers untouched) and put back for that pass.
A compensation applies only to pure removal: a plan whose kept layers were merged, replaced or
re-initialised is refused before anything is written (:func:`check_removal_only`), and ``validate``
refuses every method whose declared edit is not a removal earlier (:func:`compensation_problems`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from layerfold.config import ConfigError, validate
from layerfold.execution.layer_major import Activations, LayerMajorRunner
from layerfold.execution.plan import WeightedLayerPlan
from layerfold.methods import REGISTRY as METHODS
from layerfold.methods import MethodContext, compress, get_method
from layerfold.surgery import StackSnapshot


class CompensationError(ConfigError):
    """A compensation that cannot apply to this method or plan; the message names why and the fix."""


@dataclass(frozen=True)
class Interface:
    """Where the compressed stream enters kept layer ``position`` (the final norm when ``position`` = layers) standing for
    dense boundary ``before`` instead of ``after``: dense layers ``before .. after - 1`` were removed."""

    position: int
    before: int
    after: int

    def to_json(self) -> dict:
        return {"position": self.position, "removed": list(range(self.before, self.after))}


CompensateFn = Callable[["DenseStack", Any, list[Interface]], dict]


@dataclass
class CompensationSpec:
    name: str
    config: type
    fn: CompensateFn
    stock: bool  # whether the output is a stock checkpoint
    layer_major: bool  # whether it runs with hardware=sequential


REGISTRY: dict[str, CompensationSpec] = {}


def register(name: str, config: type, stock: bool, layer_major: bool) -> Callable[[CompensateFn], CompensateFn]:
    def wrap(fn: CompensateFn) -> CompensateFn:
        REGISTRY[name] = CompensationSpec(name, config, fn, stock, layer_major)
        return fn

    return wrap


@dataclass
class NoCompensationConfig:
    name: str = "none"


@register("none", NoCompensationConfig, stock=True, layer_major=True)
def _none(dense: DenseStack, cfg: Any, found: list[Interface]) -> dict:
    return {}


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get_compensation(raw: DictConfig | dict | None) -> tuple[CompensationSpec, DictConfig]:
    """Look up ``raw.name`` (None: ``none``) and validate the rest against that compensation's dataclass."""
    _load_all()
    raw = raw if raw is not None else {"name": "none"}
    name = raw.get("name")
    if name not in REGISTRY:
        raise ConfigError(f"Unknown compensation '{name}'. Registered: {', '.join(sorted(REGISTRY))}. "
                          "Pick one with `dvc exp run -S compensate=<name>`.")
    spec = REGISTRY[name]
    return spec, validate(raw, spec.config, where=f"compensate '{name}'", prefix="compensate.")


# ---------------------------------------------------------------------------------------------------
def _removal_methods() -> str:
    """The registered methods that only remove layers (with the settings that make one do so, where they decide), in words."""
    always = sorted(name for name, spec in METHODS.items() if spec.capabilities.edit == "remove")
    depends = sorted(f"{name} with {spec.capabilities.removes_only_with}" for name, spec in METHODS.items()
                     if callable(spec.capabilities.edit) and spec.capabilities.removes_only_with)
    return ", ".join([*always, *depends])


def compensation_problems(method: DictConfig | dict, compensate: DictConfig | dict | None, hardware: DictConfig | dict | None) -> list[str]:
    """What rules this method/compensation/hardware combination out, before anything runs (empty: fine)."""
    spec, _ = get_compensation(compensate)
    if spec.name == "none":
        return []
    problems = []
    method_spec, method_cfg = get_method(method)
    capabilities = method_spec.capabilities
    if capabilities.edit_of(method_cfg) != "remove":
        problems.append(
            f"compensate={spec.name} compensates removed layers, but method={method_spec.name} {capabilities.edit_description(method_cfg)}: "
            f"the kept layers are no longer the dense model's. Use a method that only removes layers ({_removal_methods()}), "
            "or compensate=none (`-S compensate=none`)."
        )
    if hardware is not None and hardware.get("mode") == "sequential" and not spec.layer_major:
        problems.append(f"compensate={spec.name} keeps its patches in a side file that the layer-by-layer checkpoint writer does not "
                        "write; it cannot run with hardware=sequential. Use hardware=resident (`-S hardware=resident`), or "
                        "compensate=prune_comp (folded into the weights).")
    return problems


def check_removal_only(plan: WeightedLayerPlan, method: str, compensation: str) -> None:
    """Raise :class:`CompensationError` unless every kept layer is one dense layer, unchanged."""
    for k, (group, coefficients, init) in enumerate(zip(plan.groups, plan.coefficients, plan.inits)):
        if len(group) > 1 or coefficients != {group[0]: 1.0} or init is not None:
            what = f"stands for original layers {group}" if len(group) > 1 else "was re-initialised"
            raise CompensationError(
                f"compensate={compensation} compensates removed layers, but after method={method} layer {k} {what}: the method merged or "
                "replaced layers instead of removing them. Nothing was written. Use a method that only removes layers, or compensate=none."
            )


def interfaces(plan: WeightedLayerPlan) -> list[Interface]:
    """The interfaces of a removal-only plan, in order: where a run of removed dense layers ends."""
    kept = [group[0] for group in plan.groups]
    found, previous = [], -1
    for position, original in enumerate(kept + [plan.original_layers]):
        if original - previous > 1:
            found.append(Interface(position, previous + 1, original))
        previous = original
    return found


# ---------------------------------------------------------------------------------------------------
class DenseStack:
    """The context of a compression after its method ran, with a way back to the dense stack for statistics.

    Resident: references to the dense layer modules, taken before the method (no copy); layer-major: the
    original loader under an empty plan.
    """

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.snapshot = None if ctx.is_layer_major else StackSnapshot(ctx.model)

    @contextmanager
    def dense(self) -> Iterator[tuple[LayerMajorRunner, Activations]]:
        """A runner over the dense stack and boundary 0 of the calibration blocks (the compressed stack is back afterwards)."""
        ctx = self.ctx
        if ctx.is_layer_major:
            yield ctx.stack.layers_over(WeightedLayerPlan(ctx.plan.original_layers), ctx.calibration)
            return
        compressed = StackSnapshot(ctx.model)
        self.snapshot.restore()
        try:
            yield ctx.stack.layers_over(ctx.plan, ctx.calibration)
        finally:
            compressed.restore()

    def compressed(self) -> tuple[LayerMajorRunner, Activations]:
        """A runner over the compressed stack as it is now and boundary 0 of the calibration blocks."""
        return self.ctx.layers_over()


def compress_and_compensate(ctx: MethodContext, method: DictConfig | dict, compensate: DictConfig | dict | None) -> dict:
    """The method's ``compress`` then the configured compensation; returns ``plan.json`` content (with ``compensation``)."""
    spec, cfg = get_compensation(compensate)
    if spec.name == "none":
        return compress(ctx, method)
    problems = compensation_problems(method, compensate, {"mode": "sequential"} if ctx.is_layer_major else None)
    if problems:
        raise CompensationError(" ".join(problems))
    dense = DenseStack(ctx)
    plan = compress(ctx, method)
    check_removal_only(ctx.plan, plan["method"]["name"], spec.name)
    found = interfaces(ctx.plan)
    with torch.no_grad():
        details = spec.fn(dense, cfg, found)
    return {**plan, **ctx.plan.to_json(), "compensation": {
        **OmegaConf.to_container(cfg, resolve=True), "stock_checkpoint": spec.stock,
        "interfaces": [i.to_json() for i in found], **details}}


# ---------------------------------------------------------------------------------------------------
# Statistics over a runner's boundaries
def token_rows(hidden: torch.Tensor, ignore_first: int) -> torch.Tensor:
    """``[tokens, d]`` of a ``[batch, seq, d]`` boundary without its first ``ignore_first`` positions."""
    return hidden[:, ignore_first:].reshape(-1, hidden.shape[-1])


def mean_token_norm(acts: Activations, ignore_first: int) -> float:
    """Mean L2 norm of every token the activations hold (float64 sums)."""
    total, count = torch.zeros((), dtype=torch.float64), 0

    def add(batch: int, hidden: torch.Tensor) -> None:
        nonlocal total, count
        rows = token_rows(hidden, ignore_first)
        total += torch.linalg.vector_norm(rows.double(), dim=-1).sum().cpu()
        count += rows.shape[0]

    acts.visit(add)
    return float(total) / max(count, 1)
