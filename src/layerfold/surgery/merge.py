"""Weight-space merges of whole layers: ``layer[base] <- combine(layer[base], layer[others])``.

Every tensor of the layer outside its norms is combined (:meth:`LayerAdapter.merged_keys`): linear
weights and biases (so Qwen2/OPT stay consistent), and in a mixture-of-experts layer the routed
experts, the router and the shared experts. Normalisation weights stay the base layer's, as in LaCo and
MKA. Experts are stored expert-first (``[num_experts, ...]``), so the elementwise rule merges expert
``e`` of one layer with expert ``e`` of the other, and the router's row ``e`` (the logit that sends a
token to expert ``e``) with the same rule as that expert: LaCo's RDSC sums the differences of the
routers as it does of every other weight, MKA averages them with the same ``alpha``. Layers of
different structure (a dense layer and a MoE layer) cannot be combined elementwise and are refused
(:func:`mergeable`). Arithmetic runs in float32 and is cast back, so bf16 models do not accumulate
rounding in the sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from layerfold.models.adapters import get_adapter
from layerfold.surgery.remove import LayerSurgeryError

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


def layer_structure(layer: torch.nn.Module) -> tuple:
    """Names and shapes of a layer's tensors: two layers merge elementwise only when these agree."""
    return tuple(sorted((k, tuple(v.shape)) for k, v in layer.state_dict().items()))


def mergeable(model: PreTrainedModel, positions: Sequence[int]) -> bool:
    """Whether the layers at ``positions`` have one structure (works on meta layers: shapes only)."""
    layers = get_adapter(model).get_layers(model)
    first = layer_structure(layers[positions[0]])
    return all(layer_structure(layers[p]) == first for p in positions[1:])


@torch.no_grad()
def merge_weights(model: PreTrainedModel, base: int, others: Sequence[int], combine: Combine) -> list[str]:
    """Write ``combine`` of the layers' mergeable tensors into layer ``base``; returns the state-dict keys written.

    Only layer ``base`` changes here; removing ``others`` is the caller's separate step.
    """
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    if not mergeable(model, [base, *others]):
        raise LayerSurgeryError(
            f"Layers {[base, *others]} differ in structure (e.g. a dense MLP and a mixture-of-experts block) and cannot be "
            "merged weight by weight; merge only layers of one kind."
        )
    target = layers[base].state_dict(keep_vars=True)
    parts = [layers[i].state_dict(keep_vars=True) for i in others]
    written = adapter.merged_keys(target)
    for key in written:
        tensor = target[key]
        tensor.copy_(combine(tensor.float(), [part[key].float() for part in parts]).to(tensor.dtype))
    return written
