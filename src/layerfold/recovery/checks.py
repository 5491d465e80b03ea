"""What recovery refuses and what it verifies.

Before any model work: :func:`check_settings`, settings a user can fix (also run by ``validate``, so a bad setting
stops the pipeline before its first stage), the components' ``_target_`` and arguments among them; :func:`check_partial`,
what a student holding only its trained layers (``hardware=sequential``) can train. After training:
:func:`changed_layers`, the layers whose weights changed, compared tensor by tensor against the digests taken
before training (:func:`layer_digests`, :func:`patch_digests`); a selected layer left unchanged, or an unselected one
changed, is an :class:`UntrainedLayersError` and nothing is written.
"""

from __future__ import annotations

import hashlib

import torch
from omegaconf import DictConfig
from torch import nn

from layerfold.models.adapters import get_adapter
from layerfold.recovery.components import component_problems
from layerfold.recovery.distributed import check_launch
from layerfold.recovery.errors import RecoveryConfigError
from layerfold.recovery.losses import LOCAL_LOSSES
from layerfold.recovery.selectors import check_selector


def check_settings(cfg: DictConfig, processes: int = 1) -> None:
    """Errors a user can fix, raised before any model work (``processes``: how many were launched)."""
    if cfg.lr <= 0:
        raise RecoveryConfigError(f"recovery.lr={cfg.lr} must be > 0 (e.g. 2e-4); use recovery=none to skip training.")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise RecoveryConfigError(f"recovery.min_lr={cfg.min_lr} must lie in [0, recovery.lr={cfg.lr}].")
    if cfg.local.loss not in LOCAL_LOSSES:
        raise RecoveryConfigError(f"recovery.local.loss='{cfg.local.loss}' is unknown; choose one of {', '.join(LOCAL_LOSSES)}.")
    if cfg.local.ignore_first >= cfg.data.seq_len:
        raise RecoveryConfigError(f"recovery.local.ignore_first={cfg.local.ignore_first} leaves no position of a {cfg.data.seq_len}-token block; lower it.")
    ratio = cfg.local.get("max_norm_ratio")
    if ratio is not None and not ratio > 1:
        raise RecoveryConfigError(
            f"recovery.local.max_norm_ratio={ratio} must be > 1 (a position is left out when its target norm exceeds this many "
            "times its sequence's median; e.g. 10), or null to keep every position."
        )
    if not (cfg.local.enabled or cfg.end_to_end.enabled):
        raise RecoveryConfigError(
            f"recovery={cfg.name} enables neither local.enabled nor end_to_end.enabled; enable one, or use recovery=none."
        )
    if cfg.end_to_end.enabled and cfg.end_to_end.lm_weight <= 0 and cfg.end_to_end.kd_weight <= 0:
        raise RecoveryConfigError("recovery.end_to_end is enabled with lm_weight=0 and kd_weight=0; give one a positive weight.")
    check_selector(cfg)
    if cfg.lora.enabled and cfg.trainable == "all":
        raise RecoveryConfigError("recovery.lora.enabled with trainable=all: LoRA adapts linears of decoder layers; use trainable=layers or new.")
    check_launch(cfg, processes)
    problems = component_problems(cfg)
    if problems:
        raise RecoveryConfigError("\n  ".join(problems))


def is_partial(model: nn.Module) -> bool:
    """True for a student whose skeleton is on the meta device (only the trained layers hold weights)."""
    return any(p.is_meta for p in model.parameters())


def check_partial(cfg: DictConfig, student: nn.Module, phase_kinds: list[str], layers_trained: list[int], has_lm_loss: bool) -> None:
    """A partial student trains layer-local phases of materialised layers only, and needs a layer-by-layer ``lm_loss``."""
    if any(kind != "local" for kind in phase_kinds):
        raise RecoveryConfigError(
            f"recovery={cfg.name} trains end to end (recovery.end_to_end.enabled=true), which needs the whole student, "
            "but this student holds only its trained layers (hardware=sequential). Use hardware=resident, or a layer-local "
            "recovery (recovery=distill with recovery.end_to_end.enabled=false)."
        )
    layers = get_adapter(student).get_layers(student)
    empty = [k for k in layers_trained if any(p.is_meta for p in layers[k].parameters())]
    if empty:
        raise RecoveryConfigError(f"Student layers {empty} train but hold no weights (meta tensors); materialise them before training.")
    if not has_lm_loss:
        raise RecoveryConfigError("A partial student cannot compute its own validation LM loss; pass lm_loss (layer by layer) to the engine.")


class UntrainedLayersError(RuntimeError):
    """The layers whose weights changed in training are not the layers the recovery mode selected."""


@torch.no_grad()
def patch_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of each LinearPatch patch tensor the model carries (none: empty)."""
    from layerfold.models.patches import ATTRIBUTE

    patches = getattr(model, ATTRIBUTE, None)
    if patches is None:
        return {}
    return {name: hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for name, t in sorted(patches.state_dict().items())}


def layer_digests(model: nn.Module) -> dict[int, dict[str, str]]:
    """``{layer: {tensor name: sha256 of its bytes}}`` for every decoder layer that holds weights (meta layers skipped).

    LoRA adapters are folded into the weights they adapt first (``W + delta``, what ``merge_and_unload``
    writes), so a wrapped student and its merged model compare equal. One tensor is on the host at a time.
    """
    from layerfold.recovery.layer_major import layer_weights

    digests = {}
    for k, layer in enumerate(get_adapter(model).get_layers(model)):
        weights = layer_weights(layer)
        if any(t.is_meta for t in weights.values()):
            continue
        digests[k] = {name: hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                      for name, t in sorted(weights.items())}
    return digests


def changed_layers(model: nn.Module, cfg: DictConfig, layers_trained: list[int], digests_before: dict[int, dict[str, str]],
                   patches_before: dict[str, str]) -> list[int]:
    """Decoder layers whose tensors differ from ``digests_before``; raises unless they are exactly ``layers_trained``."""
    after = layer_digests(model)
    changed = sorted(k for k in after if after[k] != digests_before.get(k))
    if cfg.trainable == "patch":
        # LinearPatch patches act at layers_trained, but they live beside the decoder layers: the patches must
        # have changed and no decoder layer may have.
        patches_changed = patch_digests(model) != patches_before
        if changed or not patches_changed:
            raise UntrainedLayersError(
                f"recovery={cfg.name} trains the LinearPatch patches only, but "
                + (f"decoder layers {changed} changed" if changed else "the patches hold exactly the values they started with")
                + ". Nothing is written: the recovered model would not be what recover.json says it is.")
        return sorted(layers_trained)
    if changed != sorted(layers_trained):
        untouched = sorted(set(layers_trained) - set(changed))
        stray = sorted(set(changed) - set(layers_trained))
        raise UntrainedLayersError(
            f"recovery={cfg.name} selected layers {layers_trained} to train, but "
            + (f"layers {untouched} hold exactly the weights they started with" if untouched else "")
            + (" and " if untouched and stray else "")
            + (f"layers {stray} changed although they were frozen" if stray else "")
            + ". Nothing is written: the recovered model would not be what recover.json says it is."
        )
    return changed
