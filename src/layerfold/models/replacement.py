"""Replacement layers the stock architectures cannot express, and how they are saved and reloaded.

LLM-Streamline's plain ``mlp`` replacement (``d -> 4d``, ReLU, ``4d -> d``) has a different shape from
any layer of a Llama-style model, so it cannot live in a stock checkpoint. layerfold stores it as a
decoder layer of the model's own class whose attention contributes exactly zero (zero ``o_proj``)
and whose ``mlp`` is a :class:`ReluMLP`. Saving takes such layers out of the stack: the stock files
hold the other layers (so plain ``AutoModelForCausalLM.from_pretrained`` loads the model *without*
the replacement, i.e. pure pruning one layer deeper) and :data:`SIDE_FILE` holds each replacement
layer with its position; :func:`attach_side_layers` (called by ``layerfold.models.load_checkpoint``)
puts them back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from layerfold.models.adapters import get_adapter

SIDE_FILE = "layerfold_replacements.safetensors"


class ReluMLP(nn.Module):
    """``fc2(relu(fc1(x)))`` with ``fc1: d -> width`` (LLM-Streamline's MLP lightweight network)."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(hidden_states)))


def zero_attention(layer: nn.Module, output: str) -> None:
    """Make a decoder layer's attention branch contribute exactly zero (zero output projection)."""
    proj = layer.get_submodule(output)
    with torch.no_grad():
        proj.weight.zero_()
        if getattr(proj, "bias", None) is not None:
            proj.bias.zero_()


def mlp_replacement_layer(model: PreTrainedModel, position: int, width: int) -> nn.Module:
    """A fresh decoder layer of the model's class with zero attention and a :class:`ReluMLP` as its MLP."""
    adapter = get_adapter(model)
    template = adapter.get_layers(model)[0]
    layer = type(template)(model.config, position)
    zero_attention(layer, adapter.attn_output)
    if not adapter.mlp:
        raise ValueError(f"{adapter.family}: the MLP is not a submodule of the decoder layer; an mlp replacement cannot be attached.")
    setattr(layer, adapter.mlp, ReluMLP(model.config.hidden_size, width))
    reference = next(template.parameters())
    return layer.to(device=reference.device, dtype=reference.dtype)


def _set_stack(model: PreTrainedModel, layers: list[nn.Module], layer_types: list | None) -> None:
    adapter = get_adapter(model)
    adapter.set_layers(model, nn.ModuleList(layers))
    for idx, layer in enumerate(layers):
        for module in (layer, layer.get_submodule(adapter.attention)):
            if hasattr(module, "layer_idx"):
                module.layer_idx = idx
    model.config.num_hidden_layers = len(layers)
    if layer_types is not None:
        model.config.layer_types = layer_types


def _side_positions(model: PreTrainedModel) -> list[int]:
    adapter = get_adapter(model)
    if not adapter.mlp:
        return []
    return [i for i, layer in enumerate(adapter.get_layers(model)) if isinstance(layer.get_submodule(adapter.mlp), ReluMLP)]


@contextmanager
def detached_side_layers(model: PreTrainedModel) -> Iterator[dict[str, torch.Tensor] | None]:
    """Take replacement layers out of the stack while the stock part is saved; yield their tensors (or None)."""
    positions = _side_positions(model)
    if not positions:
        yield None
        return
    adapter = get_adapter(model)
    layers = list(adapter.get_layers(model))
    types = getattr(model.config, "layer_types", None)
    types = list(types) if isinstance(types, (list, tuple)) and len(types) == len(layers) else None
    tensors = {f"{pos}.{name}": t.detach().contiguous().cpu() for pos in positions for name, t in layers[pos].state_dict().items()}
    widths = {str(pos): layers[pos].get_submodule(adapter.mlp).fc1.out_features for pos in positions}
    tensors["__meta__"] = torch.tensor(list(json.dumps({"positions": positions, "widths": widths}).encode()), dtype=torch.uint8)
    try:
        _set_stack(model, [l for i, l in enumerate(layers) if i not in positions], [t for i, t in enumerate(types) if i not in positions] if types else None)
        yield tensors
    finally:
        _set_stack(model, layers, types)


def save_side_layers(tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
    save_file(tensors, str(Path(directory) / SIDE_FILE))


def attach_side_layers(model: PreTrainedModel, directory: str | Path) -> PreTrainedModel:
    """Re-insert the replacement layers saved next to a stock checkpoint (no-op when there are none)."""
    path = Path(directory) / SIDE_FILE
    if not path.exists():
        return model
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    meta = json.loads(bytes(tensors.pop("__meta__").tolist()).decode())
    adapter = get_adapter(model)
    layers = list(adapter.get_layers(model))
    types = getattr(model.config, "layer_types", None)
    types = list(types) if isinstance(types, (list, tuple)) and len(types) == len(layers) else None
    for pos in sorted(meta["positions"]):
        layer = mlp_replacement_layer(model, pos, meta["widths"][str(pos)])
        layer.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(pos)})
        layers.insert(pos, layer)
        if types is not None:
            types.insert(pos, types[min(pos, len(types) - 1)])
    _set_stack(model, layers, types)
    return model
