"""LLM-Streamline (Chen et al., ICLR 2025): replace the most redundant consecutive block by one light layer.

**Selection.** For a window of layers mapping boundary ``j`` to boundary ``j + w``, the score is
``mean_t(0.5 + 0.5 cos(h_j, h_{j+w}))`` over calibration tokens, which the capture statistics give
directly as ``0.5 + 0.5 * cosine[j, j + w]``; the window with the highest score is chosen (first one
on ties, as ``argmax`` in the released code).

**How ``num_remove`` maps to the window** (so 30 -> 22 means ``num_remove=8`` for every replacement):
with a replacement, the window holds ``w = num_remove + 1`` layers and one new layer takes its place
(the released code's ``layer_intervals`` convention); with ``replacement: none`` the window holds
``w = num_remove`` layers and nothing is inserted (the paper's "Ours (None)").

**Top boundary** (``top_boundary``). Boundaries are the pre-norm residual stream at every layer (capture
hooks; ``pre_norm``, default). The released code reads ``output_hidden_states``, whose last entry is the
final-norm output, so its window ending at the last layer compares the window's input with the
final-norm output; ``top_boundary=final_norm`` (parity, ``+experiment=streamline_code_parity``) scores
that one window so, with one extra calibration pass (resident only). Every other window is the same.

**Replacements** (``replacement``), all placed at position ``j`` and recorded in ``plan.json`` as
standing for the whole window; the recover stage trains them (``recovery=distill`` is the paper's
MSE path, ``recovery=lm`` its LLM-loss path):

- ``transformer_layer``: layer ``j`` itself, i.e. a decoder layer initialised from the first pruned
  layer (the paper and code).
- ``ffn``: layer ``j`` with its attention branch zeroed (``o_proj = 0``, kept frozen by the recovery
  engine), so only the architecture's own FFN, initialised from layer ``j``, acts. A stock checkpoint.
- ``swiglu``: like ``ffn`` but the gated SwiGLU FFN and its pre-norm are freshly initialised (the paper's
  lightweight network trained from scratch): weights ``normal(0, initializer_range)``, norm 1, drawn
  from a CPU generator seeded with ``runtime.seed`` (:attr:`MethodContext.seed`), never the global RNG;
  only for families whose FFN is a dense SwiGLU (``docs/architectures.md``). On those families it has
  exactly the shape of ``ffn``; the two differ in initialisation.
- ``mlp``: the released example's ``d -> 4d`` ReLU ``4d -> d`` MLP, freshly initialised. No stock
  class has that shape: it is kept as a zero-attention decoder layer whose MLP is the ReLU MLP, so it
  also keeps the layer's pre-norm and residual (the released example has neither), and it is saved to
  a side file (:mod:`layerfold.models.replacement`). Plain ``from_pretrained`` on such a checkpoint
  loads the model *without* the MLP; ``layerfold.models.load_checkpoint`` restores it.
- ``none``: pure pruning of the window.

``transformer_layer``, ``ffn`` and ``swiglu`` are stock layers with some tensors given new values: the
method states them as a :class:`~layerfold.models.replacement.TensorInit` and lets the context apply
it (:meth:`MethodContext.stand_in`), so ``hardware=sequential`` builds the same replacement from the
original shards, tensor for tensor. ``mlp`` changes the layer's class: it is drawn from ``runtime.seed``
on the host (the same layer either way) and the plan carries it to the side file.

**Training departures** (the recover stage trains the replacement; released ``train_mseloss.py`` /
``train_llmloss.py``, see ``docs/recovery.md``): layerfold's AdamW puts no weight decay on norms and
biases (the released code decays every parameter; no setting); it clips gradients at
``recovery.max_grad_norm`` (1.0) on both paths (released: 5 on the MSE path, none on the LM path: set
``max_grad_norm=5`` / ``0``); warmup is ``recovery.warmup_ratio`` (0.03) of the optimiser steps
(released: 0.5 % of the micro-batches on the MSE path, 1 % on the LM path, stepped per optimiser step,
and a cosine horizon of half the run); it keeps the last state, not the best by validation loss
(released: best of the epoch-end validations; with ``epochs: 1`` the same unless training made it
worse); it trains with the model's causal mask and rotary positions (the released MSE path calls the
layer without a mask: bidirectional attention); the layer-local loss reads the positions
``recovery.local`` keeps (released: every position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layerfold.methods import CaptureReads, LayerMajorUnsupported, MethodCapabilities, MethodContext, check_target, final_norm_blocker, register
from layerfold.models.adapters import LayerAdapter
from layerfold.models.replacement import TensorInit, mlp_replacement_layer
from layerfold.scoring.top_boundary import final_norm_cosine
from layerfold.surgery import LayerSurgeryError
from layerfold.surgery.support import Family, family_of_model, replacement_refusal

REPLACEMENTS = ("transformer_layer", "ffn", "swiglu", "mlp", "none")
TOP_BOUNDARIES = ("pre_norm", "final_norm")


@dataclass
class StreamlineConfig:
    name: str = "streamline"
    num_remove: int = field(default=8, metadata={"ge": 1, "lt": "num_layers"})  # net layers removed: L -> L - num_remove
    replacement: str = field(default="transformer_layer", metadata={"choices": list(REPLACEMENTS)})
    mlp_ratio: int = field(default=4, metadata={"ge": 1})  # width of the mlp replacement, in hidden sizes
    # the state leaving the last layer: pre_norm (layerfold) | final_norm (HF hidden_states[-1], released code)
    top_boundary: str = field(default="pre_norm", metadata={"choices": list(TOP_BOUNDARIES)})


def window_scores(cosine: torch.Tensor, width: int) -> torch.Tensor:
    """``0.5 + 0.5 * cos(h_j, h_{j+width})`` for every window start ``j`` (mean token cosine, mapped to [0, 1])."""
    layers = cosine.shape[0] - 1
    if not 1 <= width <= layers:
        raise LayerSurgeryError(f"A window of {width} layers does not fit a model of {layers} layers.")
    return 0.5 + 0.5 * torch.diagonal(cosine, offset=width)


def check_replacement(model: torch.nn.Module, replacement: str) -> None:
    """Fail before any edit when the architecture cannot express ``replacement`` (the family rules, which
    ``validate`` applies from the config: :func:`layerfold.surgery.support.replacement_refusal`)."""
    if replacement not in REPLACEMENTS:
        raise LayerSurgeryError(f"method.replacement='{replacement}' is unknown; choose one of {', '.join(REPLACEMENTS)}.")
    why = replacement_refusal(family_of_model(model), replacement)
    if why is not None:
        raise LayerSurgeryError(why)


def side_layers(cfg: StreamlineConfig) -> tuple[str, str] | None:
    """The ReLU-MLP replacement is a class no stock architecture has: it lives in a side file (the resident loader's)."""
    if cfg.replacement != "mlp":
        return None
    return f"method.replacement={cfg.replacement}", "a stock replacement (method.replacement=ffn, swiglu or transformer_layer)"


def family_refusal(family: Family, cfg: StreamlineConfig) -> str | None:
    return replacement_refusal(family, str(cfg.get("replacement", "transformer_layer")))


def needs_training(cfg: StreamlineConfig) -> bool:
    """A replacement layer starts freshly initialised (only ``none`` removes the window and keeps nothing new)."""
    return cfg.replacement != "none"


CAPABILITIES = MethodCapabilities(
    edit=lambda cfg: "remove" if cfg.replacement == "none" else "replace",
    edit_note=lambda cfg: f"replaces its window by a new layer (replacement={cfg.replacement})",
    removes_only_with="replacement=none",
    layer_major=final_norm_blocker,
    # the window's two ends: num_remove layers apart when the window is removed, one more when a layer replaces it
    reads=CaptureReads(("cosine",), cosine_distance=lambda cfg: cfg.num_remove if cfg.replacement == "none" else cfg.num_remove + 1),
    writes_side_layers=side_layers,
    needs_training=needs_training,
    family_refusal=family_refusal,
)


@register("streamline", StreamlineConfig, capabilities=CAPABILITIES)
def streamline(ctx: MethodContext, cfg: StreamlineConfig) -> dict:
    check_target(ctx, cfg.num_remove)
    check_replacement(ctx.model, cfg.replacement)
    if cfg.top_boundary == "final_norm" and ctx.is_layer_major:
        raise LayerMajorUnsupported("method.top_boundary=final_norm runs an extra calibration pass on the resident model; it cannot "
                                    "run with hardware=sequential. Use hardware=resident, or method.top_boundary=pre_norm.")
    width = cfg.num_remove if cfg.replacement == "none" else cfg.num_remove + 1
    cosine = ctx.dense_stats().cosine
    if cosine.shape[0] != ctx.num_layers + 1:
        raise LayerSurgeryError(
            f"The statistics cover {cosine.shape[0] - 1} layers but the model has {ctx.num_layers}; "
            "capture them from the model being compressed."
        )
    scores = window_scores(cosine, width)
    if cfg.top_boundary == "final_norm":  # the window ending at the last layer, against the final-norm output
        last = ctx.num_layers - width
        scores[last] = 0.5 + 0.5 * final_norm_cosine(ctx.model, ctx.calibration, last, ctx.batch_size)
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
        "needs_training": needs_training(cfg),
    }


def replacement_init(replacement: str, adapter: LayerAdapter, initializer_range: float, seed: int) -> TensorInit | None:
    """The new values that turn the window's first layer into a stock replacement (None: the layer as it is)."""
    if replacement == "transformer_layer":
        return None
    if replacement == "ffn":
        return TensorInit(zero=(adapter.attn_output,))
    if replacement == "swiglu":
        return TensorInit(zero=(adapter.attn_output,), normal=adapter.mlp_linears, ones=adapter.ffn_branch_norms,
                          std=initializer_range, seed=seed)
    raise LayerSurgeryError(f"method.replacement={replacement} is not a re-initialised stock layer; choose one of transformer_layer, ffn, swiglu.")


@torch.no_grad()
def _replace(ctx: MethodContext, start: int, others: list[int], cfg: StreamlineConfig) -> None:
    """Turn layer ``start`` into the replacement and delete ``others``; the plan records the whole window."""
    if cfg.replacement == "mlp":
        # a fresh layer drawn from runtime.seed (not whatever the global RNG went through): the same layer resident and layer by layer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            layer = mlp_replacement_layer(ctx.model, start, cfg.mlp_ratio * ctx.model.config.hidden_size)
        ctx.swap_layer(start, others, layer)
        return
    std = float(getattr(ctx.model.config, "initializer_range", 0.02))
    ctx.stand_in(start, others, replacement_init(cfg.replacement, ctx.adapter, std, ctx.seed))
