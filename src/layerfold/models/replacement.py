"""Replacement layers the stock architectures cannot express, and how they are saved and reloaded.

LLM-Streamline's plain ``mlp`` replacement (``d -> 4d``, ReLU, ``4d -> d``) has a different shape from
any layer of a Llama-style model, so it cannot live in a stock checkpoint. layerfold stores it as a
decoder layer of the model's own class whose attention contributes exactly zero (zero ``o_proj``)
and whose ``mlp`` is a :class:`ReluMLP`. Saving takes such layers out of the stack: the stock files
hold the other layers (so plain ``AutoModelForCausalLM.from_pretrained`` loads the model *without*
the replacement, i.e. pure pruning one layer deeper) and :data:`SIDE_FILE` holds each replacement
layer with its position; :func:`attach_side_layers` (called by ``layerfold.models.load_checkpoint``)
puts them back.

The other replacements are stock layers with some tensors re-initialised (a zero attention output,
a freshly drawn FFN). :class:`TensorInit` states those new values as data, so the same description
re-initialises a layer in place (resident compression) and a layer's state dict as it is built from
the original shards (``hardware=sequential``), and both give the same tensors bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from layerfold.models import layer_config
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


@dataclass(frozen=True)
class TensorInit:
    """New values for some tensors of one decoder layer, named by module (relative to the layer).

    - ``zero``: every tensor of these modules (weight and bias) becomes 0;
    - ``normal``: these modules' weights are drawn from ``normal(0, std)``;
    - ``ones``: these modules' weights become 1 (a freshly initialised norm).

    The draws come from one CPU generator seeded with ``seed``, in float32, tensor after tensor in the
    order of ``normal``, then cast to each tensor's dtype and device. Nothing depends on the global RNG,
    the device or the compute dtype's own sampler, so a layer re-initialised in place on a GPU and the
    same layer built from the shards on the host get the same values.
    """

    zero: tuple[str, ...] = ()
    normal: tuple[str, ...] = ()
    ones: tuple[str, ...] = ()
    std: float = 0.02
    seed: int = 0

    def values(self, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The new float32 CPU tensors for the keys of ``shapes`` (a layer's state-dict keys -> shapes) this init names."""
        new: dict[str, torch.Tensor] = {}
        for module in self.zero:
            keys = [key for key in shapes if key.rsplit(".", 1)[0] == module]
            if not keys:
                raise ValueError(f"TensorInit.zero names '{module}', which has no tensors in this layer (its tensors: {sorted(shapes)}).")
            new.update({key: torch.zeros(shapes[key], dtype=torch.float32) for key in keys})
        generator = torch.Generator().manual_seed(self.seed)
        for module in self.normal:
            key = self._weight(module, shapes, "normal")
            new[key] = torch.empty(shapes[key], dtype=torch.float32).normal_(0.0, self.std, generator=generator)
        for module in self.ones:
            key = self._weight(module, shapes, "ones")
            new[key] = torch.ones(shapes[key], dtype=torch.float32)
        return new

    @staticmethod
    def _weight(module: str, shapes: Mapping[str, torch.Size], field_name: str) -> str:
        key = f"{module}.weight"
        if key not in shapes:
            raise ValueError(f"TensorInit.{field_name} names '{module}', which has no weight in this layer (its tensors: {sorted(shapes)}).")
        return key

    def apply(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with the named tensors replaced (same dtype and device as the tensors they replace)."""
        new = self.values({key: tensor.shape for key, tensor in state.items()})
        return {key: new[key].to(device=tensor.device, dtype=tensor.dtype) if key in new else tensor for key, tensor in state.items()}

    @torch.no_grad()
    def apply_to(self, layer: nn.Module) -> None:
        """Re-initialise ``layer``'s named tensors in place (the values :meth:`apply` gives its state dict)."""
        state = layer.state_dict(keep_vars=True)
        for key, value in self.values({key: tensor.shape for key, tensor in state.items()}).items():
            state[key].copy_(value)

    def to_json(self) -> dict:
        return {"zero": list(self.zero), "normal": list(self.normal), "ones": list(self.ones), "std": self.std, "seed": self.seed}

    @classmethod
    def from_json(cls, entry: Mapping) -> TensorInit:
        unknown = sorted(set(entry) - {"zero", "normal", "ones", "std", "seed"})
        if unknown:  # e.g. a ReplaceMe fold or a Prune&Comp scale (layerfold.surgery.fold): values plan.json does not hold
            raise ValueError(f"plan.json init {dict(entry)} is not a re-initialisation ({unknown} are not TensorInit fields): its values "
                             "live only in the compressed checkpoint. Load that checkpoint (SafetensorsLayerLoader) instead of rebuilding it from the plan.")
        return cls(tuple(entry.get("zero", ())), tuple(entry.get("normal", ())), tuple(entry.get("ones", ())),
                   float(entry.get("std", 0.02)), int(entry.get("seed", 0)))


def zero_attention(layer: nn.Module, output: str) -> None:
    """Make a decoder layer's attention branch contribute exactly zero (zero output projection)."""
    TensorInit(zero=(output,)).apply_to(layer)


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
    # a layer-major skeleton's layers are on the meta device: the fresh layer then lives on the host
    return layer.to(device="cpu" if reference.is_meta else reference.device, dtype=reference.dtype)


def _set_stack(model: PreTrainedModel, layers: list[nn.Module], entries: dict | None) -> None:
    """Install ``layers`` as the decoder stack, renumber ``layer_idx`` and set the config's layer entries (``entries``,
    a :func:`layer_config.snapshot`)."""
    adapter = get_adapter(model)
    adapter.set_layers(model, nn.ModuleList(layers))
    for idx, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = idx
    model.config.num_hidden_layers = len(layers)
    if entries is not None:
        layer_config.restore(model.config, entries)


def _side_positions(model: PreTrainedModel) -> list[int]:
    adapter = get_adapter(model)
    if not adapter.mlp:
        return []
    return [i for i, layer in enumerate(adapter.get_layers(model)) if isinstance(layer.get_submodule(adapter.mlp), ReluMLP)]


@contextmanager
def detached_side_layers(model: PreTrainedModel) -> Iterator[dict[str, torch.Tensor] | None]:
    """Take replacement layers out of the stack while the stock part is saved; yield their tensors (or None).

    The config saved with the stock part describes the stock layers only (its layer entries trimmed, see
    :mod:`layerfold.models.layer_config`); the side file keeps the whole stack's entries to put back.
    """
    positions = _side_positions(model)
    if not positions:
        yield None
        return
    adapter = get_adapter(model)
    layers = list(adapter.get_layers(model))
    whole = layer_config.snapshot(model.config)
    stock = layer_config.snapshot(layer_config.trimmed(model.config, [i for i in range(len(layers)) if i not in positions]))
    tensors = {f"{pos}.{name}": t.detach().contiguous().cpu() for pos in positions for name, t in layers[pos].state_dict().items()}
    widths = {str(pos): layers[pos].get_submodule(adapter.mlp).fc1.out_features for pos in positions}
    meta = {"positions": positions, "widths": widths, "layer_config": whole}
    tensors["__meta__"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    try:
        _set_stack(model, [l for i, l in enumerate(layers) if i not in positions], stock)
        yield tensors
    finally:
        _set_stack(model, layers, whole)


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
    positions = sorted(meta["positions"])
    entries = meta.get("layer_config")
    if entries is None:  # a side file written before the whole stack's entries were recorded: layer_types only
        entries = {"num_hidden_layers": len(layers) + len(positions)}
        types = getattr(model.config, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) == len(layers):
            types = list(types)
            for pos in positions:
                types.insert(pos, types[min(pos, len(types) - 1)])
            entries["layer_types"] = types
    layer_config.restore(model.config, entries)  # the replacement layers are built for their own positions
    for pos in positions:
        layer = mlp_replacement_layer(model, pos, meta["widths"][str(pos)])
        layer.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(pos)})
        layers.insert(pos, layer)
    _set_stack(model, layers, entries)
    return model
