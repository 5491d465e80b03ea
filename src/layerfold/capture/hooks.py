"""Hooks that expose the residual stream at every layer boundary.

``output_hidden_states`` is not used on purpose: its last entry is the *final-norm output*, so any
metric mixing it with the other (pre-norm) entries compares different spaces. Hooks on the decoder
layers give the pre-norm input of layer 0 and the pre-norm output of every layer, uniformly.

Two ways to receive a boundary: a callback ``on_boundary(index, hidden)`` that sees it while the
forward runs and keeps nothing (how :func:`~layerfold.capture.capture_statistics` streams), or, without
a callback, a copy of every boundary of the latest forward in ``states`` (for tests and small models).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from layerfold.models.adapters import get_adapter

BoundaryCallback = Callable[[int, torch.Tensor], None]


class StopForward(Exception):
    """Raised by a hook once it has taken what it waits for, so the rest of the forward is skipped; the code that
    ran the forward catches it."""


def hidden_into(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a decoder layer is called with (positionally in most families, else ``hidden_states=``)."""
    return args[0] if args else kwargs["hidden_states"]


def hidden_from(output: object) -> torch.Tensor:
    # Decoder layers return a tensor in recent transformers and a tuple (hidden, ...) in older ones.
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerBoundaries:
    """Context manager exposing boundary ``i`` = residual stream entering layer ``i`` (``i = L``: leaving the last).

    With ``on_boundary``, each boundary is handed to the callback (detached, in the model's dtype) as soon
    as its layer finishes and nothing is stored. Without it, ``states[i]`` holds a ``detach_to`` copy of
    the most recent forward pass: memory is one batch of boundaries, never the dataset.
    """

    def __init__(self, model: nn.Module, detach_to: torch.dtype = torch.float32, on_boundary: BoundaryCallback | None = None) -> None:
        self.layers = get_adapter(model).get_layers(model)
        self.dtype = detach_to
        self.on_boundary = on_boundary if on_boundary is not None else self._store
        self.states: list[torch.Tensor | None] = [None] * (len(self.layers) + 1)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _store(self, index: int, hidden: torch.Tensor) -> None:
        self.states[index] = hidden.to(self.dtype)

    def __enter__(self) -> LayerBoundaries:
        def entering_first_layer(module, args, kwargs):
            self.on_boundary(0, hidden_into(args, kwargs).detach())

        def leaving(index: int):
            def hook(module, args, output):
                self.on_boundary(index + 1, hidden_from(output).detach())

            return hook

        self._handles.append(self.layers[0].register_forward_pre_hook(entering_first_layer, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(leaving(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stacked(self) -> torch.Tensor:
        """Stored boundaries of the last forward as one tensor ``[batch, seq, L + 1, hidden]``."""
        return torch.stack(self.states, dim=2)  # type: ignore[arg-type]


def iterate_batches(blocks: torch.Tensor, batch_size: int, device: torch.device, desc: str | None = None) -> Iterator[torch.Tensor]:
    """Yield calibration blocks in batches on ``device`` with a progress bar."""
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, disable=True if desc is None else None, leave=False, unit="batch"):
        yield blocks[start : start + batch_size].to(device)
