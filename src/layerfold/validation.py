"""The whole configuration checked against the model before a stage deletes or writes anything.

:func:`layerfold.config.load_params` checks keys, types and fixed ranges. What needs the model —
sequence lengths within its context, a target depth below its depth, an architecture layerfold has
an adapter for — is checked here once the model's facts are known: from the source's config or
file header (``validate`` stage, ``scripts/compose_params.py``, the ``base`` stage), or from the
written ``artifacts/base/config.json`` (every later stage).
"""

from __future__ import annotations

from omegaconf import DictConfig

from layerfold.config import ConfigError, Params, check_ranges
from layerfold.methods import check_layer_major, get_method, token_cosine_distance
from layerfold.models.adapters import get_adapter
from layerfold.models.facts import ModelFacts
from layerfold.recovery.layer_major import layer_major_blocker


def check(params: DictConfig, facts: ModelFacts | None, where: str = "params.yaml") -> None:
    """Raise :class:`ConfigError` (or ``UnsupportedArchitectureError``) for anything the model rules out.

    With ``facts=None`` only what needs no model is checked (the method's own schema and ranges).
    """
    if facts is not None:
        get_adapter(facts.model_type)
    bounds = facts.bounds() if facts is not None else {}
    _check_capture_distance(params, *get_method(params.method, bounds))
    _check_compensation_and_selectors(params, facts)
    if params.get("hardware") is not None and params.hardware.get("mode") == "sequential":
        check_layer_major(params.method)  # a method that needs the resident model stops here, not mid-compress
        _check_recovery_layer_major(params)  # and so does a recovery that needs the whole student
    if facts is None:
        return
    check_ranges(params, Params, where, facts=bounds)
    problems = list(_cross_field_problems(params, facts))
    if problems:
        raise ConfigError(f"{where}: " + " ".join(problems))


def _check_capture_distance(params: DictConfig, spec, method_cfg) -> None:
    """The capture must keep the boundary pairs the method reads (``capture.max_distance``), or compress would fail later."""
    kept = (params.get("capture") or {}).get("max_distance")
    needed = token_cosine_distance(spec.name, method_cfg)
    if kept is not None and needed is not None and needed > kept:
        raise ConfigError(
            f"capture.max_distance={kept} keeps the token cosine of boundaries at most {kept} layers apart, but method={spec.name} "
            f"with these settings reads boundaries {needed} apart. Set capture.max_distance >= {needed} "
            f"(`-S capture.max_distance={needed}`), or null for every pair."
        )


def _check_recovery_layer_major(params: DictConfig) -> None:
    """End-to-end recovery (LM loss, logit KD) needs the whole student: refuse it under ``hardware=sequential``."""
    recovery = params.get("recovery")
    if recovery is None:
        return
    why = layer_major_blocker(recovery)
    if why is not None:
        raise ConfigError(f"{why}; it cannot run with hardware=sequential. Use hardware=resident (`-S hardware=resident`) on a device "
                          "that holds both models, or a layer-local recovery (`-S recovery=distill`, recovery.end_to_end.enabled=false).")


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


def _check_compensation_and_selectors(params: DictConfig, facts: ModelFacts | None) -> None:
    """``compensate``, ReplaceMe's fixed block, ``recovery.trainable`` = last / patch and QLoRA: what they rule out before anything runs."""
    from layerfold.compensate import compensation_problems

    method, recovery = params.method, params.get("recovery") or {}
    hardware = params.get("hardware") or {}
    problems = compensation_problems(method, params.get("compensate"), hardware)
    if facts is not None and method.get("name") == "replaceme" and method.get("start") is not None:
        start, n = int(method.start), int(method.get("num_remove", 8))
        if start + n > facts.num_layers:
            problems.append(f"method.start={start} with method.num_remove={n} asks for layers {start}..{start + n - 1}, which a model of "
                            f"{facts.num_layers} layers does not have: method.start must lie in 1..{facts.num_layers - n} "
                            f"(`-S method.start=<1..{facts.num_layers - n}>`), or null to choose the block by distance.")
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
