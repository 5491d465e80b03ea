"""Linear patches on the residual stream (LinearPatch), and how they are saved beside a stock checkpoint.

LinearPatch (Chen et al., NeurIPS 2025) multiplies the residual stream at a pruning interface by a
``d x d`` matrix ``P``. Nothing in a stock decoder can hold it: the stream is the sum of every earlier
layer's writes plus the embedding, and every later layer reads it through a normalisation that does not
commute with a non-orthogonal ``P``. So the patch is its own module:

- :class:`PatchSet`, registered on the model as ``layerfold_patches`` (so ``model.to``, ``named_parameters``
  and the recovery engine see it), holds one :class:`LinearPatch` per position; forward pre-hooks apply
  patch ``k`` to the hidden state entering decoder layer ``k``, or entering the final norm when ``k`` is
  the number of layers (an interface after the last kept layer).
- Saving (:func:`detached_patches`, used by ``layerfold.models.save_checkpoint``) takes the set out of the
  model while the stock files are written, so they hold the pruned model alone, and writes the patches to
  :data:`PATCH_FILE` (float32, with their positions). Plain ``from_pretrained`` therefore loads the pruned
  model *without* its patches; ``layerfold.models.load_checkpoint`` re-attaches them (:func:`attach_saved_patches`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from layerfold.models.adapters import get_adapter

PATCH_FILE = "layerfold_patches.safetensors"
ATTRIBUTE = "layerfold_patches"


class LinearPatch(nn.Module):
    """``x -> x P`` in float32 (the patch's precision whatever the model's), returned in ``x``'s dtype."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"A linear patch is a square matrix, got shape {tuple(matrix.shape)}.")
        self.weight = nn.Parameter(matrix.detach().to(torch.float32).clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.float() @ self.weight.float()).to(hidden.dtype)


class PatchSet(nn.Module):
    """The patches of one model, by position (``k`` < layers: entering decoder layer ``k``; ``k`` = layers: entering the final norm)."""

    def __init__(self, matrices: Mapping[int, torch.Tensor]) -> None:
        super().__init__()
        self.patches = nn.ModuleDict({str(int(k)): LinearPatch(v) for k, v in sorted(matrices.items())})
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def positions(self) -> list[int]:
        return sorted(int(k) for k in self.patches)

    def matrices(self) -> dict[int, torch.Tensor]:
        return {int(k): patch.weight.detach() for k, patch in self.patches.items()}


def _hidden_pre_hook(model: PreTrainedModel, position: int):
    def hook(module, args, kwargs):
        patch = getattr(model, ATTRIBUTE).patches[str(position)]
        if args:
            return (patch(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": patch(kwargs["hidden_states"])}

    return hook


def attach_patches(model: PreTrainedModel, matrices: Mapping[int, torch.Tensor]) -> PatchSet:
    """Put ``matrices`` (position -> ``d x d``) on ``model`` as its :class:`PatchSet`, replacing any earlier one."""
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    width = model.config.hidden_size
    for position, matrix in matrices.items():
        if not 0 <= int(position) <= len(layers):
            raise ValueError(f"A patch at position {position} does not fit a model of {len(layers)} layers (0..{len(layers)}).")
        if tuple(matrix.shape) != (width, width):
            raise ValueError(f"The patch at position {position} is {tuple(matrix.shape)} but the model's width is {width}.")
    remove_patches(model)
    reference = next(model.parameters())
    patches = PatchSet(matrices).to(reference.device)
    setattr(model, ATTRIBUTE, patches)
    for position in patches.positions:
        target = layers[position] if position < len(layers) else model.get_submodule(adapter.final_norm)
        patches._handles.append(target.register_forward_pre_hook(_hidden_pre_hook(model, position), with_kwargs=True))
    return patches


def remove_patches(model: PreTrainedModel) -> None:
    existing = getattr(model, ATTRIBUTE, None)
    if isinstance(existing, PatchSet):
        for handle in existing._handles:
            handle.remove()
        delattr(model, ATTRIBUTE)


@contextmanager
def detached_patches(model: PreTrainedModel) -> Iterator[dict[str, torch.Tensor] | None]:
    """While the stock files are written: the patch set out of the module tree (hooks stay); yields its tensors or None."""
    patches = getattr(model, ATTRIBUTE, None)
    if not isinstance(patches, PatchSet):
        yield None
        return
    tensors = {str(k): v.float().contiguous().cpu() for k, v in patches.matrices().items()}
    tensors["__meta__"] = torch.tensor(list(json.dumps({"positions": patches.positions, "layers": model.config.num_hidden_layers}).encode()),
                                       dtype=torch.uint8)
    del model._modules[ATTRIBUTE]
    try:
        yield tensors
    finally:
        model._modules[ATTRIBUTE] = patches


def save_patches(tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
    save_file(tensors, str(Path(directory) / PATCH_FILE))


def attach_saved_patches(model: PreTrainedModel, directory: str | Path) -> PreTrainedModel:
    """Re-attach the patches saved next to a stock checkpoint (no-op when there are none)."""
    path = Path(directory) / PATCH_FILE
    if not path.exists():
        return model
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    meta = json.loads(bytes(tensors.pop("__meta__").tolist()).decode())
    layers = get_adapter(model).num_layers(model)
    if meta["layers"] != layers:
        raise ValueError(f"{path} holds patches for a model of {meta['layers']} layers but the checkpoint has {layers}; they belong to another model.")
    attach_patches(model, {int(k): v for k, v in tensors.items()})
    return model
