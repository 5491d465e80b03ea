"""Recovery's optimiser, schedule and losses as configurable components (Hydra's ``_target_`` + ``instantiate``).

Each component is a section of ``params.recovery`` naming a class or function by its dotted path and, beside it,
any keyword arguments of its own::

    optimizer: {_target_: torch.optim.AdamW}                                  # recovery.optimizer
    schedule: {_target_: layerfold.recovery.schedule.cosine_with_warmup}      # recovery.schedule
    local: {criterion: {_target_: layerfold.recovery.losses.LocalLoss}}       # recovery.local.criterion
    end_to_end: {criterion: {_target_: layerfold.recovery.losses.EndToEndLoss}}  # recovery.end_to_end.criterion

The flat recovery keys stay the one place for the values every preset, sweep and document sets (``lr``, ``beta1``,
``warmup_ratio``, ``local.loss``, ``end_to_end.kd_weight``, ...): :data:`READS` says which keyword argument each
component receives from which of them. A component's section may not set those arguments itself (two places for one
value); the engine's own arguments (the parameters to optimise, the optimiser to schedule, the number of steps) are
not settings either. Every argument the engine offers is passed only where the target's signature names it, so a
component that takes fewer (``torch.optim.SGD`` has no ``betas``) still builds.

How each kind is called:

- optimizer: ``target(param_groups, **kwargs)``; the second group (biases, norms) carries ``weight_decay=0``.
- schedule: ``target(optimizer, **kwargs)``, offered ``total_steps`` (optimiser steps of the phase); stepped once per
  optimiser step.
- local criterion: ``criterion(student_hidden, teacher_hidden) -> scalar`` for each trained span.
- end-to-end criterion: ``criterion(logits, input_ids, teacher_logits) -> scalar``; the teacher runs only when the
  criterion's ``needs_teacher`` is true.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Hydra's own keys in a component's section (not arguments of the target).
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
COMPONENTS = ("optimizer", "schedule", "local.criterion", "end_to_end.criterion")


def _local(cfg: Any) -> dict[str, Any]:
    local = cfg.local
    return {"kind": local.loss, "temperature": float(local.temperature), "ignore_first": int(local.ignore_first),
            "max_norm_ratio": None if local.get("max_norm_ratio") is None else float(local.max_norm_ratio)}


def _end_to_end(cfg: Any) -> dict[str, Any]:
    e2e = cfg.end_to_end
    return {"lm_weight": e2e.lm_weight, "kd_weight": e2e.kd_weight, "kd_temperature": e2e.kd_temperature, "kd_top_k": e2e.get("kd_top_k")}


# component -> (the keyword arguments it reads from the flat keys, the flat keys they come from)
READS: dict[str, tuple[Callable[[Any], dict[str, Any]], dict[str, str]]] = {
    "optimizer": (lambda cfg: {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "weight_decay": cfg.weight_decay},
                  {"lr": "recovery.lr", "betas": "recovery.beta1 and recovery.beta2", "weight_decay": "recovery.weight_decay"}),
    "schedule": (lambda cfg: {"warmup_ratio": cfg.warmup_ratio, "min_lr": cfg.min_lr},
                 {"warmup_ratio": "recovery.warmup_ratio", "min_lr": "recovery.min_lr"}),
    "local.criterion": (_local, {"kind": "recovery.local.loss", "temperature": "recovery.local.temperature",
                                 "ignore_first": "recovery.local.ignore_first", "max_norm_ratio": "recovery.local.max_norm_ratio"}),
    "end_to_end.criterion": (_end_to_end, {k: f"recovery.end_to_end.{k}" for k in ("lm_weight", "kd_weight", "kd_temperature", "kd_top_k")}),
}
# What the engine passes that is no setting: component -> argument names.
SUPPLIED = {"optimizer": ("params",), "schedule": ("optimizer", "total_steps"), "local.criterion": (), "end_to_end.criterion": ()}


def _section(cfg: Any, component: str) -> Any:
    return OmegaConf.select(cfg, component) if isinstance(cfg, DictConfig) else cfg[component]


def _target(section: Any) -> Callable[..., Any]:
    from hydra.utils import get_object

    return get_object(section["_target_"])


def _accepts(target: Callable[..., Any]) -> Callable[[str], bool]:
    """Whether ``target`` takes a keyword argument of a given name (anything, when it takes ``**kwargs`` or hides its signature)."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return lambda name: True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return lambda name: True
    return lambda name: name in params and params[name].kind is not inspect.Parameter.POSITIONAL_ONLY


def component_problems(cfg: Any) -> list[str]:
    """What is wrong with the component sections of ``cfg`` (``params.recovery``): each message names the key, the
    value and the fix. A section absent from ``cfg`` is not judged (the dataclass supplies it when params are parsed)."""
    problems = []
    for component in COMPONENTS:
        section = _section(cfg, component)
        if section is None:
            continue
        key = f"recovery.{component}"
        target = section.get("_target_")
        if not isinstance(target, str) or not target:
            problems.append(f"{key} has no _target_ (the dotted path of a class or function, e.g. {key}._target_="
                            f"{_default_target(component)}); set one.")
            continue
        try:
            built = _target(section)
        except Exception as err:  # hydra wraps the ImportError / AttributeError of the path
            cause = str(err.__cause__ or err).splitlines()[0][:160]
            problems.append(f"{key}._target_={target!r} does not import ({cause}). Fix the dotted path "
                            f"(default: {_default_target(component)}).")
            continue
        if not callable(built):
            problems.append(f"{key}._target_={target!r} is not callable; name a class or a function (default: {_default_target(component)}).")
            continue
        accepts = _accepts(built)
        reads = READS[component][1]
        for name in (str(k) for k in section if str(k) not in HYDRA_KEYS):
            value = section[name]
            if name in reads:
                problems.append(f"{key}.{name}={value!r}: {key} reads {name} from {reads[name]}; set that instead and remove {key}.{name}.")
            elif name in SUPPLIED[component]:
                problems.append(f"{key}.{name}={value!r}: the recovery engine passes {name} itself; remove {key}.{name}.")
            elif not accepts(name):
                problems.append(f"{key}.{name}={value!r} is not a parameter of {target}; remove it, or choose a {key}._target_ that takes it.")
    return problems


def _default_target(component: str) -> str:
    from layerfold.config import RecoveryConfig

    return OmegaConf.select(OmegaConf.structured(RecoveryConfig), component)["_target_"]


def build(cfg: Any, component: str, *args: Any, **supplied: Any) -> Any:
    """Instantiate ``component`` of ``cfg`` (``params.recovery``) with ``args``, the engine's ``supplied`` arguments and
    what it reads from the flat keys, each keyword only where the target takes it."""
    from hydra.utils import instantiate

    section = _section(cfg, component)
    accepts = _accepts(_target(section))
    offered = {**READS[component][0](cfg), **supplied}
    factory = instantiate(section, _partial_=True, _convert_="all")
    return factory(*args, **{name: value for name, value in offered.items() if accepts(name)})
