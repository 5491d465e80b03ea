"""Linear edits folded into one decoder layer's projections: the output stays a stock layer.

Two compressions change a kept layer instead of adding a module:

- :class:`LinearFold` (ReplaceMe): the layer's MLP output ``m`` becomes ``m T`` for a ``d x d`` matrix
  ``T``: ``W <- Tᵀ W`` for the output projection's weight ``W`` (``[d, d_ff]``) and ``b <- b T`` for its bias.
- :class:`WriteScale` (Prune&Comp): everything the layer writes into the residual stream (attention and
  MLP output projections, weights and biases) is multiplied by a scalar ``c``.

Both are stated as data with the interface of :class:`layerfold.models.replacement.TensorInit`, so
:meth:`layerfold.methods.MethodContext.stand_in` applies them in place to a resident layer
(:meth:`apply_to`) and, under ``hardware=sequential``, the plan applies the same arithmetic to the
layer's state dict whenever it is built from the original shards (:meth:`apply`): float64 products,
cast back to the layer's dtype, identical tensors either way. ``plan.json`` records a description
(:meth:`to_json`) with a fingerprint of the values; a plan read back from JSON cannot rebuild them
(``TensorInit.from_json`` refuses the entry), the compressed checkpoint holds the result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn


def _fingerprint(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().double().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _linear_keys(state: Mapping[str, torch.Tensor], module: str) -> list[str]:
    keys = [k for k in (f"{module}.weight", f"{module}.bias") if k in state]
    if f"{module}.weight" not in keys:
        raise ValueError(f"The layer has no '{module}.weight' (its tensors: {sorted(state)[:8]}...); the fold names another architecture's projection.")
    return keys


class LinearFold:
    """The output of linear ``module`` right-multiplied by ``matrix`` (``d x d``): ``W <- Tᵀ W``, ``b <- b T``.

    Compared by identity (the matrix is data, not a value to hash).
    """

    def __init__(self, module: str, matrix: torch.Tensor, source: str = "") -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"A linear fold needs a square matrix, got shape {tuple(matrix.shape)}.")
        self.module = module
        self.matrix = matrix.detach().to("cpu", torch.float64)
        self.source = source

    def _new(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        matrix = self.matrix.to(tensor.device)
        if tensor.shape[0] != matrix.shape[0]:
            raise ValueError(f"{key} has {tensor.shape[0]} output rows but the fold's matrix is {tuple(matrix.shape)}.")
        if key.endswith(".weight"):
            return (matrix.T @ tensor.double()).to(tensor.dtype)
        return (tensor.double() @ matrix).to(tensor.dtype)

    def apply(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = set(_linear_keys(state, self.module))
        return {k: self._new(k, v) if k in keys else v for k, v in state.items()}

    @torch.no_grad()
    def apply_to(self, layer: nn.Module) -> None:
        state = layer.state_dict(keep_vars=True)
        for key in _linear_keys(state, self.module):
            state[key].copy_(self._new(key, state[key]))

    def to_json(self) -> dict:
        return {"linear_fold": self.module, "shape": list(self.matrix.shape), "sha256_16": _fingerprint(self.matrix), "source": self.source}

    def __repr__(self) -> str:
        return f"LinearFold({self.module}, {tuple(self.matrix.shape)}, {self.source})"


class WriteScale:
    """Every projection in ``modules`` (what the layer writes into the residual stream) multiplied by ``scale``."""

    def __init__(self, modules: Sequence[str], scale: float, source: str = "") -> None:
        if not modules:
            raise ValueError("WriteScale needs at least one module.")
        self.modules = tuple(modules)
        self.scale = float(scale)
        self.source = source

    def _keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        return [k for module in self.modules for k in _linear_keys(state, module)]

    def apply(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = set(self._keys(state))
        return {k: (v.double() * self.scale).to(v.dtype) if k in keys else v for k, v in state.items()}

    @torch.no_grad()
    def apply_to(self, layer: nn.Module) -> None:
        state = layer.state_dict(keep_vars=True)
        for key in self._keys(state):
            state[key].copy_((state[key].double() * self.scale).to(state[key].dtype))

    def to_json(self) -> dict:
        return {"write_scale": list(self.modules), "scale": self.scale, "source": self.source}

    def __repr__(self) -> str:
        return f"WriteScale({self.modules}, {self.scale:.6g}, {self.source})"
