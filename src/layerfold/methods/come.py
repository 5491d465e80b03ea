"""CoMe, "Layer as Puzzle Pieces: Compressing LLMs through Layer Concatenation" (Wang et al., NeurIPS 2025; arXiv 2510.15304).

Progressive: until the model has the target depth, per step::

    scores   = one calibration pass with hooks (layerfold.capture.channels) on the *current* model:
               FFN channel and key-value-group sensitivities, clamped Block Influence BI_k, skip score
    window   = the n adjacent layers with the smallest skip score (angular distance across them; last
               token for CoMe, all tokens for CoMe-P); with wo_repeat, windows touching a merged layer are out
    ratio    = block_ratio(BI of the window, psu, min_max)                         (ratio="bi", CoMe)
             | argmin_r calibration loss of the merge with [r, 1 - r], r in 0, 1/g, ..., 1   (ratio="posterior", CoMe-P)
    merge    = concatenation of each layer's top heads/channels within its budget (layerfold.surgery.concat)

``n`` is ``merge_layers`` (the released code's ``merge_item``, 2), or fewer on the last step so the
stack never goes below the target. ``ctx.plan`` records the original layers behind every merged
layer (the released ``merge_info``), which is what hierarchical distillation reads.

Departures from the released code (WangFei-2019/CoMe, ``methods/concat_merge*.py``):

- **Scores from hooks** on the stock model, summed per channel as the pass runs; the code patches
  each modeling file and keeps every layer's ``[batch, seq, intermediate]`` activations.
- **Grouped-query heads** kept with their own query heads (``heads="grouped"``); ``heads="tiled"`` is
  the code's selection (see :mod:`layerfold.surgery.concat`).
- **CoMe-P trials in place** through :meth:`MethodContext.trial` (one layer cloned per trial); the
  code deep-copies the whole model for each of the ``g + 1`` trials.
- **wo_repeat** refuses a target it cannot reach, before scoring, and also excludes windows after
  which the remaining merges would run out of adjacent never-merged layers; the code would silently
  re-merge a merged layer once every window is excluded (``index(min)`` of all-``inf`` scores).
- **Boundaries** are pre-norm throughout (the code's last hidden state is the final-norm output).

``norms="mean"`` (default) averages layer norms plainly, as the code does, even for a layer given no
share; ``norms="weighted"`` weights them by the ratio, so that ratio ``(1, 0)`` is exactly "drop the
second layer".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from tqdm.auto import tqdm

from layerfold.capture.channels import SKIP_TOKENS, ChannelStatistics
from layerfold.config import ConfigError
from layerfold.methods import MethodContext, register
from layerfold.scoring.channels import (
    block_ratio,
    choose_pieces,
    ffn_sensitivity,
    head_group_sensitivity,
    ratio_grid,
    window_min_max,
)
from layerfold.surgery import LayerSurgeryError
from layerfold.surgery.concat import HEAD_MODES, NORM_MODES, ConcatLayout, concat_layout, concat_merge_state  # noqa: F401

log = logging.getLogger(__name__)

RATIOS = ("bi", "posterior")


@dataclass
class CoMeConfig:
    name: str = "come"
    num_remove: Optional[int] = field(default=8, metadata={"ge": 1, "lt": "num_layers"})  # layers fewer at the end; or target_layers
    target_layers: Optional[int] = field(default=None, metadata={"ge": 1, "lt": "num_layers"})  # final depth (--target-layers)
    merge_layers: int = field(default=2, metadata={"ge": 2})  # layers concatenated per step (--merge-item)
    ratio: str = field(default="bi", metadata={"choices": list(RATIOS)})  # bi: BI ratio (CoMe) | posterior: loss grid (CoMe-P)
    psu: float = field(default=1.0, metadata={"gt": 0.0})  # exponent on the normalised BI (--psu)
    min_max: float = field(default=0.0, metadata={"ge": 0.0, "le": 1.0})  # floor of the largest share (--min-max)
    granularity: int = field(default=20, metadata={"ge": 1})  # CoMe-P grid 0, 1/g, ..., 1 (--granularity)
    skip_tokens: str = field(default="last", metadata={"choices": list(SKIP_TOKENS)})  # skip score on the last token | all tokens (CoMe-P)
    wo_repeat: bool = True  # never merge an already merged layer again (--wo-repeat)
    heads: str = field(default="grouped", metadata={"choices": list(HEAD_MODES)})  # grouped (GQA-correct) | tiled (released code)
    norms: str = field(default="mean", metadata={"choices": list(NORM_MODES)})  # mean (released code) | weighted by the ratio


@dataclass
class CoMePConfig(CoMeConfig):
    """CoMe-P: the same loop with the ratio chosen by calibration loss and the skip score over all tokens."""

    name: str = "come_p"
    ratio: str = field(default="posterior", metadata={"choices": list(RATIOS)})
    skip_tokens: str = field(default="all", metadata={"choices": list(SKIP_TOKENS)})


def target_depth(cfg: CoMeConfig, layers: int) -> int:
    """The final depth from ``target_layers`` or ``num_remove`` (exactly one of them set)."""
    if (cfg.target_layers is None) == (cfg.num_remove is None):
        raise ConfigError(
            f"method: set exactly one of num_remove ({cfg.num_remove}) and target_layers ({cfg.target_layers}); "
            "e.g. `-S method.target_layers=16 -S method.num_remove=null`."
        )
    target = cfg.target_layers if cfg.target_layers is not None else layers - cfg.num_remove
    if not 1 <= target < layers:
        key, value = ("target_layers", cfg.target_layers) if cfg.target_layers is not None else ("num_remove", cfg.num_remove)
        raise ConfigError(
            f"method.{key}={value} gives a target of {target} layers; the model has {layers}, so the target must be "
            f"between 1 and {layers - 1}."
        )
    return target


def merge_steps(layers: int, target: int, merge_layers: int) -> list[int]:
    """Window size of every step from ``layers`` down to ``target`` (each step removes ``n - 1`` layers)."""
    steps = []
    while layers > target:
        n = min(merge_layers, layers - target + 1)
        steps.append(n)
        layers -= n - 1
    return steps


def fresh_runs(groups: list[list[int]]) -> list[int]:
    """Lengths of the maximal runs of adjacent layers that stand for one original layer each (never merged)."""
    runs, current = [], 0
    for group in groups:
        if len(group) == 1:
            current += 1
        else:
            runs.append(current)
            current = 0
    return [r for r in runs + [current] if r > 0]


def can_finish(runs: list[int], sizes: list[int]) -> bool:
    """Whether windows of ``sizes`` fit side by side into runs of never-merged layers of lengths ``runs``.

    Largest window first into the longest run: exact when all sizes are equal, which is every step but
    possibly the last (smaller) one.
    """
    runs = sorted(runs, reverse=True)
    for size in sorted(sizes, reverse=True):
        if not runs or runs[0] < size:
            return False
        runs[0] -= size
        runs.sort(reverse=True)
    return True


def check_config(cfg: CoMeConfig, layers: int) -> int:
    """The checks that need the model or several settings at once (single-field ranges are the
    dataclass metadata's), before any scoring; returns the target depth."""
    target = target_depth(cfg, layers)
    if cfg.ratio == "posterior" and cfg.merge_layers != 2:
        raise ConfigError(
            f"method.ratio=posterior searches shares [r, 1 - r] of two layers; set method.merge_layers=2 (got {cfg.merge_layers})."
        )
    if cfg.wo_repeat and not can_finish([layers], merge_steps(layers, target, cfg.merge_layers)):
        needed = sum(merge_steps(layers, target, cfg.merge_layers))
        hint = f" (with merge_layers=2, at least {math.ceil(layers / 2)})" if cfg.merge_layers == 2 else ""
        raise ConfigError(
            f"method.wo_repeat=true cannot reach {target} layers from {layers}: the merges need {needed} distinct "
            f"original layers. Raise the target{hint}, raise method.merge_layers, or set method.wo_repeat=false."
        )
    return target


def layer_scores(stats: ChannelStatistics, ctx: MethodContext, layout: ConcatLayout) -> tuple[list, list]:
    """Per-layer key-value-group and FFN-channel sensitivities of the current model."""
    heads, channels = [], []
    names = [f"{layout.attn_output}.weight", f"{layout.mlp_output}.weight"]
    for position, (attn_sum, ffn_sum) in enumerate(zip(stats.attn_abs_sum, stats.ffn_abs_sum)):
        o_weight, down_weight = ctx.layer_tensors(position, names).values()
        heads.append(head_group_sensitivity(attn_sum, stats.tokens, o_weight, layout.num_kv_heads))
        channels.append(ffn_sensitivity(ffn_sum, stats.tokens, down_weight))
    return heads, channels


def admissible_skip(stats: ChannelStatistics, ctx: MethodContext, wo_repeat: bool, target: int, merge_layers: int) -> list[float]:
    """Skip score per window start, ``inf`` where ``wo_repeat`` excludes the window.

    Excluded: windows touching a merged layer (the released ``--wo-repeat``) and windows after which
    the remaining merges could no longer find enough adjacent never-merged layers; the released code
    would have ended up re-merging a merged layer there.
    """
    n = stats.window
    scores = [float(s) for s in stats.skip_score]
    if not wo_repeat:
        return scores
    groups = ctx.plan.groups
    remaining = merge_steps(len(groups) - (n - 1), target, merge_layers)
    for start in range(len(scores)):
        window = groups[start : start + n]
        merged_here = any(len(g) > 1 for g in window)
        after = groups[:start] + [sum(window, [])] + groups[start + n :]
        if merged_here or not can_finish(fresh_runs(after), remaining):
            scores[start] = math.inf
    return scores


def posterior_ratio(
    ctx: MethodContext, cfg: CoMeConfig, layout: ConcatLayout, positions: list[int], heads: list, channels: list
) -> tuple[list[float], list[dict]]:
    """CoMe-P: the share ``[r, 1 - r]`` whose merge gives the lowest calibration loss (first on ties)."""
    grid, losses = ratio_grid(cfg.granularity), []
    for r in tqdm(grid, desc=f"{cfg.name} ratio search {positions}", leave=False):
        choice = choose_pieces(layout, [r, 1.0 - r], heads, channels, cfg.heads)
        with ctx.trial(changed=[positions[0]]):  # undone on exit: only layer positions[0] is cloned
            ctx.concat_merge(positions[0], positions[1:], layout, choice, cfg.norms)
            losses.append(ctx.calibration_nll())
    r = grid[losses.index(min(losses))]
    return [r, 1.0 - r], [{"ratio": round(g, 6), "loss": round(loss, 6)} for g, loss in zip(grid, losses)]


def come(ctx: MethodContext, cfg: CoMeConfig) -> dict:
    """CoMe (``ratio="bi"``) or CoMe-P (``ratio="posterior"``) on ``ctx``; returns every step's choices for plan.json."""
    layout = concat_layout(ctx.model)  # unsupported architectures fail here, before any scoring
    original = ctx.num_layers
    target = check_config(cfg, original)
    steps = []
    progress = tqdm(total=original - target, desc=cfg.name, unit="layer")
    while ctx.num_layers > target:
        before = ctx.num_layers
        n = min(cfg.merge_layers, before - target + 1)
        stats = ctx.channel_statistics(window=n, skip_tokens=cfg.skip_tokens, desc=f"{cfg.name} scores ({before} layers)")
        skip = admissible_skip(stats, ctx, cfg.wo_repeat, target, cfg.merge_layers)
        if all(math.isinf(v) for v in skip):  # unreachable after check_config; kept as a guard
            raise LayerSurgeryError(f"{cfg.name}: no admissible window of {n} layers at {before} layers (wo_repeat=true).")
        start = skip.index(min(skip))
        positions = list(range(start, start + n))
        bi = [float(stats.block_influence[p]) for p in positions]
        heads, channels = layer_scores(stats, ctx, layout)
        window_heads, window_channels = [heads[p] for p in positions], [channels[p] for p in positions]
        stands_for = [list(ctx.plan.groups[p]) for p in positions]
        trials = None
        if cfg.ratio == "bi":
            floor = window_min_max(cfg.min_max, sum(len(g) for g in stands_for))
            ratio = block_ratio(bi, cfg.psu, floor)
        else:
            ratio, trials = posterior_ratio(ctx, cfg, layout, positions, window_heads, window_channels)
        choice = choose_pieces(layout, ratio, window_heads, window_channels, cfg.heads)
        ctx.concat_merge(start, positions[1:], layout, choice, cfg.norms)
        step = {
            "step": len(steps) + 1,
            "layers_before": before,
            "positions": positions,
            "original_layers": stands_for,
            "skip_score": [None if math.isinf(v) else round(v, 6) for v in skip],
            "block_influence": [round(v, 6) for v in stats.block_influence.tolist()],
            **choice.summary(),
        }
        if trials is not None:
            step["trials"] = trials
        steps.append(step)
        log.info("%s: merged %s (original %s) with ratio %s", cfg.name, positions, stands_for, [round(r, 3) for r in ratio])
        progress.update(n - 1)
    progress.close()
    return {
        "layout": {
            "num_heads": layout.num_heads, "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
            "intermediate": layout.intermediate,
        },
        "target_layers": target,
        "steps": steps,
        "merge_info": [list(g) for g in ctx.plan.groups],
    }


register("come", CoMeConfig)(come)
register("come_p", CoMePConfig)(come)
