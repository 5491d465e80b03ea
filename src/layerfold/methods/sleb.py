"""SLEB (Song et al., ICML 2024): remove whole blocks one at a time by calibration LM loss.

At every step each remaining (unprotected) layer is removed on trial and the calibration loss of the
model without it is measured; the layer whose removal gives the lowest loss goes for good, and the
search repeats on the smaller model. The released code (jiwonsong-dev/SLEB, ``sleb.py``) sums token
NLL over fixed-length windows; the mean NLL used here ranks candidates identically. Ties go to the
earliest candidate, as the released code's strict ``<`` does.

``protect_first`` / ``protect_last`` are SLEB's ``early_barrier`` / ``latter_barrier`` (1 and 1 by
default): the first and last *original* layers are never candidates. Protection follows original
indices through :attr:`MethodContext.plan`, so it stays right after earlier edits.

**Cost.** ``k = num_remove`` steps; step ``s`` has ``L_s = L - s`` layers and ``C_s`` candidates
(``L_s - 2`` by default), each scored on ``N`` calibration windows of ``T`` tokens. Removing block
``i`` leaves the blocks before it untouched, so every candidate of a step shares one pass over the
prefix: :func:`~layerfold.execution.loss.removal_nll` keeps the hidden state entering block ``i`` (one
``N x T x d`` tensor on the model's device), carries it forward one block per candidate, and runs
only blocks ``i+1..L_s-1`` and the head for "without ``i``". Layer passes over the ``N T`` tokens:

- before (a full forward per candidate): ``sum_s C_s (L_s - 1)``, about ``k L^2`` for ``k << L``;
- now: ``sum_s (L_s - 1 + sum_i (L_s - 1 - i))``, about ``k L^2 / 2``;
- heads (``O(N T d V)`` each) unchanged: one per candidate, ``sum_s C_s``.

A layer pass costs ``O(N T (d^2 + d d_ff) + N T^2 d)``. The saving is largest where the head is
cheap next to the stack (Llama-2-7B: head ~0.65 layer) and smaller where the vocabulary is large
for the width (SmolLM2-135M: head ~8 layers). The losses, and so the chosen blocks, are those of the
trial-removal loop bit for bit (same batches of ``ctx.batch_size`` windows);
``benchmarks/sleb_search.py`` measures both in one process. Measured on the 2-core CPU (SmolLM2,
fp32, one thread, 2 windows x 64 tokens; ``benchmarks/results/cpu_smollm2_sleb_search.json``): one
step over all candidates 1.87 -> 1.52 s at 10 layers, 7.42 -> 5.45 s at 20, 14.87 -> 10.01 s at 30
(block passes 72 -> 44, 342 -> 189, 812 -> 434); the 2-step search on 30 layers 27.9 -> 18.7 s
(1.49x), the same blocks removed and every candidate loss identical.

**Layer-major** (``hardware=sequential``): the context measures the same losses one layer at a time
(:class:`layerfold.execution.trials.LayerMajorStack`) with the same prefix sharing: the calibration
blocks are embedded once per step, the state entering each candidate is carried forward, and only
the suffix after it runs for "without ``i``". The losses equal the resident ones to float32 rounding.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from layerfold.config import ConfigError
from layerfold.models.facts import ModelFacts
from layerfold.methods import MethodCapabilities, MethodContext, check_target, register


@dataclass
class SLEBConfig:
    name: str = "sleb"
    num_remove: int = field(default=8, metadata={"ge": 1, "lt": "num_layers"})  # blocks removed, one per step
    protect_first: int = field(default=1, metadata={"ge": 0})  # early barrier: the first original layers never removed
    protect_last: int = field(default=1, metadata={"ge": 0})  # latter barrier: the last original layers never removed
    # one_shot: every candidate scored once on the dense model, the num_remove lowest removed together (Shortened
    # LLaMA's PPL criterion, Kim et al. 2024); false: SLEB's search, one removal per step
    one_shot: bool = False


def problems(cfg: SLEBConfig, facts: ModelFacts, params: Any) -> list[str]:
    """Enough layers outside the protected ones for ``num_remove`` (``validate``; compress checks again on the plan)."""
    layers = facts.num_layers
    free = layers - min(cfg.protect_first, layers) - min(cfg.protect_last, max(layers - cfg.protect_first, 0))
    if free < cfg.num_remove:
        return [f"method.num_remove={cfg.num_remove} but only {max(free, 0)} of the model's {layers} layers are not protected "
                f"(method.protect_first={cfg.protect_first}, method.protect_last={cfg.protect_last}); lower one of them."]
    return []


# Measures the calibration loss itself (no capture statistics), one removal at a time.
@register("sleb", SLEBConfig, capabilities=MethodCapabilities(edit="remove"), problems=problems)
def sleb(ctx: MethodContext, cfg: SLEBConfig) -> dict:
    check_target(ctx, cfg.num_remove)
    if cfg.protect_first < 0 or cfg.protect_last < 0:
        raise ConfigError("method.protect_first and method.protect_last must be >= 0.")
    total = ctx.plan.original_layers
    protected = set(range(min(cfg.protect_first, total))) | set(range(max(total - cfg.protect_last, 0), total))

    def candidates() -> list[int]:
        return [i for i, group in enumerate(ctx.plan.groups) if not protected.intersection(group)]

    if len(candidates()) < cfg.num_remove:
        raise ConfigError(
            f"method.num_remove={cfg.num_remove} but only {len(candidates())} layers are not protected "
            f"(protect_first={cfg.protect_first}, protect_last={cfg.protect_last}); lower one of them."
        )

    dense_loss = ctx.calibration_nll()
    if cfg.one_shot:
        return _one_shot(ctx, cfg, candidates(), dense_loss, protected)
    steps, removed = [], []
    for step in tqdm(range(cfg.num_remove), desc="sleb"):
        losses = ctx.removal_nll(candidates(), desc=f"sleb step {step + 1}")
        best = min(losses, key=lambda i: (losses[i], i))
        original = list(ctx.plan.groups[best])
        steps.append(
            {
                "step": step + 1,
                "candidates": [{"position": i, "original_layers": list(ctx.plan.groups[i]), "loss": round(v, 6)} for i, v in losses.items()],
                "removed_position": best,
                "removed_original": original,
                "loss": round(losses[best], 6),
            }
        )
        ctx.remove([best])
        removed.extend(original)
    return {
        "dense_loss": round(dense_loss, 6),
        "protected_layers": sorted(protected),
        "steps": steps,
        "removal_order": removed,  # original indices, in the order they were removed
        "removed_layers": sorted(removed),
        "final_loss": steps[-1]["loss"],
    }


def _one_shot(ctx: MethodContext, cfg: SLEBConfig, positions: list[int], dense_loss: float, protected: set[int]) -> dict:
    """Each candidate's removal scored on the dense model; the ``num_remove`` with the lowest loss removed at once."""
    losses = ctx.removal_nll(positions, desc="one-shot removal losses")
    chosen = sorted(losses, key=lambda i: (losses[i], i))[: cfg.num_remove]
    removed = sorted(o for i in chosen for o in ctx.plan.groups[i])
    ctx.remove(chosen)
    return {
        "dense_loss": round(dense_loss, 6),
        "protected_layers": sorted(protected),
        "one_shot": True,
        # perplexity increase of removing each layer alone, as the ratio exp(loss - dense loss)
        "candidates": [{"original_layer": i, "loss": round(v, 6), "perplexity_ratio": round(math.exp(v - dense_loss), 6)} for i, v in losses.items()],
        "removed_layers": removed,
    }
