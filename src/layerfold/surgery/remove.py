"""Remove decoder layers in place and keep the model self-consistent.

Three things go stale when layers disappear, and each breaks something different:
``config.num_hidden_layers`` (a reload silently re-adds randomly initialised layers), the modules'
``layer_idx`` (the KV cache indexes by it) and the config's entries about individual layers
(``layer_types`` for attention-type dispatch, ``no_rope_layers``, MoE placement such as
``mlp_only_layers`` or ``first_k_dense_replace``; see :mod:`layerfold.models.layer_config`).
:func:`remove_layers` fixes all three; nothing is deep-copied.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from transformers import PreTrainedModel

from layerfold.models import layer_config
from layerfold.models.adapters import get_adapter


class LayerSurgeryError(ValueError):
    pass


def reindex_layers(model: PreTrainedModel) -> None:
    """Renumber ``layer_idx`` everywhere in the stack and sync the config with the layer count."""
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():  # the layer, its attention, and any other module that keeps its index
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    model.config.num_hidden_layers = len(layers)


def remove_layers(model: PreTrainedModel, indices: Iterable[int]) -> PreTrainedModel:
    """Delete the decoder layers at ``indices`` (positions in the current stack), in place."""
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    drop = sorted(set(int(i) for i in indices))
    n = len(layers)
    if any(i < 0 or i >= n for i in drop):
        raise LayerSurgeryError(f"Layer indices {drop} out of range for a model with {n} layers (valid: 0..{n - 1}).")
    if len(drop) >= n:
        raise LayerSurgeryError(
            f"Cannot remove {len(drop)} of {n} layers: at least one layer must remain. Lower method.num_remove."
        )
    keep = [i for i in range(n) if i not in drop]
    if model.config.num_hidden_layers != n:
        raise LayerSurgeryError(f"config.num_hidden_layers={model.config.num_hidden_layers} but the stack has {n} layers; "
                                "the config no longer describes the model.")
    adapter.set_layers(model, nn.ModuleList([layers[i] for i in keep]))
    layer_config.trim(model.config, keep)
    reindex_layers(model)
    return model
