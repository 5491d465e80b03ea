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
from layerfold.methods import check_layer_major, get_method, token_cosine_distance, writes_side_layers
from layerfold.models.facts import ModelFacts
from layerfold.recovery.layer_major import layer_major_blocker
from layerfold.surgery.support import family_of, method_refusal, recovery_refusal


def check(params: DictConfig, facts: ModelFacts | None, where: str = "params.yaml") -> None:
    """Raise :class:`ConfigError` (or ``UnsupportedArchitectureError``) for anything the model rules out.

    With ``facts=None`` only what needs no model is checked (the method's own schema and ranges).
    """
    _check_family(params, facts)
    bounds = facts.bounds() if facts is not None else {}
    _check_capture_distance(params, *get_method(params.method, bounds))
    if params.get("hardware") is not None and params.hardware.get("mode") == "sequential":
        check_layer_major(params.method)  # a method that needs the resident model stops here, not mid-compress
        _check_recovery_layer_major(params)  # and so does a recovery that needs the whole student
        _check_eval_layer_major(params)  # and lm-eval settings the layer-by-layer scorer cannot honour
        _check_side_layers_layer_major(params)  # and a checkpoint the later stages cannot read layer by layer
    if facts is None:
        return
    check_ranges(params, Params, where, facts=bounds)
    problems = list(_cross_field_problems(params, facts))
    if problems:
        raise ConfigError(f"{where}: " + " ".join(problems))


def _check_family(params: DictConfig, facts: ModelFacts | None) -> None:
    """The model's family (read from its config, never its weights) supports the method and recovery, or the run
    stops here with the reason (:mod:`layerfold.surgery.support`); an unknown architecture raises UnsupportedArchitectureError."""
    if facts is None:
        return
    family = family_of(facts.model_type, facts.config)
    spec, method_cfg = get_method(params.method, facts.bounds())
    why = method_refusal(family, spec.name, method_cfg) or recovery_refusal(family, params.get("recovery"))
    if why is not None:
        raise ConfigError(f"{why} [model family: {facts.model_type}]")


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
                          "that holds both models, or, for models larger than one GPU, hardware=resident with recovery.distributed=fsdp2 "
                          "under `accelerate launch` (each GPU holds 1/N of both models; docs/scaling.md), or a layer-local recovery "
                          "(`-S recovery=distill`, recovery.end_to_end.enabled=false).")


def _check_side_layers_layer_major(params: DictConfig) -> None:
    """A compressed checkpoint with a layer of another class (a side file) is read by the resident loader only."""
    spec, cfg = get_method(params.method)
    if writes_side_layers(spec.name, cfg):
        raise ConfigError(
            f"method={spec.name} with method.replacement={cfg.replacement} compresses layer by layer, but the checkpoint it writes holds a "
            "ReLU-MLP layer of a class the architecture does not have (a side file), which the recover and evaluate stages read "
            "only with the whole model; it cannot run with hardware=sequential. Use hardware=resident (`-S hardware=resident`), "
            "or a stock replacement (method.replacement=ffn, swiglu or transformer_layer), which run layer by layer end to end."
        )


def _check_eval_layer_major(params: DictConfig) -> None:
    """lm-eval runs layer by layer under ``hardware=sequential`` (unless eval.efficiency loads the whole model anyway)."""
    from layerfold.execution.lm_eval_layerwise import refusal

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
