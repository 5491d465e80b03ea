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

**wo_repeat** (never merge a merged layer again). ``wo_repeat_rule="reachable"`` (default) refuses a
target it cannot reach before scoring, closes the windows touching a merged layer and also the windows
after which the remaining merges could no longer find enough adjacent never-merged layers. With
``merge_layers=2`` from ``L`` layers to ``T``, the merges may leave ``T - ceil(L / 2)`` pairs' worth of
layers unmerged (the *slack*); a window at an odd offset inside an even run of never-merged layers
spends one unit of it. While slack is left, the scores choose freely; once it is spent, the rule closes
the windows that would spend more, and where that overrides the lowest score it logs a warning and
records ``wo_repeat_decided`` in the step. At ``T = L / 2`` (``L`` even, e.g. 32 -> 16, the released
README's example) there is no slack from the start: the pairs are ``(0, 1), (2, 3), ...`` whatever the
scores (which only order the merges), and a warning says so before scoring. ``wo_repeat_rule="released"``
is the released code's rule (parity): it closes only the windows within ``merge_layers - 1`` of a merged
layer (``repeat_skip_importance_deal``), and when it closes every window it merges window 0 (``index(min)``
of all-``inf`` scores), re-merging a merged layer; layerfold logs a warning there. Where the released
code would close a window past the end of its list it fails with ``IndexError`` (after merging the last
two layers); this mode skips that non-existent window.

**Skip-score window** (``skip_layers``): by default the skip score of a window of ``n`` layers is
the angular distance across those ``n`` layers (the paper's SBI over the layers merged). The released
code always measures it across 2 layers (``compute_bi(..., n_prune_layers=2)``) and scores the first
``L - merge_item + 1`` windows, whatever the window size; ``skip_layers=2`` does that (it differs only for
``merge_layers > 2``).

**Top boundary** (``top_boundary``): layerfold reads the residual stream leaving the last layer before
the final norm (``pre_norm``, default, like every other boundary); the released code reads HF's
``hidden_states[-1]``, the final-norm output (``final_norm``, parity). Only the last layer's BI and the
skip score of the last window change, and with them the ratio of a merge that includes the last layer.

Departures from the released code (WangFei-2019/CoMe, ``methods/concat_merge*.py``) that remain with
the parity settings (``+experiment=come_code_parity``: ``heads=tiled``, ``top_boundary=final_norm``,
``wo_repeat_rule=released``, ``skip_layers=2``):

- **Scores from hooks** on the stock model, summed per channel as the pass runs; the code patches
  each modeling file and keeps every layer's ``[batch, seq, intermediate]`` activations.
- **CoMe-P trials in place** through :meth:`MethodContext.trial` (one layer cloned per trial); the
  code deep-copies the whole model for each of the ``g + 1`` trials.
- Defaults that depart from it: **grouped-query heads** kept with their own query heads
  (``heads="grouped"``; ``tiled`` is the code's selection, see :mod:`layerfold.surgery.concat`), the
  pre-norm top boundary, the reachable ``wo_repeat`` rule and the skip score over the merged window, above.

``norms="mean"`` (default) averages layer norms plainly, as the code does, even for a layer given no
share; ``norms="weighted"`` weights them by the ratio, so that ratio ``(1, 0)`` is exactly "drop the
second layer".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from tqdm.auto import tqdm

from layerfold.capture.channels import SKIP_TOKENS, TOP_BOUNDARIES, ChannelStatistics
from layerfold.config import ConfigError
from layerfold.methods import MethodCapabilities, MethodContext, final_norm_blocker, register
from layerfold.models.facts import ModelFacts
from layerfold.scoring.channels import (
    block_ratio,
    choose_pieces,
    ffn_sensitivity,
    head_group_sensitivity,
    ratio_grid,
    window_min_max,
)
from layerfold.surgery import LayerSurgeryError
from layerfold.surgery.support import concat_family_refusal
from layerfold.surgery.concat import HEAD_MODES, NORM_MODES, ConcatLayout, concat_layout, concat_merge_state  # noqa: F401

log = logging.getLogger(__name__)

RATIOS = ("bi", "posterior")
WO_REPEAT_RULES = ("reachable", "released")


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
    # reachable: also close windows that would leave the target unreachable | released: the code's rule (parity)
    wo_repeat_rule: str = field(default="reachable", metadata={"choices": list(WO_REPEAT_RULES)})
    heads: str = field(default="grouped", metadata={"choices": list(HEAD_MODES)})  # grouped (GQA-correct) | tiled (released code)
    norms: str = field(default="mean", metadata={"choices": list(NORM_MODES)})  # mean (released code) | weighted by the ratio
    # the state leaving the last layer: pre_norm (layerfold) | final_norm (HF hidden_states[-1], released code)
    top_boundary: str = field(default="pre_norm", metadata={"choices": list(TOP_BOUNDARIES)})
    # layers the skip score spans from a window's start: None = the window's own size | 2 = released code
    skip_layers: Optional[int] = field(default=None, metadata={"ge": 1, "lt": "num_layers"})


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
    reachable = cfg.wo_repeat and cfg.wo_repeat_rule == "reachable"
    if reachable and not can_finish([layers], merge_steps(layers, target, cfg.merge_layers)):
        needed = sum(merge_steps(layers, target, cfg.merge_layers))
        hint = f" (with merge_layers=2, at least {math.ceil(layers / 2)})" if cfg.merge_layers == 2 else ""
        raise ConfigError(
            f"method.wo_repeat=true cannot reach {target} layers from {layers}: the merges need {needed} distinct "
            f"original layers. Raise the target{hint}, raise method.merge_layers, or set method.wo_repeat=false."
        )
    if reachable and windows_fixed(layers, target, cfg.merge_layers):
        log.warning(
            "%s: %d -> %d layers with wo_repeat merges every original layer, so wo_repeat alone fixes the windows "
            "(%s); the scores only order the merges. Raise the target, or set method.wo_repeat=false, for the scores to choose.",
            cfg.name, layers, target, fixed_windows(layers, target, cfg.merge_layers),
        )
    return target


def windows_fixed(layers: int, target: int, merge_layers: int) -> bool:
    """Whether wo_repeat's reachability rule alone decides which original layers are merged together:
    the merges need every original layer and can tile the stack in one way only (equal window sizes)."""
    steps = merge_steps(layers, target, merge_layers)
    return sum(steps) == layers and len(set(steps)) == 1


def fixed_windows(layers: int, target: int, merge_layers: int) -> list[list[int]]:
    """The windows of original layers that :func:`windows_fixed` leaves (consecutive, from layer 0)."""
    n = merge_steps(layers, target, merge_layers)[0]
    return [list(range(start, start + n)) for start in range(0, layers, n)]


def layer_scores(stats: ChannelStatistics, ctx: MethodContext, layout: ConcatLayout) -> tuple[list, list]:
    """Per-layer key-value-group and FFN-channel sensitivities of the current model."""
    heads, channels = [], []
    names = [f"{layout.attn_output}.weight", f"{layout.mlp_output}.weight"]
    for position, (attn_sum, ffn_sum) in enumerate(zip(stats.attn_abs_sum, stats.ffn_abs_sum)):
        o_weight, down_weight = ctx.layer_tensors(position, names).values()
        heads.append(head_group_sensitivity(attn_sum, stats.tokens, o_weight, layout.num_kv_heads))
        channels.append(ffn_sensitivity(ffn_sum, stats.tokens, down_weight))
    return heads, channels


def released_exclusions(groups: list[list[int]], merge_layers: int, windows: int) -> list[int]:
    """The window starts the released ``--wo-repeat`` closes (``repeat_skip_importance_deal``): those within
    ``merge_layers - 1`` before or ``merge_layers - 2`` after a merged layer, among the ``windows`` there are."""
    merged = [index for index, group in enumerate(groups) if len(group) > 1]
    closed = {i for index in merged for i in range(index - (merge_layers - 1), index + merge_layers - 1) if i >= 0}
    return sorted(i for i in closed if i < windows)  # the code raises IndexError on a start past its list


def admissible_skip(stats: ChannelStatistics, ctx: MethodContext, cfg: CoMeConfig, target: int, n: int) -> tuple[list[float], list[float]]:
    """Skip score per start of a window of ``n`` layers, ``inf`` where ``wo_repeat`` closes the window; and the
    scores with only the windows touching a merged layer closed (what the scores alone would choose from).

    ``reachable`` also closes windows after which the remaining merges could no longer find enough
    adjacent never-merged layers; the released code would have ended up re-merging a merged layer there.
    ``released`` closes what the released code closes (:func:`released_exclusions`).
    """
    groups = ctx.plan.groups
    scores = [float(s) for s in stats.skip_score]
    if cfg.skip_layers is not None:  # released: the list holds the first L - merge_item + 1 windows
        scores = scores[: len(groups) - cfg.merge_layers + 1]
    scores = scores[: len(groups) - n + 1]  # a window of n layers must fit
    if not cfg.wo_repeat:
        return scores, list(scores)
    if cfg.wo_repeat_rule == "released":
        for start in released_exclusions(groups, cfg.merge_layers, len(scores)):
            scores[start] = math.inf
        return scores, list(scores)
    untouched = list(scores)
    remaining = merge_steps(len(groups) - (n - 1), target, cfg.merge_layers)
    for start in range(len(scores)):
        window = groups[start : start + n]
        if any(len(g) > 1 for g in window):
            scores[start] = untouched[start] = math.inf
            continue
        after = groups[:start] + [sum(window, [])] + groups[start + n :]
        if not can_finish(fresh_runs(after), remaining):
            scores[start] = math.inf
    return scores, untouched


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
        stats = ctx.channel_statistics(window=cfg.skip_layers or n, skip_tokens=cfg.skip_tokens,
                                       desc=f"{cfg.name} scores ({before} layers)", top_boundary=cfg.top_boundary)
        skip, by_score = admissible_skip(stats, ctx, cfg, target, n)
        decided = None
        if all(math.isinf(v) for v in skip):
            if cfg.wo_repeat_rule != "released":  # unreachable after check_config; kept as a guard
                raise LayerSurgeryError(f"{cfg.name}: no admissible window of {n} layers at {before} layers (wo_repeat=true).")
            log.warning("%s: wo_repeat_rule=released closes every window at %d layers; as the released code, window 0 is "
                        "merged, although it holds a merged layer", cfg.name, before)
        start = skip.index(min(skip))  # the first on ties; window 0 when every window is closed (released code)
        if not all(math.isinf(v) for v in by_score) and by_score.index(min(by_score)) != start:
            decided = {"lowest_score": by_score.index(min(by_score)), "chosen": start}
            log.warning("%s: at %d layers wo_repeat, not the scores, chose window %d: the lowest-scoring window %d would leave "
                        "too few adjacent never-merged layers to reach %d layers", cfg.name, before, start, decided["lowest_score"], target)
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
        if decided is not None:
            step["wo_repeat_decided"] = decided
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


def problems(cfg: CoMeConfig, facts: ModelFacts, params: Any) -> list[str]:
    """The reachable target and the settings against each other (:func:`check_config`), before anything runs; which
    families can be concatenated at all is the family refusal's (``concat_family_refusal``)."""
    check_config(cfg, facts.num_layers)
    return []


# Concatenates through the plan (layerfold.execution.concat) and streams its own channel statistics per layer,
# so it runs layer by layer; it reads none of the capture's statistics.
CAPABILITIES = MethodCapabilities(edit="concat", layer_major=final_norm_blocker, family_refusal=concat_family_refusal)
register("come", CoMeConfig, capabilities=CAPABILITIES, problems=problems)(come)
register("come_p", CoMePConfig, capabilities=CAPABILITIES, problems=problems)(come)
