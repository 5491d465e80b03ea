"""Channel and head-group sensitivities, and the budget arithmetic of CoMe's concatenation merge.

Pure functions over the streaming sums of :mod:`layerfold.capture.channels` and the weights they
multiply. Formulas follow the released CoMe code (WangFei-2019/CoMe, ``methods/concat_merge.py``,
``utils/util.py``, ``models_unit/*/modeling_*.py::L1_Correlation``):

- FFN channel ``j``:  ``s_j = mean_t |a_j| * ||W_down[:, j]||_1``  (``a`` = input of ``down_proj``)
- attention: per channel ``c`` of the ``o_proj`` input, ``mean_t |o_c| * ||W_o[:, c]||_1``, then the
  mean over the channels of each key-value group (query head ``h`` belongs to group ``h // n_rep``,
  and its channels are contiguous, so a group is ``n_rep * head_dim`` consecutive channels)
- per-layer ratio: Block Influence normalised, raised to ``psu``, renormalised, with an optional floor
  ``min_max`` for the largest share (``block_ratio``); budgets split with ``distribute``, and each
  layer's most sensitive pieces within its budget picked by ``choose_pieces``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from layerfold.surgery.concat import ConcatChoice, ConcatLayout, query_heads


def ffn_sensitivity(abs_sum: torch.Tensor, tokens: int, down_weight: torch.Tensor) -> torch.Tensor:
    """``mean_t |a_j| * ||W_down[:, j]||_1`` per intermediate channel, ``[intermediate]``.

    ``abs_sum`` is the sum over calibration tokens of ``|a_j|``; ``down_weight`` is ``[hidden, intermediate]``.
    """
    _check_tokens(tokens)
    column_l1 = down_weight.detach().float().abs().sum(dim=0).to(abs_sum.device)
    return abs_sum.float() / tokens * column_l1


def head_group_sensitivity(abs_sum: torch.Tensor, tokens: int, o_weight: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Mean channel sensitivity of each key-value group on the ``o_proj`` input, ``[num_kv_heads]``.

    ``abs_sum`` is ``[num_heads * head_dim]`` (sum over tokens of ``|o_c|``), ``o_weight`` is
    ``[hidden, num_heads * head_dim]``.
    """
    channel = ffn_sensitivity(abs_sum, tokens, o_weight)  # same product, on the o_proj input
    if channel.numel() % num_kv_heads:
        raise ValueError(f"{channel.numel()} attention channels do not split into {num_kv_heads} key-value groups.")
    return channel.view(num_kv_heads, -1).mean(dim=-1)


def block_ratio(scores: Sequence[float], psu: float = 1.0, min_max: float = 0.0) -> list[float]:
    """Share of the merged layer given to each layer of a window, from their Block Influence.

    As the released ``block_ratio``: normalise, raise to ``psu``, renormalise; if the largest share is
    below ``min_max`` it is lifted to ``min_max`` and the others rescaled to fill ``1 - min_max``.
    A window whose scores are all zero is split evenly (the released code divides by zero there).
    """
    scores = [float(s) for s in scores]
    if any(s < 0 for s in scores):
        raise ValueError(f"Block Influence scores must be non-negative, got {scores}.")
    total = sum(scores)
    if total <= 0:
        return [1.0 / len(scores)] * len(scores)
    scaled = [(s / total) ** psu for s in scores]
    ratio = [s / sum(scaled) for s in scaled]
    top = ratio.index(max(ratio))
    if ratio[top] < min_max:
        others = sum(ratio) - ratio[top]
        ratio = [
            min_max if i == top else (r * (1 - min_max) / others if others > 0 else (1 - min_max) / (len(ratio) - 1))
            for i, r in enumerate(ratio)
        ]
    return ratio


def window_min_max(min_max: float, original_layers: int) -> float:
    """The floor the released code actually applies: ``min_max ** (1 / (n - 1))`` for a window standing for ``n`` original layers."""
    return min_max ** (1.0 / max(original_layers - 1, 1))


def distribute(total: int, ratio: Sequence[float]) -> list[int]:
    """Split ``total`` heads or channels by ``ratio``: floor for every layer but the largest share, the rest to it.

    The released ``distribute_and_round``; the first maximum wins a tie.
    """
    top = list(ratio).index(max(ratio))
    counts = [0 if i == top else int(total * r) for i, r in enumerate(ratio)]
    counts[top] = total - sum(counts)
    return counts


def top_indices(scores: torch.Tensor, k: int) -> list[int]:
    """The ``k`` highest-scoring indices, returned in ascending index order (ties go to the lower index)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def choose_pieces(
    layout: ConcatLayout,
    ratio: Sequence[float],
    head_scores: Sequence[torch.Tensor],
    channel_scores: Sequence[torch.Tensor],
    heads: str = "grouped",
) -> ConcatChoice:
    """What a concatenation merge keeps: budgets by ``ratio``, then each layer's most sensitive key-value
    groups (with their query heads, by ``heads`` mode) and FFN channels within its budget."""
    if not len(ratio) == len(head_scores) == len(channel_scores):
        raise ValueError("ratio, head_scores and channel_scores need one entry per layer of the window.")
    kv_counts = distribute(layout.num_kv_heads, ratio)
    channel_counts = distribute(layout.intermediate, ratio)
    kv = [top_indices(s, n) for s, n in zip(head_scores, kv_counts)]
    return ConcatChoice(
        ratio=[float(r) for r in ratio],
        kv_heads=kv,
        query_heads=[query_heads(k, layout.num_heads, layout.num_kv_heads, heads) for k in kv],
        channels=[top_indices(s, n) for s, n in zip(channel_scores, channel_counts)],
    )


def ratio_grid(granularity: int) -> list[float]:
    """CoMe-P's candidate shares of the first layer, ``0, 1/g, ..., 1``."""
    if granularity < 1:
        raise ValueError(f"granularity must be at least 1, got {granularity}.")
    return [i / granularity for i in range(granularity + 1)]


def _check_tokens(tokens: int) -> None:
    if tokens < 1:
        raise ValueError("No calibration tokens were seen; sensitivities need at least one.")
