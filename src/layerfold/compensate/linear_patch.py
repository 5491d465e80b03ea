"""LinearPatch (Chen et al., NeurIPS 2025; arXiv 2505.24680): a Hadamard-rotation + channel-scale patch at each interface.

Removing layers ``a .. b - 1`` leaves the stream at dense boundary ``a`` where the next kept layer expects
boundary ``b``, whose channels have other magnitudes (massive activations grow with depth in a few
channels). LinearPatch rotates the stream by an orthonormal Hadamard matrix ``H`` (which spreads those
outlier channels over all), scales each rotated channel by how much larger its mean magnitude is at ``b``
than at ``a``, and rotates back:

    d_c = E_t |h_b H|_c / E_t |h_a H|_c          P = H diag(d) Hᵀ          stream <- stream P

over calibration tokens of the dense model (``estimate: ratio_of_means``, the formula; the released code,
``layer_select.py``, averages per-sequence ratios, ``estimate: mean_of_ratios``). ``rotation: none`` is the
released code's diagonal form (``P = diag(d)`` from the unrotated stream). One patch per interface: the
released code handles one contiguous block, whose single interface this reproduces; a method that removes
scattered layers gets a patch at each.

**Not a stock checkpoint.** ``P`` multiplies the whole residual stream, the embedding's and every earlier
layer's writes included, and every later layer reads it through a normalisation that does not commute
with a non-orthogonal ``P``: no stock weight can hold it. The patches are kept as a
:class:`~layerfold.models.patches.PatchSet` on the model (forward pre-hooks on the kept layer after each
interface, or on the final norm), saved to ``layerfold_patches.safetensors`` beside the stock files and
re-attached by ``layerfold.models.load_checkpoint``; plain ``from_pretrained`` loads the pruned model
without them. The released code likewise saves ``scales.pt`` and re-attaches it with a forward hook.

**Distillation.** The released code optionally trains ``P`` alone by KL on the dense model's top-50 logits
(``main_distill.py``, ``efficient_distill.py``): ``recovery=patch_kd`` runs that through the recovery engine
(``recovery.trainable=patch``, ``recovery.end_to_end.kd_top_k``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layerfold.compensate import DenseStack, Interface, register
from layerfold.compensate.hadamard import hadamard
from layerfold.models.patches import attach_patches


@dataclass
class LinearPatchConfig:
    name: str = "linear_patch"
    rotation: str = field(default="hadamard", metadata={"choices": ["hadamard", "none"]})
    estimate: str = field(default="ratio_of_means", metadata={"choices": ["ratio_of_means", "mean_of_ratios"]})
    ignore_first: int = field(default=0, metadata={"ge": 0})  # leading positions left out of the means


@register("linear_patch", LinearPatchConfig, stock=False, layer_major=False)
def linear_patch(dense: DenseStack, cfg: LinearPatchConfig, found: list[Interface]) -> dict:
    ctx = dense.ctx
    width = ctx.model.config.hidden_size
    rotation = hadamard(width) if cfg.rotation == "hadamard" else None
    boundaries = sorted({i.before for i in found} | {i.after for i in found})
    magnitudes = channel_magnitudes(dense, boundaries, rotation, cfg.ignore_first)
    matrices, summary = {}, []
    for interface in found:
        scale = channel_scale(magnitudes[interface.after], magnitudes[interface.before], cfg.estimate)
        matrices[interface.position] = patch_matrix(scale, rotation)
        summary.append({"position": interface.position, "scale_mean": round(float(scale.mean()), 6),
                        "scale_min": round(float(scale.min()), 6), "scale_max": round(float(scale.max()), 6)})
    if matrices:
        attach_patches(ctx.model, matrices)
    return {"patches": summary, "patch_parameters": len(matrices) * width * width}


def channel_scale(target: torch.Tensor, source: torch.Tensor, estimate: str) -> torch.Tensor:
    """``d`` from per-sequence mean magnitudes ``[sequences, d]`` at the two boundaries (float64)."""
    if estimate == "mean_of_ratios":
        return (target / source).mean(0)
    return target.mean(0) / source.mean(0)  # every sequence has the same number of tokens: the mean of means is the token mean


def patch_matrix(scale: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``H diag(d) Hᵀ`` (or ``diag(d)`` without rotation), float64."""
    if rotation is None:
        return torch.diag(scale)
    return rotation @ torch.diag(scale) @ rotation.T


def channel_magnitudes(dense: DenseStack, boundaries: list[int], rotation: torch.Tensor | None, ignore_first: int) -> dict[int, torch.Tensor]:
    """Per sequence, the mean ``|h H|`` of each channel at each of ``boundaries`` of the dense model: ``{boundary: [sequences, d]}`` float64."""
    found: dict[int, dict[int, torch.Tensor]] = {b: {} for b in boundaries}

    def add(boundary: int, batch: int, hidden: torch.Tensor) -> None:
        if boundary not in found:
            return
        states = hidden[:, ignore_first:].float()
        if rotation is not None:
            states = states @ rotation.to(states.device, torch.float32)
        found[boundary][batch] = states.abs().double().mean(1).cpu()  # [batch, d]

    with dense.dense() as (run, acts):
        run.run_layers(acts, 0, max(boundaries), on_boundary=add)
    return {b: torch.cat([per_batch[k] for k in sorted(per_batch)]) for b, per_batch in found.items()}

