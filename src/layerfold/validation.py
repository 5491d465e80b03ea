"""The whole configuration checked against the model before a stage deletes or writes anything.

:func:`layerfold.config.load_params` checks keys, types and fixed ranges. What needs the model —
sequence lengths within its context, a target depth below its depth, an architecture layerfold has
an adapter for — is checked here once the model's facts are known: from the source's config or
file header (``validate`` stage, ``scripts/compose_params.py``, the ``base`` stage), or from the
written ``artifacts/base/config.json`` (every later stage).

DVC deletes a stage's outputs just before running it, and ``cache: false`` metrics cannot be checked
out again, so every check whose inputs are params and the model's config belongs here, not in the
stage that would otherwise find the problem: a method's own settings against the depth, the
architecture and the calibration samples (CoMe's reachable target, MKA's samples per draw,
LLM-Streamline's replacement), recovery's settings, the lm-eval task names against the benchmarks the
data stage prepares, and whether ``model.name`` names the weights ``model`` reads. Stages keep their own
checks as a second line. :func:`check_runtime` (is the configured device there?) runs in the
``validate`` stage and at every stage start, not in :func:`check`, which also judges params composed
on one machine for another (``scripts/compose_params.py``, the comparison queue).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, ListConfig

from layerfold.config import MODEL_SOURCE_KEYS, ConfigError, Params, check_ranges, derived_model_name, range_problems
from layerfold.export.checks import export_problems
from layerfold.methods import MethodSpec, check_capture_reach, check_layer_major, family_refusal, get_method
from layerfold.models.facts import ModelFacts
from layerfold.recovery.layer_major import layer_major_blocker
from layerfold.surgery.support import family_of, recovery_refusal

# The model presets (conf/model/*.yaml): a preset's name names that preset's weights.
MODEL_PRESETS = Path(__file__).resolve().parents[2] / "conf" / "model"


def check(params: DictConfig, facts: ModelFacts | None, where: str = "params.yaml") -> None:
    """Raise :class:`ConfigError` (or ``UnsupportedArchitectureError``) for anything the model rules out.

    With ``facts=None`` only what needs no model is checked (the method's own schema and ranges, recovery's
    settings, the benchmark and task names).
    """
    refused = _family_problems(params, facts)
    if refused:  # the later checks assume a family that supports the method: report what else is wrong, then stop
        problems = [*refused, *_recovery_problems(params), *_data_problems(params), *_model_name_problems(params)]
        raise ConfigError(f"{where}: " + (problems[0] if len(problems) == 1 else "\n  ".join(["invalid settings:", *problems])))
    bounds = facts.bounds() if facts is not None else {}
    spec, method_cfg = get_method(params.method, bounds)
    check_capture_reach(params.method, (params.get("capture") or {}).get("max_distance"))
    _check_headline(params)
    _check_compensation_and_selectors(params, facts)
    if params.get("hardware") is not None and params.hardware.get("mode") == "sequential":
        check_layer_major(params.method)  # a method that needs the resident model stops here, not mid-compress
        _check_recovery_layer_major(params)  # and so does a recovery that needs the whole student
        _check_eval_layer_major(params)  # and lm-eval settings the layer-by-layer scorer cannot honour
        _check_side_layers_layer_major(params)  # and a checkpoint the later stages cannot read layer by layer
    problems = [*_recovery_problems(params), *_data_problems(params)]
    if facts is not None:
        check_ranges(_settings_that_run(params), Params, where, facts=bounds)
        problems += [*_cross_field_problems(params, facts), *_method_problems(spec, method_cfg, params, facts),
                     *_model_name_problems(params), *export_problems(params, facts)]
    if problems:
        raise ConfigError(f"{where}: " + (problems[0] if len(problems) == 1 else "\n  ".join(["invalid settings:", *problems])))


def check_for_model(params: DictConfig, facts: ModelFacts, where: str) -> None:
    """:func:`check` for a caller that compresses or recovers a model in hand (:mod:`layerfold.api`): everything that
    needs no model, then the family, the method, the calibration data and recovery against ``facts``. The model preset,
    evaluation and export sections, which such a caller does not run, are not judged against this model."""
    check(params, None, where)
    problems = _family_problems(params, facts)
    if not problems:
        spec, method_cfg = get_method(params.method, facts.bounds())  # the method's ranges (num_remove < num_layers, ...)
        problems = _method_problems(spec, method_cfg, params, facts)
    ran = _settings_that_run(params)
    problems += list(range_problems({key: ran[key] for key in ("data", "capture", "recovery") if key in ran}, Params, "", facts.bounds()))
    if problems:
        raise ConfigError(f"{where}: " + (problems[0] if len(problems) == 1 else "\n  ".join(["invalid settings:", *problems])))


def _settings_that_run(params: DictConfig) -> DictConfig | dict:
    """``params`` for the model-dependent range check: with ``recovery=none`` recovery's other settings are the schema's
    defaults (conf/recovery/none.yaml sets only the name) and never run, so they are not judged against the model."""
    recovery = params.get("recovery")
    if recovery is None or recovery.get("name", "none") != "none":
        return params
    return {**{key: params[key] for key in params}, "recovery": {"name": "none"}}


def check_runtime(params: DictConfig) -> None:
    """Refuse a ``runtime.device`` this machine does not have (torch would fail later with a bare AssertionError)."""
    device = str(params.runtime.device)
    fix = "Use runtime.device=auto (the GPU when there is one, else the CPU) or cpu (`-S runtime.device=auto`)."
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else f"no CUDA device is visible (torch {torch.__version__}, CUDA {torch.version.cuda})")
            raise ConfigError(f"runtime.device={device}, but {why}. {fix}")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"runtime.device={device}, but only {torch.cuda.device_count()} CUDA device(s) are visible "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1}). {fix}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"runtime.device=mps, but this machine has no MPS device. {fix}")


def _family_problems(params: DictConfig, facts: ModelFacts | None) -> list[str]:
    """The model's family (read from its config, never its weights) supports the method and recovery, or the reason
    it does not (:mod:`layerfold.surgery.support`); an unknown architecture raises UnsupportedArchitectureError."""
    if facts is None:
        return []
    family = family_of(facts.model_type, facts.config)
    get_method(params.method, facts.bounds())  # the method's ranges against the model first
    why = family_refusal(family, params.method) or recovery_refusal(family, params.get("recovery"))
    return [] if why is None else [f"{why} [model family: {facts.model_type}]"]


def _check_headline(params: DictConfig) -> None:
    """``eval.headline.tasks``: ``auto`` or a non-empty list of tasks ``eval.lm_eval.tasks`` evaluates."""
    evaluation = params.get("eval")
    if evaluation is None or evaluation.get("headline") is None:
        return
    setting, evaluated = evaluation.headline.get("tasks"), list((evaluation.get("lm_eval") or {}).get("tasks") or [])
    if setting == "auto":
        return
    if isinstance(setting, str) or not isinstance(setting, (list, ListConfig)) or not setting:
        raise ConfigError(f"eval.headline.tasks={setting!r}: use auto (decided from the dense model) or a non-empty list of "
                          f"task names from eval.lm_eval.tasks, e.g. `-S 'eval.headline.tasks=[piqa,hellaswag]'`.")
    unknown = [t for t in setting if t not in evaluated]
    if unknown:
        raise ConfigError(f"eval.headline.tasks lists {unknown}, which eval.lm_eval.tasks={evaluated} does not evaluate: "
                          "add them there or remove them from the headline list (or use auto).")


def _check_recovery_layer_major(params: DictConfig) -> None:
    """End-to-end recovery (LM loss, logit KD) needs the whole student: refuse it under ``hardware=sequential``."""
    recovery = params.get("recovery")
    if recovery is None:
        return
    why = layer_major_blocker(recovery)
    if why is not None:
        raise ConfigError(f"{why}; it cannot run with hardware=sequential. Use hardware=resident (`-S hardware=resident`) on a device "
                          "that holds both models, or, for models larger than one GPU, hardware=resident with recovery.distributed=fsdp2 "
                          "under `accelerate launch` (each GPU holds 1/N of both models; docs/scaling.md), or a layer-local recovery "
                          "(`-S recovery=distill`, recovery.end_to_end.enabled=false).")


def _check_side_layers_layer_major(params: DictConfig) -> None:
    """A compressed checkpoint with a layer of another class (a side file) is read by the resident loader only."""
    spec, cfg = get_method(params.method)
    side = spec.capabilities.side_layers(cfg)
    if side is not None:
        settings, stock = side
        raise ConfigError(
            f"method={spec.name} with {settings} compresses layer by layer, but the checkpoint it writes holds a layer of a class "
            "the architecture does not have (a side file), which the recover and evaluate stages read only with the whole model; "
            f"it cannot run with hardware=sequential. Use hardware=resident (`-S hardware=resident`), or {stock}, which run layer "
            "by layer end to end."
        )


def _check_eval_layer_major(params: DictConfig) -> None:
    """lm-eval runs layer by layer under ``hardware=sequential`` (unless eval.efficiency loads the whole model anyway)."""
    from layerfold.evaluation.lm_eval_layerwise import refusal

    evaluation = params.get("eval")
    if evaluation is None or not evaluation.lm_eval.tasks or evaluation.efficiency.enabled:
        return
    le = evaluation.lm_eval
    why = refusal(le.scoring, le.head_rows, le.batch_size)
    if why is not None:
        raise ConfigError(f"{why}.")


def _cross_field_problems(params: DictConfig, facts: ModelFacts) -> list[str]:
    """Constraints that involve two settings, which per-field metadata cannot express."""
    problems = []
    eff = params.eval.efficiency
    if facts.context_length and eff.enabled and eff.prompt_len + eff.new_tokens > facts.context_length:
        problems.append(
            f"eval.efficiency.prompt_len + new_tokens = {eff.prompt_len} + {eff.new_tokens} exceeds the model's "
            f"context of {facts.context_length} tokens; lower one of them."
        )
    declared = params.model.get("architecture")  # paper presets declare the model they were written for
    if declared is not None:
        for key in ("model_type", "num_layers", "context_length", "vocab_size"):
            want, got = declared.get(key), getattr(facts, key, None)
            if want is not None and got is not None and want != got:
                problems.append(f"model.architecture.{key}={want} (declared for {params.model.name}) but the model read has {got}; "
                                "model.path points at another model: use the checkpoint the preset names.")
    return problems


# -- the method's settings against the model and the calibration data ----------------------------------------
def _method_problems(spec: MethodSpec, cfg: Any, params: DictConfig, facts: ModelFacts) -> list[str]:
    """What the method's own checks (its registered ``problems``) would refuse at the start of compress (after DVC
    deleted its outputs)."""
    if spec.problems is None:
        return []
    try:
        return list(spec.problems(cfg, facts, params))
    except ValueError as err:  # ConfigError and LayerSurgeryError: the method's own message, key and fix included
        return [str(err)]


# -- recovery -----------------------------------------------------------------------------------------------
def _recovery_problems(params: DictConfig) -> list[str]:
    """Recovery's settings against each other (learning rates, phases, masked positions, training sources)."""
    recovery = params.get("recovery")
    if recovery is None or recovery.get("name", "none") == "none":
        return []
    from layerfold.data.training import LOCAL_SOURCES
    from layerfold.recovery.checks import check_settings

    problems = []
    try:
        check_settings(recovery, processes=1)  # the launch itself is checked when the stage starts its processes
    except ValueError as err:
        problems.append(str(err))
    data = recovery.data
    sources, weights = list(data.sources), list(data.weights)
    if not sources:
        problems.append("recovery.data.sources is empty; name at least one source, e.g. [c4, wikitext2_train].")
    if len(weights) != len(sources) or sum(weights) <= 0:
        problems.append(f"recovery.data.weights={weights} must give one non-negative share per source ({len(sources)}: {sources}), "
                        "not all zero.")
    for source in sources:
        if source not in LOCAL_SOURCES and not source.startswith("hub:"):
            problems.append(f"recovery.data.sources has '{source}', which is no training source; use {', '.join(LOCAL_SOURCES)} or "
                            "hub:<dataset>[:<config>] (evaluation text is not offered).")
        elif source.startswith("hub:") and data.train_tokens is None:
            problems.append(f"recovery.data.sources has the hub corpus '{source}': set recovery.data.train_tokens to bound the download.")
    return problems


# -- data and evaluation -----------------------------------------------------------------------------------
def _data_problems(params: DictConfig) -> list[str]:
    """Benchmark names the data stage prepares, and lm-eval task names the evaluate stage can run on them."""
    from layerfold.data.benchmarks import BENCHMARKS
    from layerfold.data.text import data_dir

    problems = []
    benchmarks = list(params.data.benchmarks)
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        problems.append(f"data.benchmarks has {unknown}, which layerfold cannot prepare; choose from {list(BENCHMARKS)}.")
    tasks = list(params.eval.lm_eval.tasks)
    try:
        local = tasks and data_dir(params.data.get("local_dir")) is not None
    except FileNotFoundError:
        local = False  # a missing data directory is the data_files stage's to report, with its own fix
    if not local:
        return problems  # no tasks, or the stock tasks with hub data: lm-eval's own index decides
    known = local_task_names()
    if not known:
        return problems  # lm-eval is not installed here: the evaluate stage will say so itself
    for index, task in enumerate(tasks):
        benchmark = known.get(task)
        if benchmark is None:
            listed = sorted(n for n in known if not n.startswith(("mmlu_", "mmlu_local_")))
            problems.append(f"eval.lm_eval.tasks[{index}]='{task}' is no lm-eval task layerfold runs on local data; tasks: "
                            f"{', '.join(listed)} (and mmlu_<subject>). Fix the name (`-S 'eval.lm_eval.tasks=[...]'`).")
        elif benchmark not in benchmarks:
            problems.append(f"eval.lm_eval.tasks[{index}]='{task}' reads the benchmark '{benchmark}', but data.benchmarks={benchmarks} "
                            f"does not prepare it: add it (`-S 'data.benchmarks=[{', '.join([*benchmarks, benchmark])}]'`) or drop the task.")
    return problems


class _TaggedLoader(yaml.SafeLoader):
    """Reads lm-eval's task YAMLs without importing lm-eval: ``!function`` tags become plain strings."""


_TaggedLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


@lru_cache(maxsize=1)
def local_task_names() -> dict[str, str]:
    """``{task or group name: benchmark}`` for every name the evaluate stage accepts with local data: the stock names of
    each local task spec's configs (``piqa``, ``mmlu``, ``mmlu_anatomy``) and their local names (``piqa_local``,
    ``boolq_notitle``), as :func:`layerfold.evaluation.task_configs.lm_eval_tasks` maps them."""
    from layerfold.evaluation.task_configs import load_specs

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return {}
    root = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    names: dict[str, str] = {}
    for stock_name, entry in load_specs().items():
        old, new = entry["rename"]
        stock = root / entry["stock"]
        for path in [stock] if stock.is_file() else sorted(stock.glob("*.yaml")):
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaggedLoader) or {}
            name = config.get("task") if isinstance(config.get("task"), str) else config.get("group")
            if not isinstance(name, str):
                continue
            names[name] = entry["prepared"]
            if name == old or name.startswith(old + "_"):
                names[new + name[len(old):]] = entry["prepared"]
    return names


# -- model identity ----------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _model_presets() -> dict[str, tuple[str, dict]]:
    """``{name: (preset file, its model section)}`` of ``conf/model/*.yaml`` (empty without a conf folder)."""
    presets = {}
    for path in sorted(MODEL_PRESETS.glob("*.yaml")) if MODEL_PRESETS.is_dir() else []:
        section = yaml.safe_load(path.read_text()) or {}
        if isinstance(section.get("name"), str):
            presets[section["name"]] = (f"conf/model/{path.name}", section)
    return presets


def _same_source_value(key: str, preset: Any, ours: Any) -> bool:
    if preset == ours:
        return True
    if key == "path" and preset is not None and ours is not None:  # the same file written another way
        expand = lambda p: Path(os.path.expanduser(os.path.expandvars(str(p)))).resolve()  # noqa: E731
        return expand(preset) == expand(ours)
    return False


def _model_name_problems(params: DictConfig) -> list[str]:
    """``model.name`` is the name of a preset (``conf/model/*.yaml``) while ``model`` reads other weights.

    Results carry the name, so a preset's name over another source (``-S model.path=...`` without
    ``model.name``) would file one model's numbers under another's. A preset that declares its
    architecture (the paper presets' hub models) may read a local copy instead: validate checks that
    copy's config against the declared facts.
    """
    model = params.model
    preset = _model_presets().get(model.name)
    if preset is None:
        return []  # a name of the user's own: it names what they point at
    file, section = preset
    differs = [key for key in MODEL_SOURCE_KEYS if not _same_source_value(key, section.get(key), model.get(key))]
    if not differs or (section.get("architecture") and model.get("architecture")):
        return []
    settings = ", ".join(f"model.{key}={model.get(key)}" for key in differs)
    wanted = ", ".join(f"{key}={section.get(key)}" for key in differs)
    return [f"model.name='{model.name}' names the weights of {file} ({wanted}), but {settings} reads other weights, and every "
            f"result would carry that name. Name this model (`-S model.name=<name>`), or set model.name=null to name it after "
            f"its source ('{derived_model_name(model)}')."]


def _check_compensation_and_selectors(params: DictConfig, facts: ModelFacts | None) -> None:
    """``compensate``, ``recovery.trainable`` = last / patch and QLoRA: what they rule out before anything runs."""
    from layerfold.compensate import compensation_problems

    method, recovery = params.method, params.get("recovery") or {}
    hardware = params.get("hardware") or {}
    problems = compensation_problems(method, params.get("compensate"), hardware)
    trainable = recovery.get("trainable")
    if recovery.get("name", "none") != "none" and trainable in ("last", "patch"):
        if recovery.get("lora", {}).get("enabled"):
            problems.append(f"recovery.trainable={trainable} trains the selected tensors themselves; set recovery.lora.enabled=false.")
        if trainable == "patch" and (params.get("compensate") or {}).get("name") != "linear_patch":
            problems.append("recovery.trainable=patch trains LinearPatch patches, which only compensate=linear_patch makes "
                            "(`-S compensate=linear_patch`).")
        if hardware.get("mode") == "sequential":
            problems.append(f"recovery.trainable={trainable} trains the LM head or patches of the whole student, which hardware=sequential "
                            "does not hold; use hardware=resident (`-S hardware=resident`).")
        depth = facts.num_layers - int(method.get("num_remove", 0)) if facts is not None and method.get("num_remove") else None
        if trainable == "last" and depth is not None and recovery.get("last_layers", 3) > depth:
            problems.append(f"recovery.last_layers={recovery.last_layers} but the compressed model keeps {depth} layers; choose 1..{depth}.")
    if recovery.get("name", "none") != "none" and recovery.get("lora", {}).get("quantize", "none") != "none":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"recovery.lora.quantize={recovery.lora.quantize} (QLoRA) needs bitsandbytes, which is not installed. Install it "
                            "(`pip install bitsandbytes`, CUDA only), or use recovery.lora.quantize=none (LoRA on the unquantised weights).")
        else:
            problems.append(f"recovery.lora.quantize={recovery.lora.quantize}: the 4-bit student is not implemented in this layerfold "
                            "version; use recovery.lora.quantize=none (LoRA on the unquantised weights).")
    if problems:
        raise ConfigError(" ".join(problems))
