"""Weight-space merges of whole layers: ``layer[base] <- combine(layer[base], layer[others])``.

Every linear weight named by the adapter is combined (biases too, when present, so Qwen2/OPT stay
consistent); normalisation weights stay the base layer's, as in LaCo and MKA. Arithmetic runs in
float32 and is cast back, so bf16 models do not accumulate rounding in the sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from layerfold.models.adapters import get_adapter

# combine(base_weight, [other weights]) -> merged weight, all float32 of one shape
Combine = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def rdsc_paper(base: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """LaCo Eq. 1: ``theta_l + sum_k (theta_{l+k} - theta_l)``, every difference taken from the *original* base."""
    return base + sum((o - base for o in others), torch.zeros_like(base))


def rdsc_code(base: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """The released LaCo code: ``W += W_{l+k} - W`` with ``W`` updated in place, which telescopes to the last layer."""
    merged = base.clone()
    for other in others:
        merged += other - merged
    return merged


def weighted(alpha: float) -> Combine:
    """MKA: ``alpha * theta_l + (1 - alpha) * theta_m`` for one partner layer."""

    def combine(base: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(others) != 1:
            raise ValueError("An alpha-merge combines exactly two layers.")
        return alpha * base + (1.0 - alpha) * others[0]

    return combine


@torch.no_grad()
def merge_weights(model: PreTrainedModel, base: int, others: Sequence[int], combine: Combine) -> list[str]:
    """Write ``combine`` of the layers' linear weights (and biases) into layer ``base``; returns the names written.

    Only layer ``base`` changes here; removing ``others`` is the caller's separate step.
    """
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    written = []
    for name in adapter.linears:
        target = layers[base].get_submodule(name)
        for attr in ("weight", "bias"):
            param = getattr(target, attr, None)
            if param is None:
                continue
            parts = [getattr(layers[i].get_submodule(name), attr).float() for i in others]
            param.copy_(combine(param.float(), parts).to(param.dtype))
            written.append(f"{name}.{attr}")
    return written
