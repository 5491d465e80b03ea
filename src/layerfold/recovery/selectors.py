"""What trains besides whole decoder layers: ``recovery.trainable`` = ``last`` or ``patch``.

- ``last``: the LM head, the final norm and the last ``recovery.last_layers`` decoder layers, everything else
  frozen (the partial-layer fine-tuning of "Reassessing Layer Pruning in LLMs", Lu et al., ICLR 2026, whose
  released ``partial_fine-tuning.py`` trains ``lm_head``, ``model.norm`` and ``layers[-k:]``). With tied
  embeddings (SmolLM2) the LM head *is* the input embedding, so it trains too: one tensor.
- ``patch``: only the LinearPatch matrices (:mod:`layerfold.models.patches`) the compressed checkpoint carries
  (``compensate=linear_patch``), as the released LinearPatch distillation trains ``P`` alone.

The engine asks :func:`selected_layers` and :func:`selected_parameters`; None means the choice is one of
its own (``new``, ``layers``, ``all``). Parameters are matched by identity, so a tied tensor is found
under whichever name ``named_parameters`` reports it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from layerfold.models.adapters import LayerAdapter
from layerfold.models.patches import ATTRIBUTE, PatchSet
from layerfold.recovery.errors import RecoveryConfigError

SELECTORS = ("last", "patch")


def check_selector(cfg: Any) -> None:
    """Settings a selector rules out, before any model is loaded."""
    if cfg.trainable not in SELECTORS:
        return
    if cfg.lora.enabled:
        raise RecoveryConfigError(f"recovery.trainable={cfg.trainable} trains the selected tensors themselves; recovery.lora.enabled=true "
                                  "adapts decoder-layer linears instead. Set recovery.lora.enabled=false, or recovery.trainable=layers for LoRA.")
    if cfg.trainable == "patch" and (cfg.local.enabled or not cfg.end_to_end.enabled):
        raise RecoveryConfigError("recovery.trainable=patch trains the LinearPatch matrices through the whole student's output: set "
                                  "recovery.end_to_end.enabled=true and recovery.local.enabled=false (recovery=patch_kd does).")


def selected_layers(cfg: Any, adapter: LayerAdapter, student: nn.Module) -> list[int] | None:
    """The decoder layers a selector trains (``last``), or where its patches act (``patch``); None for the engine's own choices."""
    layers = adapter.num_layers(student)
    if cfg.trainable == "last":
        if not 1 <= cfg.last_layers <= layers:
            raise RecoveryConfigError(f"recovery.last_layers={cfg.last_layers} but the student has {layers} decoder layers; choose 1..{layers}.")
        return list(range(layers - cfg.last_layers, layers))
    if cfg.trainable == "patch":
        patches = getattr(student, ATTRIBUTE, None)
        if not isinstance(patches, PatchSet) or not patches.positions:
            raise RecoveryConfigError("recovery.trainable=patch but the compressed model carries no LinearPatch patches; compress with "
                                      "compensate=linear_patch (`-S compensate=linear_patch`), or choose another recovery.trainable.")
        return sorted({min(p, layers - 1) for p in patches.positions})
    return None


def selected_parameters(cfg: Any, adapter: LayerAdapter, student: nn.Module, layers: list[int]) -> list[str] | None:
    """Names (as ``named_parameters`` gives them) of what a selector trains; None for the engine's own choices."""
    if cfg.trainable == "last":
        wanted = {id(p) for p in student.get_output_embeddings().parameters()}
        wanted |= {id(p) for p in student.get_submodule(adapter.final_norm).parameters()}
        decoder = adapter.get_layers(student)
        wanted |= {id(p) for k in layers for p in decoder[k].parameters()}
    elif cfg.trainable == "patch":
        wanted = {id(p) for p in getattr(student, ATTRIBUTE).parameters()}
    else:
        return None
    return [name for name, param in student.named_parameters() if id(param) in wanted]
