"""Compression methods, registered by name: a method is one file plus one ``conf/method/*.yaml``.

A method receives a :class:`MethodContext` (model, calibration data, statistics of the dense model),
states its edits through the context (which keeps the plan in step) and asks the context for what it
measures; the context answers resident or layer-major (``hardware=sequential``), so a method has one
body for both. It returns a dict of details (scores, choices) that ends up in ``plan.json``.
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
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerfold.capture import BoundaryStatistics
from layerfold.config import ConfigError, validate
from layerfold.execution.layer_major import Activations, LayerMajorRunner
from layerfold.capture.channels import ChannelStatistics
from layerfold.execution.concat import ConcatBuild
from layerfold.execution.loaders import LayerLoader
from layerfold.execution.plan import PlanError, WeightedLayerPlan
from layerfold.execution.trials import LayerMajorStack, ResidentStack, Stack
from layerfold.models.adapters import LayerAdapter, get_adapter
from layerfold.models.replacement import TensorInit
from layerfold.surgery import LayerSurgeryError, StackSnapshot, mergeable, remove_layers
from layerfold.surgery.concat import ConcatChoice, ConcatLayout
from layerfold.surgery.merge import Combine
from layerfold.surgery.support import Family, removal_refusal

MethodFn = Callable[["MethodContext", Any], dict]
EDITS = ("remove", "merge", "concat", "replace")


def _setting(value: Any, cfg: Any) -> Any:
    """A declared value that may depend on the method's settings: a callable of the validated config, or the value itself."""
    return value(cfg) if callable(value) else value


@dataclass(frozen=True)
class CaptureReads:
    """What a method reads from the capture stage's statistics of the dense model (:class:`BoundaryStatistics`).

    ``statistics``: the fields it reads (``cosine``, ``last_token_angular``, ``sample_features``); empty for a
    method that measures the model itself. ``cosine_distance``: how many layers apart the boundaries lie whose
    mean token cosine it reads (an int, a callable of the config, or None when it reads none); the capture keeps
    boundary pairs up to ``capture.max_distance`` apart, which must reach it (:func:`check_capture_reach`).
    """

    statistics: tuple[str, ...] = ()
    cosine_distance: int | Callable[[Any], int | None] | None = None

    def distance(self, cfg: Any) -> int | None:
        return _setting(self.cosine_distance, cfg)


@dataclass(frozen=True)
class MethodCapabilities:
    """What a method does and needs, declared on :func:`register` and read by ``validate``, ``compress``, ``capture``,
    compensation and the family checks, so that no code outside the method's file names the method.

    - ``edit``: what it does to layers: ``remove`` (deletes layers, the kept ones unchanged), ``merge`` (combines
      weights of layers of one structure), ``concat`` (builds one layer from a window by concatenation), ``replace``
      (a kept layer gets new tensors or a new class); a callable of the config when the settings decide. A
      compensation applies only to ``remove``. ``edit_note`` says what a non-removal edit is, for refusals (default: by kind);
      ``removes_only_with`` names the settings under which a settings-dependent edit is a removal (for the same refusals).
    - ``layer_major``: whether it runs layer by layer (``hardware=sequential``): a bool, or a callable of the config
      returning why these settings cannot (None: they can).
    - ``reads``: the capture statistics it reads (:class:`CaptureReads`).
    - ``writes_side_layers``: a callable of the config returning, when the checkpoint it writes holds a layer of a class no
      stock architecture has (a side file, which only the resident loader reads), ``(the settings that do so, the
      settings that write stock layers instead)``; None when it writes stock layers only.
    - ``needs_training``: whether the compressed model holds freshly initialised weights that only recovery trains
      (a bool or a callable of the config).
    - ``family_refusal``: a callable ``(family, cfg)`` returning why the edit cannot be made on a model family
      (:class:`layerfold.surgery.support.Family`, read from the config alone), or None.
    """

    edit: str | Callable[[Any], str] = "remove"
    edit_note: str | Callable[[Any], str] | None = None
    removes_only_with: str | None = None
    layer_major: bool | Callable[[Any], str | None] = True
    reads: CaptureReads = CaptureReads()
    writes_side_layers: Callable[[Any], tuple[str, str] | None] | None = None
    needs_training: bool | Callable[[Any], bool] = False
    family_refusal: Callable[[Any, Any], str | None] | None = None

    def __post_init__(self) -> None:
        if not callable(self.edit) and self.edit not in EDITS:
            raise ValueError(f"MethodCapabilities.edit={self.edit!r}: use one of {EDITS} or a callable of the config")

    def edit_of(self, cfg: Any) -> str:
        return _setting(self.edit, cfg)

    def edit_description(self, cfg: Any) -> str:
        """What a non-removal edit does to the kept layers, in words (for a refusal)."""
        note = _setting(self.edit_note, cfg)
        return note if note is not None else _EDIT_WORDS[self.edit_of(cfg)]

    def layer_major_blocker(self, cfg: Any) -> str | None:
        """Why these settings cannot run layer by layer, or None (the method's name is the caller's to add)."""
        if callable(self.layer_major):
            return self.layer_major(cfg)
        return None if self.layer_major else "has not been written against the layer-major context"

    def side_layers(self, cfg: Any) -> tuple[str, str] | None:
        return None if self.writes_side_layers is None else self.writes_side_layers(cfg)

    def trains(self, cfg: Any) -> bool:
        return bool(_setting(self.needs_training, cfg))


_EDIT_WORDS = {"remove": "removes layers", "merge": "merges layers", "concat": "merges layers by concatenation",
               "replace": "replaces layers"}

# A method's checks that need the model or the calibration data, beyond its config's field ranges:
# ``problems(cfg, facts, params)`` -> refusals (each naming key, value, range and fix), run by ``validate``.
ProblemsFn = Callable[[Any, Any, Any], list[str]]


@dataclass
class MethodSpec:
    name: str
    config: type
    fn: MethodFn
    capabilities: MethodCapabilities = MethodCapabilities()
    problems: ProblemsFn | None = None


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, config: type, *, capabilities: MethodCapabilities, problems: ProblemsFn | None = None
             ) -> Callable[[MethodFn], MethodFn]:
    """Register method ``name`` with its config dataclass, what it can do (``capabilities``) and its model checks (``problems``)."""
    def wrap(fn: MethodFn) -> MethodFn:
        REGISTRY[name] = MethodSpec(name, config, fn, capabilities, problems)
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
    """What a method works on: the model (or, layer-major, its skeleton), calibration data and dense statistics.

    Edits go through :meth:`remove` / :meth:`merge` / :meth:`stand_in` (which keep :attr:`plan` in step) and measurements
    through :meth:`calibration_nll`, :meth:`removal_nll`, :meth:`final_representations` and
    :meth:`capture`; the :attr:`stack` answers them resident (the model edited in place) or layer-major
    (``hardware=sequential``: the plan applied lazily, one layer on the device at a time), so a method
    is written once. Build a layer-major context with :meth:`layer_major`; there ``model`` is a skeleton
    whose decoder layers hold no weights (config, adapter and layer count only). ``seed`` (the stage's
    ``runtime.seed``) seeds every fresh weight a method draws, so both modes draw the same.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    calibration: torch.Tensor  # [num_blocks, seq_len] token ids
    stats: BoundaryStatistics | None = None  # statistics of the dense model, from the capture stage
    batch_size: int = 4
    stack: Stack | None = None  # None: resident on ``model``
    seed: int = 0  # seeds freshly drawn weights (TensorInit.seed), not the global RNG
    plan: WeightedLayerPlan = field(init=False)
    adapter: LayerAdapter = field(init=False)

    def __post_init__(self) -> None:
        if self.stack is None:
            self.stack = ResidentStack(self.model, self.batch_size)
        self.adapter = get_adapter(self.model)
        self.plan = WeightedLayerPlan(self.num_layers)

    @classmethod
    def layer_major(cls, loader: LayerLoader, tokenizer: PreTrainedTokenizerBase, calibration: torch.Tensor, hardware: Any,
                    device: torch.device | str, dtype: torch.dtype, stats: BoundaryStatistics | None = None, batch_size: int = 4,
                    seed: int = 0) -> MethodContext:
        """A context over ``loader``'s model that never loads it whole (``hardware`` = the ``hardware`` config section)."""
        stack = LayerMajorStack(loader, hardware, device, dtype, batch_size)
        return cls(stack.model, tokenizer, calibration, stats, batch_size, stack=stack, seed=seed)

    @property
    def is_layer_major(self) -> bool:
        return bool(self.stack.layer_major)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    @property
    def device(self) -> torch.device:
        return self.stack.device

    def layers(self) -> torch.nn.ModuleList:
        return self.adapter.get_layers(self.model)

    def remove(self, positions: list[int]) -> None:
        self.stack.remove(positions)
        self.plan.remove(positions)

    def mergeable(self, positions: list[int]) -> bool:
        """Whether the layers at ``positions`` share one structure, so that :meth:`merge` can combine them weight by
        weight (a dense layer and a mixture-of-experts layer cannot be merged); resident or layer-major alike."""
        return mergeable(self.model, positions)

    def merge(self, base: int, others: list[int], combine: Combine) -> None:
        """Fold layers ``others`` into layer ``base`` with ``combine`` and delete them."""
        self.stack.merge(base, others, combine)
        try:
            self.plan.merge(base, others, combine)
        except PlanError:
            if self.is_layer_major:
                raise
            self.plan.merge(base, others)  # resident: the model holds the weights; the plan records the grouping

    def stand_in(self, base: int, others: list[int], init: TensorInit | None = None) -> None:
        """Layer ``base``, with the tensors ``init`` names given new values, stands for itself and ``others``, which are deleted.

        Resident: ``init`` is applied to the layer in place. Layer-major: the plan records it and
        :class:`~layerfold.execution.PlannedLayerLoader` applies it whenever the layer is built, with the
        same values (LLM-Streamline's replacements).
        """
        self.stack.stand_in(base, others, init)
        self.plan.stand_in(base, others, init)

    def swap_layer(self, base: int, others: list[int], layer: nn.Module) -> None:
        """Layer ``base`` becomes the module ``layer`` (any class) and stands for ``others``, which are deleted.

        For layers no stock class expresses (LLM-Streamline's ReLU-MLP replacement). Resident: the layer is put
        in the model. Layer-major: the plan carries the module (one layer, on the host) and the checkpoint
        writer stores it in the side file (:func:`layerfold.execution.save_layerwise`).
        """
        if not self.is_layer_major:
            self.layers()[base] = layer
        remove_layers(self.model, others)
        self.plan.swap(base, others, layer)

    def replace_merge(self, base: int, others: list[int], state: dict[str, torch.Tensor]) -> None:
        """Layer ``base`` takes ``state`` (a full state dict of one layer, same shapes) and stands for ``others``, which are deleted.

        For merges that build a new layer rather than combining weights elementwise (CoMe's concatenation).
        """
        self._resident_only("a merge that builds a new layer (replace_merge)")
        self.layers()[base].load_state_dict(state, strict=True)
        remove_layers(self.model, others)
        self.plan.merge(base, others)

    def concat_merge(self, base: int, others: list[int], layout: ConcatLayout, choice: ConcatChoice, norms: str) -> None:
        """Layer ``base`` becomes the concatenation merge of the window ``[base, *others]`` (CoMe; see
        :func:`layerfold.surgery.concat.concat_merge_layers`) and ``others`` are deleted. Resident: the merged
        layer is written in place; layer-major: the plan records it and builds it whenever it is asked for."""
        positions = [base, *others]
        build = ConcatBuild(self.plan.builds_of(positions), layout, choice, norms)
        self.stack.concat(positions, build)
        self.plan.concat(base, others, build)

    def channel_statistics(self, window: int, skip_tokens: str, desc: str | None = None, **options: Any) -> ChannelStatistics:
        """CoMe's per-channel and per-layer statistics of the model as it is *now* (one calibration pass)."""
        return self.stack.channel_statistics(self.plan, self.calibration, window, skip_tokens, desc, **options)

    def layer_tensors(self, position: int, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors (state-dict names relative to the layer) of layer ``position`` as it is *now*."""
        return self.stack.layer_tensors(self.plan, position, names)

    @contextmanager
    def trial(self, changed: list[int] = ()) -> Iterator["Trial"]:
        """Try an edit; it is undone on exit unless ``trial.accept()`` was called.

        Only references to the layer modules and clones of the ``changed`` layers are kept, never a
        copy of the model (layer-major: the layers are meta, so only the plan is copied).
        """
        trial = Trial(StackSnapshot(self.model, changed), self.plan.copy())
        try:
            yield trial
        finally:
            if not trial.accepted:
                trial.snapshot.restore()
                self.plan = trial.plan

    # Measurements of the model as it is *now* (the plan so far), resident or layer-major.
    def calibration_nll(self) -> float:
        """Mean next-token NLL over the calibration blocks (SLEB's criterion)."""
        return self.stack.calibration_nll(self.plan, self.calibration)

    def removal_nll(self, positions: list[int], desc: str | None = None) -> dict[int, float]:
        """``{i: calibration_nll without layer i}`` for each position, the shared prefix run once."""
        return self.stack.removal_nll(self.plan, self.calibration, positions, desc)

    def final_representations(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Final-norm hidden states ``[seq, hidden]`` (float32) of each token sequence (LaCo's criterion)."""
        return self.stack.final_representations(self.plan, inputs)

    def capture(self, desc: str | None = None) -> BoundaryStatistics:
        """Statistics of the model as it is *now* (iterative methods re-score after each edit)."""
        return self.stack.capture(self.plan, self.calibration, desc)

    def layers_over(self, blocks: torch.Tensor | None = None) -> tuple[LayerMajorRunner, Activations]:
        """A layer-major runner over the model as it is now and boundary 0 of ``blocks`` (default: the calibration blocks).

        For measurements that need a hand between layers (ReplaceMe's MLP output of one layer, a
        compensation that rescales the stream at a boundary): run layers with ``run_layers`` and read or
        change the activations between calls. Resident, the runner reads the model's tensors in place;
        layer-major, it is the planned stack of :meth:`LayerMajorStack.stack`.
        """
        return self.stack.layers_over(self.plan, self.calibration if blocks is None else blocks)

    def dense_stats(self) -> BoundaryStatistics:
        return self.stats if self.stats is not None else self.capture("capture")

    def _resident_only(self, what: str) -> None:
        if self.is_layer_major:
            raise LayerMajorUnsupported(f"{what} needs the resident model; it cannot run with hardware=sequential. Use hardware=resident.")


@dataclass
class Trial:
    snapshot: StackSnapshot
    plan: WeightedLayerPlan  # the plan before the trial
    accepted: bool = False

    def accept(self) -> None:
        self.accepted = True


class LayerMajorUnsupported(ConfigError):
    """A method (or one of its settings) that cannot run with ``hardware=sequential``; the message names the fix."""


def final_norm_blocker(cfg: Any) -> str | None:
    """``MethodCapabilities.layer_major`` of a method with a ``top_boundary`` setting: ``final_norm`` reads the final
    norm's output in an extra pass over the resident model, which layer by layer has no such pass."""
    if cfg.top_boundary == "final_norm":
        return (f"method.top_boundary=final_norm (method={cfg.name}) reads the final norm's output in an extra pass over the resident "
                "model; use hardware=resident, or method.top_boundary=pre_norm")
    return None


def check_layer_major(raw_cfg: DictConfig | dict) -> None:
    """Fail before anything is loaded when the configured method cannot run with ``hardware=sequential``."""
    spec, cfg = get_method(raw_cfg)
    why = spec.capabilities.layer_major_blocker(cfg)
    if why is not None:
        if not callable(spec.capabilities.layer_major):
            why = f"method={spec.name} {why} (layerfold.methods.MethodContext measurements)"
        raise LayerMajorUnsupported(f"{why}; it cannot run with hardware=sequential. Use hardware=resident (`-S hardware=resident`), "
                                    "on a device that holds the whole model.")


def check_capture_reach(raw_cfg: DictConfig | dict, max_distance: int | None) -> None:
    """The capture must keep the boundary pairs the method reads (``capture.max_distance``), or compress would fail later."""
    spec, cfg = get_method(raw_cfg)
    needed = spec.capabilities.reads.distance(cfg)
    if max_distance is not None and needed is not None and needed > max_distance:
        raise ConfigError(
            f"capture.max_distance={max_distance} keeps the token cosine of boundaries at most {max_distance} layers apart, but "
            f"method={spec.name} with these settings reads boundaries {needed} apart. Set capture.max_distance >= {needed} "
            f"(`-S capture.max_distance={needed}`), or null for every pair."
        )


def family_refusal(family: Family, raw_cfg: DictConfig | dict) -> str | None:
    """Why the configured method cannot run on model ``family`` (:class:`layerfold.surgery.support.Family`), or None:
    the removal every method makes, then the method's own declared refusal."""
    spec, cfg = get_method(raw_cfg)
    why = removal_refusal(family)
    if why is None and spec.capabilities.family_refusal is not None:
        why = spec.capabilities.family_refusal(family, cfg)
    return why


def check_target(ctx: MethodContext, num_remove: int) -> None:
    if num_remove < 1:
        raise ConfigError(f"method.num_remove must be at least 1 (got {num_remove}).")
    if num_remove >= ctx.num_layers:
        raise LayerSurgeryError(
            f"method.num_remove={num_remove} would remove all {ctx.num_layers} layers; choose at most {ctx.num_layers - 1}."
        )


def compress(ctx: MethodContext, raw_cfg: DictConfig | dict) -> dict:
    """Run the configured method on ``ctx`` and return ``plan.json`` content."""
    if ctx.is_layer_major:
        check_layer_major(raw_cfg)
    spec, cfg = get_method(raw_cfg)
    details = spec.fn(ctx, cfg)
    return {"method": OmegaConf.to_container(cfg, resolve=True), **ctx.plan.to_json(), "details": details}
