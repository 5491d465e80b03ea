"""Compression methods, registered by name: a method is one file plus one ``conf/method/*.yaml``.

A method receives a :class:`MethodContext` (model, calibration data, statistics of the dense model)
and edits the model in place through the context's surgery helpers, which keep the :class:`LayerPlan`
in step. It returns a dict of details (scores, choices) that ends up in ``plan.json``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerfold.capture import BoundaryStatistics, capture_statistics
from layerfold.config import ConfigError, validate
from layerfold.models.adapters import LayerAdapter, get_adapter
from layerfold.surgery import LayerPlan, LayerSurgeryError, StackSnapshot, merge_weights, remove_layers
from layerfold.surgery.merge import Combine

MethodFn = Callable[["MethodContext", Any], dict]


@dataclass
class MethodSpec:
    name: str
    config: type
    fn: MethodFn


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, config: type) -> Callable[[MethodFn], MethodFn]:
    def wrap(fn: MethodFn) -> MethodFn:
        REGISTRY[name] = MethodSpec(name, config, fn)
        return fn

    return wrap


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get_method(raw: DictConfig | dict, facts: dict[str, int] | None = None) -> tuple[MethodSpec, DictConfig]:
    """Look up ``raw.name`` and validate the rest against that method's dataclass (ranges on ``facts``)."""
    _load_all()
    name = raw.get("name")
    if name not in REGISTRY:
        raise ConfigError(
            f"Unknown method '{name}'. Registered methods: {', '.join(sorted(REGISTRY))}. "
            "Pick one with `dvc exp run -S method=<name>` (the group, which also sets its settings)."
        )
    spec = REGISTRY[name]
    return spec, validate(raw, spec.config, where=f"method '{name}'", prefix="method.", facts=facts)


@dataclass
class MethodContext:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    calibration: torch.Tensor  # [num_blocks, seq_len] token ids
    stats: BoundaryStatistics | None = None  # statistics of the dense model, from the capture stage
    batch_size: int = 4
    plan: LayerPlan = field(init=False)
    adapter: LayerAdapter = field(init=False)

    def __post_init__(self) -> None:
        self.adapter = get_adapter(self.model)
        self.plan = LayerPlan(self.num_layers)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def layers(self) -> torch.nn.ModuleList:
        return self.adapter.get_layers(self.model)

    def remove(self, positions: list[int]) -> None:
        remove_layers(self.model, positions)
        self.plan.remove(positions)

    def merge(self, base: int, others: list[int], combine: Combine) -> None:
        """Fold layers ``others`` into layer ``base`` with ``combine`` and delete them."""
        merge_weights(self.model, base, others, combine)
        remove_layers(self.model, others)
        self.plan.merge(base, others)

    def replace_merge(self, base: int, others: list[int], state: dict[str, torch.Tensor]) -> None:
        """Layer ``base`` takes ``state`` (a full state dict of one layer, same shapes) and stands for ``others``, which are deleted.

        For merges that build a new layer rather than combining weights elementwise (CoMe's concatenation).
        """
        self.layers()[base].load_state_dict(state, strict=True)
        remove_layers(self.model, others)
        self.plan.merge(base, others)

    @contextmanager
    def trial(self, changed: list[int] = ()) -> Iterator["Trial"]:
        """Try an edit; it is undone on exit unless ``trial.accept()`` was called.

        Only references to the layer modules and clones of the ``changed`` layers are kept, never a
        copy of the model.
        """
        trial = Trial(StackSnapshot(self.model, changed), [list(g) for g in self.plan.groups])
        try:
            yield trial
        finally:
            if not trial.accepted:
                trial.snapshot.restore()
                self.plan.groups = trial.groups

    def capture(self, desc: str | None = None) -> BoundaryStatistics:
        """Statistics of the model as it is *now* (iterative methods re-score after each edit)."""
        return capture_statistics(self.model, self.calibration, self.batch_size, desc)

    def dense_stats(self) -> BoundaryStatistics:
        return self.stats if self.stats is not None else self.capture("capture")


@dataclass
class Trial:
    snapshot: StackSnapshot
    groups: list[list[int]]
    accepted: bool = False

    def accept(self) -> None:
        self.accepted = True


def check_target(ctx: MethodContext, num_remove: int) -> None:
    if num_remove < 1:
        raise ConfigError(f"method.num_remove must be at least 1 (got {num_remove}).")
    if num_remove >= ctx.num_layers:
        raise LayerSurgeryError(
            f"method.num_remove={num_remove} would remove all {ctx.num_layers} layers; choose at most {ctx.num_layers - 1}."
        )


def compress(ctx: MethodContext, raw_cfg: DictConfig | dict) -> dict:
    """Run the configured method on ``ctx`` and return ``plan.json`` content."""
    spec, cfg = get_method(raw_cfg)
    details = spec.fn(ctx, cfg)
    return {"method": OmegaConf.to_container(cfg, resolve=True), **ctx.plan.to_json(), "details": details}
