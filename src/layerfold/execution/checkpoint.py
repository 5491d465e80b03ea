"""Write a checkpoint layer by layer: the model of a :class:`~layerfold.execution.LayerLoader` never exists as a whole.

The resident compress stage edits the whole model and calls ``save_pretrained``; under
``hardware=sequential`` the compressed model is a :class:`~layerfold.execution.PlannedLayerLoader`
over the base checkpoint, and :func:`save_layerwise` reads one layer at a time from it and appends it
to the current safetensors shard. Host memory holds one shard at most (``max_shard_bytes``, 5 GB by
default: a 70B bf16 model becomes 29 shards, never 140 GB in RAM).

The files are those ``save_pretrained`` writes: ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors``
plus ``model.safetensors.index.json`` when there is more than one shard), ``config.json`` (the
loader's config, ``dtype`` set to the stored dtype), ``generation_config.json`` when given, and the
tokenizer, and ``plan.json`` when a plan is given (sealed to the shards just written). Tensors pass through the compute dtype first, then the storage dtype, as a resident model
loaded in the compute dtype and saved in the storage dtype does, so the tensors are identical to the
resident path's. The directory appears only when complete (:func:`layerfold.io.atomic_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from safetensors.torch import save_file
from transformers import GenerationConfig, PreTrainedTokenizerBase

from layerfold.execution.loaders import CheckpointLayout, LayerLoader, StateDict, layer_prefix
from layerfold.io import atomic_dir, write_json
from layerfold.models import layer_config
from layerfold.models.adapters import get_adapter
from layerfold.models.fingerprint import seal_plan
from layerfold.models.replacement import save_side_layers
from layerfold.models.sources import PLAN_FILE, drop_unportable_keys

SHARD_BYTES = 5 * 2**30


def _stored(state: StateDict, dtype: torch.dtype) -> StateDict:
    """Floating tensors in the storage dtype, contiguous on the CPU (safetensors writes them as they are)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in state.items()}


class _ShardWriter:
    """Collects tensors into shards of at most ``max_bytes`` (a larger single group gets a shard of its own)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: StateDict = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, Any]] = []  # per shard: its temp file, its keys, its size in bytes

    def add(self, tensors: StateDict) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        part = self.folder / f".part-{len(self.shards)}.safetensors"
        save_file(self.pending, str(part), metadata={"format": "pt"})
        self.shards.append({"file": part, "keys": list(self.pending), "bytes": self.pending_bytes})
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Rename the parts as ``save_pretrained`` names shards, with the index when there is more than one."""
        self.flush()
        if len(self.shards) == 1:
            self.shards[0]["file"].rename(self.folder / "model.safetensors")
            return
        total = len(self.shards)
        weight_map, size = {}, 0
        for k, shard in enumerate(self.shards, start=1):
            name = f"model-{k:05d}-of-{total:05d}.safetensors"
            shard["file"].rename(self.folder / name)
            weight_map.update({key: name for key in shard["keys"]})
            size += shard["bytes"]
        write_json(self.folder / "model.safetensors.index.json", {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))})


@torch.no_grad()
def side_file_tensors(side: dict[int, nn.Module], whole_config: Any, adapter: Any, compute_dtype: torch.dtype,
                      storage_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The side file's tensors for replacement layers ``side`` (position -> module) of a stack whose config is
    ``whole_config``: what :func:`layerfold.models.replacement.detached_side_layers` takes from a resident model."""
    positions = sorted(side)
    tensors = {f"{pos}.{name}": _stored({"t": t.detach().to(compute_dtype)}, storage_dtype)["t"]
               for pos in positions for name, t in side[pos].state_dict().items()}
    widths = {str(pos): side[pos].get_submodule(adapter.mlp).fc1.out_features for pos in positions}
    meta = {"positions": positions, "widths": widths, "layer_config": layer_config.snapshot(whole_config)}
    tensors["__meta__"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return tensors


def save_layerwise(loader: LayerLoader, tokenizer: PreTrainedTokenizerBase, path: str | Path, compute_dtype: torch.dtype,
                   storage_dtype: torch.dtype, *, generation_config: GenerationConfig | None = None, plan: dict | None = None,
                   extra_json: dict[str, dict] | None = None, max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write ``loader``'s model to ``path`` as a Hugging Face checkpoint, one decoder layer in host memory at a time.

    ``plan``: written as ``plan.json`` with the fingerprint of the files just written
    (:func:`layerfold.models.fingerprint.seal_plan`); ``extra_json``: more files for the same directory.
    Both inside the same atomic rename: the checkpoint never appears without them.
    Layers of another class (a planned loader's ``side_layers``) go to the side file and the stock files
    describe the other layers, as ``save_checkpoint`` writes a resident model.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1.")
    adapter = get_adapter(loader.config)
    side = dict(getattr(loader, "side_layers", None) or {})  # layers of another class: the side file, as save_checkpoint does
    stock = [index for index in range(loader.num_layers) if index not in side]
    config = layer_config.trimmed(loader.config, stock) if side else loader.config
    layout = CheckpointLayout(config)  # the files save_pretrained writes (e.g. experts one by one)
    with atomic_dir(path) as tmp:
        shards = _ShardWriter(tmp, max_shard_bytes)
        shards.add(layout.to_checkpoint(_stored(loader.load_outer("cpu", compute_dtype), storage_dtype)))
        for position, index in enumerate(stock):
            prefix = layer_prefix(adapter, position)
            state = _stored(loader.load_layer(index, "cpu", compute_dtype), storage_dtype)
            shards.add(layout.to_checkpoint({prefix + key: tensor for key, tensor in state.items()}))
        shards.finish()
        if side:
            save_side_layers(side_file_tensors(side, loader.config, adapter, compute_dtype, storage_dtype), tmp)
        stored_before = config.dtype
        config.dtype = storage_dtype
        try:
            config.save_pretrained(tmp)
        finally:
            config.dtype = stored_before
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        drop_unportable_keys(tmp)  # as the resident save: no library versions in the files
        for name, content in (extra_json or {}).items():
            write_json(tmp / name, content)
        if plan is not None:
            write_json(tmp / PLAN_FILE, seal_plan(plan, tmp))

