"""LLM-Streamline (Chen et al., ICLR 2025): replace the most redundant consecutive block by one light layer.

**Selection.** For a window of layers mapping boundary ``j`` to boundary ``j + w``, the score is
``mean_t(0.5 + 0.5 cos(h_j, h_{j+w}))`` over calibration tokens, which the capture statistics give
directly as ``0.5 + 0.5 * cosine[j, j + w]``; the window with the highest score is chosen (first one
on ties, as ``argmax`` in the released code).

**How ``num_remove`` maps to the window** (so 30 -> 22 means ``num_remove=8`` for every replacement):
with a replacement, the window holds ``w = num_remove + 1`` layers and one new layer takes its place
(the released code's ``layer_intervals`` convention); with ``replacement: none`` the window holds
``w = num_remove`` layers and nothing is inserted (the paper's "Ours (None)").

Boundaries are the pre-norm residual stream at every layer (capture hooks). The released code reads
``output_hidden_states``, whose last entry is the final-norm output, so its window ending at the last
layer compares a different space; layerfold compares pre-norm states throughout.

**Replacements** (``replacement``), all placed at position ``j`` and recorded in ``plan.json`` as
standing for the whole window; the recover stage trains them (``recovery=distill`` is the paper's
MSE path, ``recovery=lm`` its LLM-loss path):

- ``transformer_layer``: layer ``j`` itself, i.e. a decoder layer initialised from the first pruned
  layer (the paper and code).
- ``ffn``: layer ``j`` with its attention branch zeroed (``o_proj = 0``, kept frozen by the recovery
  engine), so only the architecture's own FFN, initialised from layer ``j``, acts. A stock checkpoint.
- ``swiglu``: like ``ffn`` but the gated SwiGLU FFN and its pre-norm are freshly initialised (the paper's
  lightweight network trained from scratch); only for families whose FFN is SwiGLU (Llama, Mistral,
  Qwen2, Qwen3). On those families it has exactly the shape of ``ffn``; the two differ in initialisation.
- ``mlp``: the released example's ``d -> 4d`` ReLU ``4d -> d`` MLP, freshly initialised. No stock
  class has that shape: it is kept as a zero-attention decoder layer whose MLP is the ReLU MLP, so it
  also keeps the layer's pre-norm and residual (the released example has neither), and it is saved to
  a side file (:mod:`layerfold.models.replacement`). Plain ``from_pretrained`` on such a checkpoint
  loads the model *without* the MLP; ``layerfold.models.load_checkpoint`` restores it.
- ``none``: pure pruning of the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layerfold.methods import MethodContext, check_target, register
from layerfold.models.replacement import mlp_replacement_layer, zero_attention
from layerfold.surgery import LayerSurgeryError, remove_layers

REPLACEMENTS = ("transformer_layer", "ffn", "swiglu", "mlp", "none")
SWIGLU_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class StreamlineConfig:
    name: str = "streamline"
    num_remove: int = field(default=8, metadata={"ge": 1, "lt": "num_layers"})  # net layers removed: L -> L - num_remove
    replacement: str = field(default="transformer_layer", metadata={"choices": list(REPLACEMENTS)})
    mlp_ratio: int = field(default=4, metadata={"ge": 1})  # width of the mlp replacement, in hidden sizes


def window_scores(cosine: torch.Tensor, width: int) -> torch.Tensor:
    """``0.5 + 0.5 * cos(h_j, h_{j+width})`` for every window start ``j`` (mean token cosine, mapped to [0, 1])."""
    layers = cosine.shape[0] - 1
    if not 1 <= width <= layers:
        raise LayerSurgeryError(f"A window of {width} layers does not fit a model of {layers} layers.")
    return 0.5 + 0.5 * torch.diagonal(cosine, offset=width)


def check_replacement(model_type: str, replacement: str) -> None:
    """Fail before any edit when the architecture cannot express ``replacement``."""
    if replacement not in REPLACEMENTS:
        raise LayerSurgeryError(f"method.replacement='{replacement}' is unknown; choose one of {', '.join(REPLACEMENTS)}.")
    if replacement == "swiglu" and model_type not in SWIGLU_FAMILIES:
        raise LayerSurgeryError(
            f"method.replacement=swiglu needs a SwiGLU FFN, which '{model_type}' does not have "
            f"(supported: {', '.join(SWIGLU_FAMILIES)}); use replacement=ffn for this architecture's own FFN."
        )
    if replacement == "mlp" and model_type in ("opt",):
        raise LayerSurgeryError(
            f"method.replacement=mlp needs the MLP to be a submodule of the decoder layer, which '{model_type}' "
            "does not have; use replacement=ffn (its own FFN is already a ReLU MLP)."
        )


@register("streamline", StreamlineConfig)
def streamline(ctx: MethodContext, cfg: StreamlineConfig) -> dict:
    check_target(ctx, cfg.num_remove)
    check_replacement(ctx.model.config.model_type, cfg.replacement)
    width = cfg.num_remove if cfg.replacement == "none" else cfg.num_remove + 1
    cosine = ctx.dense_stats().cosine
    if cosine.shape[0] != ctx.num_layers + 1:
        raise LayerSurgeryError(
            f"The statistics cover {cosine.shape[0] - 1} layers but the model has {ctx.num_layers}; "
            "capture them from the model being compressed."
        )
    scores = window_scores(cosine, width)
    start = int(torch.argmax(scores))
    window = list(range(start, start + width))

    if cfg.replacement == "none":
        ctx.remove(window)
    else:
        _replace(ctx, start, window[1:], cfg)
    return {
        "window_scores": [round(float(v), 6) for v in scores],  # index = first layer of the window
        "window": window,
        "window_score": round(float(scores[start]), 6),
        "replacement": cfg.replacement,
        "replacement_layer": None if cfg.replacement == "none" else start,
        # Layers whose attention branch is zero by construction; the recovery engine keeps it frozen.
        "attention_free_layers": [start] if cfg.replacement in ("ffn", "swiglu", "mlp") else [],
        "needs_training": cfg.replacement != "none",
    }


@torch.no_grad()
def _replace(ctx: MethodContext, start: int, others: list[int], cfg: StreamlineConfig) -> None:
    """Turn layer ``start`` into the replacement and delete ``others``; the plan records the whole window."""
    adapter = ctx.adapter
    layers = ctx.layers()
    if cfg.replacement in ("ffn", "swiglu"):
        zero_attention(layers[start], adapter.attn_output)
    if cfg.replacement == "swiglu":
        layer = layers[start]
        std = getattr(ctx.model.config, "initializer_range", 0.02)
        for name in adapter.mlp_linears:
            layer.get_submodule(name).weight.normal_(0.0, std)
        layer.get_submodule(adapter.norms[1]).weight.fill_(1.0)
    if cfg.replacement == "mlp":
        layers[start] = mlp_replacement_layer(ctx.model, start, cfg.mlp_ratio * ctx.model.config.hidden_size)
    ctx.plan.merge(start, others)
    remove_layers(ctx.model, others)
