"""Per-layer weight loaders: where the weights of one decoder layer come from, one layer at a time.

Layer-major execution never holds a whole model. It asks a :class:`LayerLoader` for the state dict
of decoder layer ``i`` (keys relative to the layer, e.g. ``self_attn.q_proj.weight``) right before
the layer runs, and for the outer modules (embeddings, final norm, LM head; keys relative to the
model) once. Three sources share that interface:

- :class:`SafetensorsLayerLoader`: a checkpoint directory; only layer ``i``'s tensors are read from
  the shards (``safe_open`` maps the file, ``get_tensor`` copies one tensor), so host memory holds one
  layer at most, never the model.
- :class:`SeededLayerLoader`: weights drawn from a generator seeded by ``(seed, i)``, for paper-scale
  shapes whose checkpoints cannot be stored (a 70B bf16 model is 140 GB). Real time and memory,
  never accuracy.
- :class:`ModelLayerLoader`: an HF model already in memory (tests, and resident models that a
  layer-major consumer should read without a copy).

Every loader knows the ``config`` of the stack it describes and which adapter (model family) it
follows; the decoder layers are found through that adapter, never by hard-coded names.

**Checkpoint layout.** A checkpoint on disk need not name its tensors as the model does: transformers
stores mixture-of-experts weights one expert at a time (Mixtral's ``block_sparse_moe.experts.3.w1``,
Qwen-MoE's and DeepSeek's ``mlp.experts.3.gate_proj``) and fuses them into 3-D ``experts.gate_up_proj``
/ ``down_proj`` parameters when it loads them, by its per-family conversion mapping.
:class:`CheckpointLayout` applies that mapping to one layer at a time (and its reverse when a layer is
written, :func:`~layerfold.execution.checkpoint.save_layerwise`), so a layer read from the shards is
the layer ``from_pretrained`` would build, and a layer-by-layer checkpoint has the files
``save_pretrained`` writes.
"""

from __future__ import annotations

import copy
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from layerfold.models.adapters import LayerAdapter, get_adapter
from layerfold.models.facts import ModelSourceError
from layerfold.models.patches import PATCH_FILE
from layerfold.models.replacement import SIDE_FILE
from layerfold.models.sources import POINTER_FILE, resolve_pointer

StateDict = dict[str, torch.Tensor]


class CheckpointLayout:
    """transformers' key conversion between a family's checkpoint layout and its model, applied per layer.

    Keys are full names (``model.layers.3.mlp.experts.0.gate_proj.weight``); tensors keep their values, only
    names and stacking change (experts stacked into one 3-D tensor, expert first, in checkpoint order).
    Families without a conversion mapping pass through unchanged.
    """

    def __init__(self, config: PretrainedConfig) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model = meta_model(config)
        self.mapping = get_model_conversion_mapping(self.model)
        self.keys = self.model.state_dict()  # meta tensors: names (and shapes) only

    def to_model(self, state: StateDict) -> StateDict:
        """Checkpoint keys (as stored) -> the model's own state-dict keys (as ``from_pretrained`` loads them)."""
        if not self.mapping:
            return state
        from copy import deepcopy

        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        targets: dict[str, WeightRenaming | WeightConverter] = {}
        for key, tensor in sorted(state.items(), key=lambda item: dot_natural_key(item[0])):
            renamed, pattern = rename_source_key(key, renamings, converters, self.model.base_model_prefix, self.keys)
            if renamed not in self.keys and key in self.keys:
                renamed, pattern = key, None  # already in the model's layout (e.g. written by save_layerwise of an older layerfold)
            if pattern is not None:
                transform = targets.setdefault(renamed, deepcopy(by_pattern[pattern]))
            else:
                transform = targets.setdefault(renamed, WeightRenaming(key, renamed))
                pattern = key
            transform.add_tensor(renamed, key, pattern, tensor)
        converted: StateDict = {}
        for first, transform in targets.items():
            for target, value in transform.convert(first, model=self.model, config=self.model.config).items():
                converted[target] = value[0] if isinstance(value, list) else value
        return converted

    def to_checkpoint(self, state: StateDict) -> StateDict:
        """The model's state-dict keys -> the checkpoint layout ``save_pretrained`` writes."""
        if not self.mapping:
            return state
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, state)


@runtime_checkable
class LayerLoader(Protocol):
    """Weights of a decoder stack, one layer at a time."""

    @property
    def config(self) -> PretrainedConfig:
        """The HF config of the stack this loader describes (``num_hidden_layers`` = :attr:`num_layers`)."""

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""

    def load_layer(self, index: int, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        """State dict of decoder layer ``index``, keys relative to the layer, floating tensors in ``dtype``."""

    def load_outer(self, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        """State dict of everything outside the decoder layers (embeddings, final norm, LM head), keys relative to the model."""


class LayerIndexError(IndexError):
    """A layer index outside the stack; the message names the index and the valid range."""


def check_index(index: int, num_layers: int) -> None:
    if not 0 <= index < num_layers:
        raise LayerIndexError(f"Layer index {index} is outside the stack of {num_layers} layers (valid: 0..{num_layers - 1}).")


def cast(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Move to ``device``; floating tensors also to ``dtype`` (integer buffers keep theirs)."""
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def layer_prefix(adapter: LayerAdapter, index: int) -> str:
    """The state-dict prefix of decoder layer ``index`` in a full model, e.g. ``model.layers.3.``."""
    return f"{adapter.layers}.{index}."


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of ``config`` with every parameter and buffer on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------------------------------------------
class SafetensorsLayerLoader:
    """Reads one decoder layer at a time from a checkpoint directory's safetensors file(s).

    The key index comes from ``model.safetensors.index.json`` (sharded) or the header of a single
    ``model.safetensors``; ``load_layer(i)`` opens only the shards holding layer ``i`` and reads only
    its tensors.
    """

    def __init__(self, checkpoint_dir: str | Path) -> None:
        path = Path(checkpoint_dir)
        if (path / POINTER_FILE).exists() and not (path / "config.json").exists():
            path = resolve_pointer(path)  # recovery=none writes a pointer to the compressed checkpoint
        if not (path / "config.json").exists():
            raise ModelSourceError(f"No checkpoint at {path} (no config.json). Point the loader at a Hugging Face model directory.")
        if (path / SIDE_FILE).exists():
            raise ModelSourceError(
                f"{path} holds LLM-Streamline replacement layers ({SIDE_FILE}) that no stock layer class expresses; "
                "layer-major execution cannot load them. Run this checkpoint with hardware=resident."
            )
        if (path / PATCH_FILE).exists():
            raise ModelSourceError(
                f"{path} holds LinearPatch patches ({PATCH_FILE}) that act on the residual stream between layers; layer-major "
                "execution cannot apply them. Run this checkpoint with hardware=resident."
            )
        self.path = path
        self._config = AutoConfig.from_pretrained(path)
        self.adapter = get_adapter(self._config)
        self.layout = CheckpointLayout(self._config)
        self._layer_keys, self._outer_keys = self._index(self._weight_map(path))

    @property
    def config(self) -> PretrainedConfig:
        return self._config

    @property
    def num_layers(self) -> int:
        return self._config.num_hidden_layers

    @staticmethod
    def _weight_map(path: Path) -> dict[str, str]:
        """Tensor name -> shard file name."""
        index = path / "model.safetensors.index.json"
        if index.exists():
            return json.loads(index.read_text())["weight_map"]
        single = path / "model.safetensors"
        if not single.exists():
            raise ModelSourceError(f"{path} has neither model.safetensors nor model.safetensors.index.json; only safetensors checkpoints load layer by layer.")
        with safe_open(str(single), framework="pt") as handle:
            return {key: single.name for key in handle.keys()}

    def _index(self, weight_map: dict[str, str]) -> tuple[dict[int, dict[str, list[str]]], dict[str, list[str]]]:
        """Group tensor names by decoder layer (then shard), the rest as outer tensors."""
        pattern = re.compile(rf"^{re.escape(self.adapter.layers)}\.(\d+)\.")
        layers: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        outer: dict[str, list[str]] = defaultdict(list)
        for key, shard in weight_map.items():
            match = pattern.match(key)
            if match:
                layers[int(match.group(1))][shard].append(key)
            else:
                outer[shard].append(key)
        missing = [i for i in range(self.num_layers) if i not in layers]
        if missing:
            raise ModelSourceError(
                f"{self.path}: config.json says num_hidden_layers={self.num_layers} but the safetensors hold no tensors for layers "
                f"{missing}. The checkpoint is incomplete or its config is stale; re-save it (layerfold.models.save_checkpoint)."
            )
        return layers, outer

    def _read(self, shards: dict[str, list[str]], strip: str, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        stored = {}
        for shard, keys in shards.items():
            with safe_open(str(self.path / shard), framework="pt") as handle:
                for key in keys:
                    stored[key] = cast(handle.get_tensor(key), device, dtype)
        return {key[len(strip):]: tensor for key, tensor in self.layout.to_model(stored).items()}

    def load_layer(self, index: int, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        check_index(index, self.num_layers)
        return self._read(self._layer_keys[index], layer_prefix(self.adapter, index), device, dtype)

    def load_outer(self, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        return self._read(self._outer_keys, "", device, dtype)


# ---------------------------------------------------------------------------------------------------
class SeededLayerLoader:
    """Random weights of a config's shape, drawn per layer from a generator seeded by ``(seed, layer)``.

    Initialisation follows HF's: linear and embedding weights ``normal(0, initializer_range)``, norm
    weights (1-D ``weight``) ones, biases zeros, so activations stay finite through 80 layers. Values
    are generated in ``dtype`` (the "stored" precision, like a bf16 checkpoint) and then cast to the
    requested compute dtype, so a layer is the same whatever dtype asks for it.

    The numbers depend on the generating device type (CPU and CUDA generators differ). By default a
    layer is generated on the device that asks for it, which on a GPU is fast (a 70B layer, 1.7 GB,
    takes milliseconds) where a CPU would dominate the run; ``generator_device`` pins it, e.g. to
    ``"cpu"`` for a checkpoint that must match the same loader on any machine.
    """

    # Layer i uses generator seed ``seed * SEED_STRIDE + i + 1``; the outer modules use ``seed * SEED_STRIDE``.
    SEED_STRIDE = 1_000_003

    def __init__(self, config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 generator_device: torch.device | str | None = None) -> None:
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (it seeds torch generators).")
        self._config = config
        self.seed = seed
        self.dtype = dtype
        self.generator_device = None if generator_device is None else torch.device(generator_device)
        self.adapter = get_adapter(config)
        skeleton = meta_model(config)
        self.std = float(getattr(config, "initializer_range", 0.02))
        layers = self.adapter.get_layers(skeleton)
        # Layers of one stack can differ in shape (none of the supported families do, but the price is nothing).
        self._layer_shapes = [{k: (tuple(v.shape), v.is_floating_point()) for k, v in layer.state_dict().items()} for layer in layers]
        prefix = f"{self.adapter.layers}."
        outer = {k: v for k, v in skeleton.state_dict().items() if not k.startswith(prefix)}
        self._outer_shapes = {k: (tuple(v.shape), v.is_floating_point()) for k, v in _untied(skeleton, outer).items()}

    @property
    def config(self) -> PretrainedConfig:
        return self._config

    @property
    def num_layers(self) -> int:
        return len(self._layer_shapes)

    def _generate(self, shapes: dict[str, tuple[tuple[int, ...], bool]], stream: int, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        where = self.generator_device or torch.device(device)
        generator = torch.Generator(device=where)
        generator.manual_seed(self.seed * self.SEED_STRIDE + stream)
        state = {}
        for key in sorted(shapes):  # a fixed order: the same tensor always gets the same numbers
            shape, floating = shapes[key]
            if key.endswith("bias") or not floating:
                tensor = torch.zeros(shape, dtype=self.dtype if floating else torch.long, device=where)
            elif len(shape) == 1:  # norm scales
                tensor = torch.ones(shape, dtype=self.dtype, device=where)
            else:
                tensor = torch.empty(shape, dtype=self.dtype, device=where).normal_(0.0, self.std, generator=generator)
            state[key] = cast(tensor, device, dtype)
        return state

    def load_layer(self, index: int, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        check_index(index, self.num_layers)
        return self._generate(self._layer_shapes[index], index + 1, device, dtype)

    def load_outer(self, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        return self._generate(self._outer_shapes, 0, device, dtype)


def _untied(model: nn.Module, outer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the LM head from ``outer`` when the config ties it to the embedding (it is the same tensor)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return outer
    head = model.get_output_embeddings()
    names = {name for name, module in model.named_modules() if module is head}
    return {k: v for k, v in outer.items() if k.rsplit(".", 1)[0] not in names}


# ---------------------------------------------------------------------------------------------------
class ModelLayerLoader:
    """The layers of an HF model already in memory; tensors are returned as views when device and dtype already match."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self._config = copy.deepcopy(model.config)
        self._config.num_hidden_layers = self.adapter.num_layers(model)

    @property
    def config(self) -> PretrainedConfig:
        return self._config

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    def load_layer(self, index: int, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        check_index(index, self.num_layers)
        layer = self.adapter.get_layers(self.model)[index]
        return {k: cast(v.detach(), device, dtype) for k, v in layer.state_dict().items()}

    def load_outer(self, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        prefix = f"{self.adapter.layers}."
        outer = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefix)}
        return {k: cast(v.detach(), device, dtype) for k, v in _untied(self.model, outer).items()}


# ---------------------------------------------------------------------------------------------------
class OverriddenLayerLoader:
    """Another loader's stack with some decoder layers taken from given state dicts instead (e.g. layers
    a recovery run trained); every other tensor still comes from ``base``, one layer at a time."""

    def __init__(self, base: LayerLoader, layers: dict[int, StateDict]) -> None:
        for index in layers:
            check_index(index, base.num_layers)
        self.base = base
        self.layers = layers

    @property
    def config(self) -> PretrainedConfig:
        return self.base.config

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    def load_layer(self, index: int, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        if index not in self.layers:
            return self.base.load_layer(index, device, dtype)
        return {k: cast(v.detach(), device, dtype) for k, v in self.layers[index].items()}

    def load_outer(self, device: torch.device | str, dtype: torch.dtype) -> StateDict:
        return self.base.load_outer(device, dtype)
