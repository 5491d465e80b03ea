"""Config entries that describe individual decoder layers, and how they follow a change of the layer stack.

A model's config says more about its layers than ``num_hidden_layers``, and transformers reads it both
when it builds the layers (``from_pretrained``) and on every forward (attention masks and rotary tables
chosen by ``config.layer_types[i]``, cache layers by type). After layers are removed or merged, each of
these entries must describe the layers that are left, in their new positions, or a reloaded model is
built differently from the edited one. Three shapes occur, recognised by name for every family:

- **one value per layer** (:data:`VALUE_LISTS`): ``layer_types`` (sliding / full / chunked attention),
  ``mlp_layer_types``, ``no_rope_layers`` (SmolLM3, Llama 4), per-layer rope thetas, ...: the kept
  layers' entries, in order. Any other list named ``*layer*`` or ``*heads*`` (per-layer head counts)
  with one entry per layer is treated the same.
- **lists of layer indices** (:data:`INDEX_LISTS`): Qwen-MoE's dense ``mlp_only_layers``, Llama 4's
  ``moe_layers``: the kept layers' new indices.
- **patterns** (:data:`DENSE_PREFIX`, :data:`SPARSE_STEPS`): DeepSeek/GLM's ``first_k_dense_replace`` (the
  first k layers are dense) becomes the number of kept dense layers (they still come first); Qwen-MoE's
  ``decoder_sparse_step`` (every n-th layer sparse) is written out as an explicit ``mlp_only_layers`` with
  step 1, since a removal generally breaks the period.

Pattern scalars that only *derive* a list transformers then stores (``max_window_layers``,
``sliding_window_pattern``, ``no_rope_layer_interval``, ``interleave_moe_layer_step``) need nothing: the
stored list wins on reload. :func:`layer_mismatches` builds each decoder layer again from a config and
compares it with the layers it should describe, which is how tests (and ``validate``, for families
without a curated adapter) check that a config edit reproduces the stack.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

VALUE_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers", "layer_rope_theta", "layers_block_type", "block_configs")
INDEX_LISTS = ("mlp_only_layers", "moe_layers")
DENSE_PREFIX = ("first_k_dense_replace",)
SPARSE_STEPS = (("decoder_sparse_step", "mlp_only_layers"),)  # (period, explicit list of dense layers)
# Any other list with one entry per layer whose name says it is about layers or heads (per-layer head counts).
GENERIC_WORDS = ("layer", "heads")


class LayerConfigError(ValueError):
    """A config entry about layers that cannot be made to describe an edited stack; the message names it."""


def _depth(config: Any) -> int:
    return int(config.num_hidden_layers)


def value_list_keys(config: Any) -> list[str]:
    """Config entries holding one value per layer: the known ones and any other ``*layer*`` list of that length."""
    depth = _depth(config)
    keys = [k for k in VALUE_LISTS if isinstance(getattr(config, k, None), (list, tuple)) and len(getattr(config, k)) == depth]
    for key, value in vars(config).items():
        if key in keys or key in INDEX_LISTS or key.startswith("_") or not any(word in key for word in GENERIC_WORDS):
            continue
        if isinstance(value, (list, tuple)) and len(value) == depth and depth > 1:
            keys.append(key)
    return keys


def layer_config_keys(config: Any) -> list[str]:
    """Every config entry :func:`trim` may change (besides ``num_hidden_layers``)."""
    keys = value_list_keys(config)
    keys += [k for k in INDEX_LISTS if isinstance(getattr(config, k, None), (list, tuple))]
    keys += [k for k in DENSE_PREFIX if isinstance(getattr(config, k, None), int)]
    keys += [period for period, _ in SPARSE_STEPS if isinstance(getattr(config, period, None), int)]
    return keys


def _copied(value: Any) -> Any:
    """A copy of nested lists and dicts of plain values (cheap: trial edits snapshot the config many times)."""
    if isinstance(value, (list, tuple)):
        return [_copied(v) for v in value]
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


def snapshot(config: Any) -> dict[str, Any]:
    """The layer entries of ``config`` (and its depth), to put back with :func:`restore`."""
    state = {k: _copied(getattr(config, k)) for k in layer_config_keys(config)}
    state["num_hidden_layers"] = _depth(config)
    return state


def restore(config: Any, state: dict[str, Any]) -> None:
    for key, value in state.items():
        setattr(config, key, _copied(value))


def _sparse_layers_explicit(config: Any) -> None:
    """Qwen-MoE: layer ``i`` is sparse iff ``(i + 1) % decoder_sparse_step == 0`` and ``i`` is not in ``mlp_only_layers``;
    fold the period into the list so the rule survives any removal."""
    depth = _depth(config)
    for period_key, list_key in SPARSE_STEPS:
        period = getattr(config, period_key, None)
        if isinstance(period, int) and period > 1:
            dense = set(getattr(config, list_key, None) or [])
            dense |= {i for i in range(depth) if (i + 1) % period != 0}
            setattr(config, list_key, sorted(dense))
            setattr(config, period_key, 1)


def trim(config: Any, keep: Sequence[int]) -> None:
    """Make ``config``'s layer entries describe the stack whose layer ``k`` is the current layer ``keep[k]`` (in place).

    ``keep`` is ascending and indexes the stack ``config`` describes now; ``num_hidden_layers`` becomes ``len(keep)``.
    """
    keep = [int(i) for i in keep]
    depth = _depth(config)
    if any(b <= a for a, b in zip(keep, keep[1:])) or any(not 0 <= i < depth for i in keep):
        raise LayerConfigError(f"Layers {keep} are not an ascending selection of the config's {depth} layers.")
    for key in value_list_keys(config):
        values = getattr(config, key)
        setattr(config, key, [values[i] for i in keep])
    _sparse_layers_explicit(config)
    position = {old: new for new, old in enumerate(keep)}
    for key in INDEX_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)):
            setattr(config, key, [position[i] for i in values if i in position])
    for key in DENSE_PREFIX:
        first = getattr(config, key, None)
        if isinstance(first, int):
            setattr(config, key, sum(1 for i in keep if i < first))
    config.num_hidden_layers = len(keep)


def trimmed(config: Any, keep: Sequence[int]) -> Any:
    """A copy of ``config`` trimmed to ``keep`` (see :func:`trim`)."""
    config = copy.deepcopy(config)
    trim(config, keep)
    return config


# ---------------------------------------------------------------------------------------------------
# Checking that a config describes a stack: build each layer again and compare.
_IGNORED_ATTRIBUTES = {"layer_idx", "training", "config"}


def layer_signature(layer: nn.Module) -> tuple:
    """What distinguishes one decoder layer's build: its tensors' names and shapes, and every plain setting
    (int, float, str, bool, None) of the layer and its submodules other than ``layer_idx``."""
    tensors = tuple(sorted((k, tuple(v.shape)) for k, v in layer.state_dict().items()))
    settings = []
    for name, module in layer.named_modules():
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or attr in _IGNORED_ATTRIBUTES:
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                settings.append((name, attr, value))
    return tensors, tuple(settings)


def build_layer(template: nn.Module, config: Any, index: int) -> nn.Module:
    """Decoder layer ``index`` as ``config`` builds it (the class of ``template``, on the meta device)."""
    import torch

    with torch.device("meta"):
        return type(template)(config, index)


def layer_mismatches(layers: Sequence[nn.Module], config: Any) -> list[str]:
    """How layer ``k`` built from ``config`` differs from ``layers[k]``, for every ``k`` (empty: the config describes them).

    Raises :class:`LayerConfigError` when the layer class cannot be built from ``(config, layer_idx)``.
    """
    if _depth(config) != len(layers):
        return [f"num_hidden_layers={_depth(config)} but the stack has {len(layers)} layers"]
    problems = []
    for k, layer in enumerate(layers):
        try:
            built = build_layer(layer, config, k)
        except TypeError as err:
            raise LayerConfigError(f"{type(layer).__name__} cannot be built from (config, layer_idx): {err}") from None
        ours, theirs = layer_signature(layer), layer_signature(built)
        if ours[0] != theirs[0]:
            diff = sorted(set(ours[0]) ^ set(theirs[0]))[:4]
            problems.append(f"layer {k}: tensors differ ({diff})")
        elif ours[1] != theirs[1]:
            diff = sorted(set(ours[1]) ^ set(theirs[1]))[:4]
            problems.append(f"layer {k}: settings differ ({diff})")
    return problems
