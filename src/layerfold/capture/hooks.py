"""Hooks that expose the residual stream at every layer boundary.

``output_hidden_states`` is not used on purpose: its last entry is the *final-norm output*, so any
metric mixing it with the other (pre-norm) entries compares different spaces. Hooks on the decoder
layers give the pre-norm input of layer 0 and the pre-norm output of every layer, uniformly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from layerfold.models.adapters import get_adapter


def _hidden_from(output: object) -> torch.Tensor:
    # Decoder layers return a tensor in recent transformers and a tuple (hidden, ...) in older ones.
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerBoundaries:
    """Context manager collecting ``states[i]`` = residual stream entering layer ``i`` (``i = L``: leaving the last).

    Only the most recent forward pass is kept, so memory is one batch of boundaries, never the dataset.
    """

    def __init__(self, model: nn.Module, detach_to: torch.dtype = torch.float32) -> None:
        self.layers = get_adapter(model).get_layers(model)
        self.dtype = detach_to
        self.states: list[torch.Tensor | None] = [None] * (len(self.layers) + 1)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LayerBoundaries:
        def save_input(index: int):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                self.states[index] = hidden.detach().to(self.dtype)

            return hook

        def save_output(index: int):
            def hook(module, args, output):
                self.states[index + 1] = _hidden_from(output).detach().to(self.dtype)

            return hook

        self._handles.append(self.layers[0].register_forward_pre_hook(save_input(0), with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(save_output(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stacked(self) -> torch.Tensor:
        """Boundaries of the last forward as one tensor ``[batch, seq, L + 1, hidden]``."""
        return torch.stack(self.states, dim=2)  # type: ignore[arg-type]


def iterate_batches(blocks: torch.Tensor, batch_size: int, device: torch.device, desc: str | None = None) -> Iterator[torch.Tensor]:
    """Yield calibration blocks in batches on ``device`` with a progress bar."""
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, disable=desc is None, leave=False):
        yield blocks[start : start + batch_size].to(device)
